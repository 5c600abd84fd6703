"""The one error taxonomy of the service.

Every failure the code raises on purpose is a `FallbackError`.  It carries what
each audience needs: the SMTP reply (code, enhanced code, short public text)
for the wire, and the internal reason for the log.  Anything that is not a
`FallbackError` is unknown and counts as temporary trouble (4xx), and its text
never reaches a client or a user.
"""

from __future__ import annotations


class FallbackError(Exception):
    """A failure with a public face (SMTP reply / one CLI line) and a private reason."""

    code: int = 451
    enhanced: str = "4.3.0"
    public: str = "Temporary local problem, please try again later"

    def __init__(
        self,
        reason: str,
        *,
        public: str | None = None,
        code: int | None = None,
        enhanced: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if public is not None:
            self.public = public
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def smtp_reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.public}"

    def __str__(self) -> str:
        return self.reason


class ConfigError(FallbackError):
    """Bad configuration: refuse to start, one line saying which setting and why."""

    code, enhanced, public = 451, "4.3.5", "Server configuration problem"


class StorageError(FallbackError):
    """Redis unreachable or a write failed: the sender must retry."""

    code, enhanced, public = 451, "4.3.0", "Temporary storage problem, please try again later"


class DirectoryUnavailable(FallbackError):
    """The user directory could not be read (RFC 3463 4.4.3: directory server failure)."""

    code, enhanced, public = 451, "4.4.3", "Directory lookup failed, please try again later"


class UnknownUser(FallbackError):
    code, enhanced, public = 550, "5.1.1", "No such user here"


class RelayDenied(FallbackError):
    code, enhanced, public = 550, "5.7.1", "Relaying denied: we do not accept mail for that domain"


class TooManyRecipients(FallbackError):
    code, enhanced, public = 452, "4.5.3", "Too many recipients"


class MessageTooBig(FallbackError):
    code, enhanced, public = 552, "5.3.4", "Message size exceeds fixed maximum message size"


class MailboxFull(FallbackError):
    """A fallback mailbox at its quota (RFC 3463 4.2.2): temporary, the sender retries and after
    reconcile and purge the mailbox (or the real one) takes it."""

    code, enhanced, public = 452, "4.2.2", "Mailbox full, try again later"

    def __init__(self, reason: str, *, address: str = "") -> None:
        super().__init__(reason)
        self.address = address  # the mailbox at its quota


class InsufficientStorage(FallbackError):
    """Redis past the memory reserve (RFC 3463 4.3.1): new mail waits, the webmail keeps the rest."""

    code, enhanced, public = 452, "4.3.1", "Insufficient system storage, try again later"


class TooManyConnections(FallbackError):
    code, enhanced, public = 421, "4.7.0", "Too many connections, try again later"


class TooManyMessages(FallbackError):
    """A client prefix over its message rate (intake.clientlimits): the sender retries later."""

    code, enhanced, public = 451, "4.7.1", "Too many messages from your network, try again later"


class InputError(FallbackError):
    """Bad operator or user input (a CSV line, an address, a form field)."""

    code, enhanced, public = 501, "5.5.4", "Invalid input"


class NotFound(FallbackError):
    """A mailbox, message or queue entry that does not exist (or is not yours)."""

    code, enhanced, public = 550, "5.1.1", "Not found"


class ReconcileError(FallbackError):
    """The main store refused or failed during reconcile: says what, where, and the server's words."""

    code, enhanced, public = 451, "4.4.0", "Main store problem"


class DnsError(FallbackError):
    """A DNS query or dynamic update failed or was refused: says which server and why."""

    code, enhanced, public = 451, "4.4.3", "DNS problem"


class AliasLoop(FallbackError):
    """An alias met at delivery time names itself again, or nests deeper than the limit: the
    sender retries (never a bounce) while the operator fixes the alias (issue 14)."""

    code, enhanced, public = 451, "4.4.6", "Mail loop detected for this address, please try again later"
