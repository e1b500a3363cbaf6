"""The ACME http-01 challenge on the plain HTTP listener (RFC 8555 8.3):
GET /.well-known/acme-challenge/<token> answers the key authorization while that
challenge is being validated, 404 otherwise.  Tokens are matched exactly (case kept).
With [storage] shared a token this node's board lacks is looked up in the shared ACME
store, where the node ordering published it (mailserver.acme_shared), in a thread."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mailserver.autoconfig.resources import Directory, Leaf, NotFound, error_body

if TYPE_CHECKING:
    from mailserver.acme_client import ChallengeBoard

log = Logger()

# RFC 8555 8.1: base64url characters only; 8.3: at least 128 bits.  Bounded here.
_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{16,128}")


class AcmeChallenges(Resource):
    """/.well-known/acme-challenge/"""

    def __init__(self, board: ChallengeBoard) -> None:
        super().__init__()
        self.board = board

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not _TOKEN_RE.fullmatch(path):
            return NotFound()
        return ChallengeToken(self.board, path.decode("ascii"))

    def render(self, request: Request) -> bytes:
        return error_body(request, 404, "not found")


class ChallengeToken(Leaf):
    allowedMethods = (b"GET", b"HEAD")

    def __init__(self, board: ChallengeBoard, token: str) -> None:
        super().__init__()
        self.board = board
        self.token = token

    def render_GET(self, request: Request) -> bytes | int:
        key_authorization = self.board.http01(self.token)
        request.setHeader(b"cache-control", b"no-store")
        shared = getattr(self.board, "shared_http01", None)
        if key_authorization is not None or shared is None:
            return _answer(request, key_authorization)
        # Another node's order: the token (checked against _TOKEN_RE) names its file.
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = threads.deferToThread(shared, self.token)

        def reply(found: str | None) -> None:
            if not gone:
                request.write(_answer(request, found))
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("acme: reading a shared http-01 challenge failed", failure)
            reply(None)
        d.addCallbacks(reply, failed)
        return NOT_DONE_YET


def _answer(request: Request, key_authorization: str | None) -> bytes:
    # RFC 8555 8.3: the key authorization, as application/octet-stream.
    if key_authorization is None:
        return error_body(request, 404, "no such challenge")
    request.setHeader(b"content-type", b"application/octet-stream")
    return key_authorization.encode("ascii")


def add_challenge_resource(root: Resource, board: ChallengeBoard) -> None:
    """Mount AcmeChallenges under the tree's /.well-known/ (made if missing)."""
    well_known = root.children.get(b".well-known")
    if well_known is None:
        well_known = Directory()
        root.putChild(b".well-known", well_known)
    well_known.putChild(b"acme-challenge", AcmeChallenges(board))
