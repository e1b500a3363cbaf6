"""SMTP replies as values: basic code, enhanced status code (RFC 3463), text, temporariness."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str
    # Why a refusal was given, where the codes do not say (the `reason` label of
    # mailserver_messages_rejected_total; see mailserver.metrics.rejection_reason).
    reason: str = field(default="", compare=False)

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def line(self) -> bytes:
        """The reply text after the code, with the enhanced code in front (RFC 2034)."""
        body = f"{self.enhanced} {self.text}" if self.enhanced else self.text
        return body.encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class SMTPReplyError(Exception):
    """Raised by policy code; the session answers with the carried reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# The replies the server gives, in one place so that MX and submission say the same thing.
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
BAD_SEQUENCE_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported option")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message line too long")
BARE_LF = Reply(521, "5.5.2", "Error: bare <LF> received")
BARE_CR = Reply(521, "5.5.2", "Error: bare <CR> received")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied", reason="relay_denied")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop detected")   # RFC 3463 3.5
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "Error: TLS already active")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
RESET = Reply(250, "2.0.0", "Ok")
VRFY = Reply(252, "2.0.0", "Send some mail, I'll try my best")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections, try again later")
# Inbound checks on the MX (mailserver.inbound).
PREGREET = Reply(554, "5.7.1", "Error: talking before the greeting; go away")
TOO_MANY_RCPT_COMMANDS = Reply(421, "4.7.0", "Error: too many recipients in this session")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
BAD_HELO = Reply(501, "5.5.4", "Error: invalid HELO/EHLO name")
DMARC_REJECT = Reply(550, "5.7.1", "Message rejected: DMARC policy of the From domain",
                     reason="dmarc")
DMARC_TEMPFAIL = Reply(451, "4.7.1", "Try again later: the From domain's DMARC policy "
                       "could not be evaluated (temporary error)", reason="dmarc")
SPAM_REJECT = Reply(554, "5.7.1", "Message rejected as spam", reason="spam")
SPAM_TEMPFAIL = Reply(451, "4.7.1", "Try again later", reason="spam")
FILTER_TEMPFAIL = Reply(451, "4.7.1", "Error: message filter unavailable, try again later")
