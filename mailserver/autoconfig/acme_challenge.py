"""The ACME http-01 challenge on the plain HTTP listener (RFC 8555 8.3):
GET /.well-known/acme-challenge/<token> answers the key authorization while that
challenge is being validated, 404 otherwise.  Tokens are matched exactly (case kept)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import Request

from mailserver.autoconfig.resources import Directory, Leaf, NotFound, error_body

if TYPE_CHECKING:
    from mailserver.acme_client import ChallengeBoard

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

    def render_GET(self, request: Request) -> bytes:
        # RFC 8555 8.3: the key authorization, as application/octet-stream.
        key_authorization = self.board.http01(self.token)
        request.setHeader(b"cache-control", b"no-store")
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
