"""One delivery to the main mail system's next hop, over SMTP or LMTP, and what it answered.

The forward queue hands over mail for users whose mailstore is healthy.  Each
transaction carries one recipient, so a reply always belongs to exactly one
queued record (and LMTP's one-reply-per-recipient after DATA is one reply).
`send` never raises for anything the next hop or the network does: it returns
a `Reply` (from fallback.queues.smarthost); code 0 means there was no reply at all.

aiosmtplib has no LHLO, so the commands are driven through its low-level
`execute_command`: LHLO (or EHLO) by hand, its answer given to the client as
the greeting reply so that it knows the extensions; MAIL and RCPT by hand so
that the envelope addresses go out exactly as they came in (aiosmtplib's
`mail()` re-parses the address with the email package, which could change a
quoted local part); DATA through `data()`, which dot-stuffs.  No thread, no
blocking smtplib.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiosmtplib

from fallback.config import Settings, parse_forward_to
from fallback.errors import ConfigError
from fallback.queues.smarthost import Reply, clip, make_reply


@dataclass(frozen=True)
class NextHop:
    protocol: str  # "smtp" or "lmtp"
    host: str
    port: int
    timeout: float
    local_hostname: str

    @classmethod
    def from_settings(cls, s: Settings, local_hostname: str) -> NextHop:
        if not s.forward_to:
            raise ConfigError("forward_to: not set; give --forward-to smtp://HOST:PORT or lmtp://HOST:PORT")
        try:
            protocol, host, port = parse_forward_to(s.forward_to)
        except ValueError as exc:
            raise ConfigError(f"forward_to: {exc}") from None
        return cls(protocol, host, port, s.forward_timeout, local_hostname)

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}"

    async def send(self, sender: str, recipient: str, raw: bytes) -> Reply:
        """Offer `raw` for one recipient with the original envelope sender; the next hop's verdict."""
        # No STARTTLS: the next hop is the provider's own MTA on its internal network.
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                 local_hostname=self.local_hostname, start_tls=False, use_tls=False)
        stage = "connect"
        try:
            await client.connect()
            stage = "lhlo" if self.protocol == "lmtp" else "ehlo"
            greeting = await client.execute_command(stage.upper().encode(), self.local_hostname.encode())
            if greeting.code != 250:
                return Reply(0, clip(f"next hop {self.name} refused {stage.upper()}: "
                                      f"{greeting.code} {greeting.message}"))
            client.last_ehlo_response = greeting  # parses the extensions (8BITMIME, SMTPUTF8)
            utf8 = not (sender.isascii() and recipient.isascii())
            options = []
            if client.supports_extension("8bitmime") and not raw.isascii():
                options.append(b"BODY=8BITMIME")
            if utf8 and client.supports_extension("smtputf8"):
                options.append(b"SMTPUTF8")
            stage = "mail"
            null = sender in ("", "<>")  # bounces and notices keep their null sender
            reply = await client.execute_command(
                b"MAIL", b"FROM:<" + (b"" if null else sender.encode()) + b">", *options)
            if reply.code != 250:
                return make_reply(reply.code, reply.message)
            stage = "rcpt"
            reply = await client.execute_command(b"RCPT", b"TO:<" + recipient.encode() + b">")
            if reply.code not in (250, 251):
                return make_reply(reply.code, reply.message)
            stage = "data"
            # Once the final dot is sent, a lost connection before the reply leaves us not
            # knowing (RFC 1047): it counts as not delivered and is sent again later, a
            # possible duplicate, never a loss.
            response = await client.data(raw)
            return make_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            return make_reply(exc.code, exc.message)
        except asyncio.CancelledError:
            client.close()  # stopping: no polite QUIT that could wait a whole timeout
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return Reply(0, clip(f"connection to next hop {self.name} failed at {stage}: "
                                  f"{type(exc).__name__}: {exc}"))
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
