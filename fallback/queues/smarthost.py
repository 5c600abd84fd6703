"""One SMTP transaction with the smarthost, and what it meant for each recipient.

`send` never raises for anything the smarthost or the network does: it returns
one `Reply` per recipient.  The worker turns those into states: 2xx after the
data is delivered, 5xx at RCPT or DATA is failed, anything else (4xx, a lost
connection, a refused TLS handshake or login) is deferred.  Trouble before
MAIL FROM (connect, EHLO, STARTTLS, AUTH) is our side's or the relay's
problem, never the recipient's, so even a 5xx there only defers.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from fallback.config import Settings, parse_hostport, read_secret_file
from fallback.errors import ConfigError

REPLY_LIMIT = 500


@dataclass(frozen=True)
class Reply:
    code: int    # the SMTP reply code; 0 when there was no reply (connection trouble)
    text: str    # "550 5.1.1 <x@y>: Recipient address rejected" or what went wrong

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


def clip(text: str) -> str:
    """A server's reply text on one line, bounded: it goes into records, logs and notices."""
    return " ".join(text.split())[:REPLY_LIMIT]


def make_reply(code: int, message: str) -> Reply:
    return Reply(code, clip(f"{code} {message}"))


@dataclass(frozen=True)
class Smarthost:
    """Where and how to connect, made once from the settings (the password file is read here)."""

    host: str
    port: int
    tls: str
    user: str | None
    password: str | None
    ca_file: Path | None
    timeout: float
    local_hostname: str

    @classmethod
    def from_settings(cls, s: Settings, local_hostname: str) -> Smarthost:
        if not s.smarthost:
            raise ConfigError("smarthost: not set; give --smarthost HOST:PORT (or FALLBACK_SMARTHOST)")
        host, port = parse_hostport(s.smarthost)
        password = None
        if s.smarthost_password_file is not None:  # a password may begin or end with a space
            password = read_secret_file("smarthost_password_file", s.smarthost_password_file,
                                        keep_spaces=True)
        return cls(host, port, s.smarthost_tls, s.smarthost_user, password, s.smarthost_ca_file,
                   s.smarthost_timeout, local_hostname)

    @property
    def name(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _client(self) -> aiosmtplib.SMTP:
        context = None
        if self.tls != "none":
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        return aiosmtplib.SMTP(
            hostname=self.host, port=self.port, local_hostname=self.local_hostname,
            timeout=self.timeout, use_tls=self.tls == "tls", start_tls=self.tls == "starttls",
            tls_context=context,
        )

    async def send(self, sender: str, recipients: list[str], payload: bytes) -> dict[str, Reply]:
        """Offer `payload` to the smarthost for `recipients`; a Reply for every one of them."""
        out: dict[str, Reply] = {}
        client = self._client()
        stage = "connect"
        try:
            await client.connect()
            if self.user is not None:
                stage = "login"
                await client.login(self.user, self.password or "")
            stage = "mail"
            eight_bit = client.supports_extension("8bitmime") and not payload.isascii()
            options = ["BODY=8BITMIME"] if eight_bit else []
            await client.mail(sender, options=options)
            stage = "rcpt"
            accepted: list[str] = []
            for rcpt in recipients:
                try:
                    await client.rcpt(rcpt)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    out[rcpt] = make_reply(exc.code, exc.message)
            if accepted:
                stage = "data"
                # The window RFC 1047 describes: once the final dot is sent, a lost
                # connection before the reply leaves us not knowing; we treat it as
                # deferred and send again later (a possible duplicate, never a loss).
                response = await client.data(payload)
                for rcpt in accepted:
                    out[rcpt] = make_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            reply = make_reply(exc.code, exc.message)
            if stage in ("connect", "login"):
                reply = Reply(0, clip(f"smarthost {self.name} refused {stage}: {reply.text}"))
            for rcpt in recipients:
                out.setdefault(rcpt, reply)
        except asyncio.CancelledError:
            client.close()  # stopping: no polite QUIT that could wait a whole timeout
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = clip(f"connection to smarthost {self.name} failed at {stage}: "
                           f"{type(exc).__name__}: {exc}")
            for rcpt in recipients:
                out.setdefault(rcpt, Reply(0, reason))
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
        return out
