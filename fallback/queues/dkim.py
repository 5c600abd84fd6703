"""DKIM signing of outbound mail (dkimpy), for domains with a key in dkim_key_dir.

One selector for all domains, one PEM private key per domain in
`<dkim_key_dir>/<domain>.pem`; mail of a domain without a key file goes out
unsigned.  The signature is added when the message is handed to the
smarthost, never stored: the Sent copy keeps the bytes the user composed.
"""

from __future__ import annotations

from pathlib import Path

import dkim

from fallback.errors import ConfigError
from fallback.mailbox import headers

# Headers a signature covers when the message has them (RFC 6376 5.4.1's recommendation).
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")


class Signer:
    """Signs with the key of the sender's domain; keys are read once and kept."""

    def __init__(self, selector: str, key_dir: Path) -> None:
        self.selector = selector
        self.key_dir = Path(key_dir)
        self._keys: dict[str, bytes | None] = {}

    def key_for(self, domain: str) -> bytes | None:
        if domain not in self._keys:
            path = self.key_dir / f"{domain}.pem"
            try:
                self._keys[domain] = path.read_bytes()
            except FileNotFoundError:
                self._keys[domain] = None
            except OSError as exc:
                raise ConfigError(f"dkim_key_dir: cannot read {path}: {exc}") from None
        return self._keys[domain]

    def sign(self, raw: bytes, sender: str) -> bytes:
        """raw with a DKIM-Signature header on top, or raw itself when the domain has no key."""
        domain = sender.rpartition("@")[2].lower()
        key = self.key_for(domain)
        if key is None:
            return raw
        names = headers.names(raw)
        present = [h for h in SIGNED_HEADERS if h.decode() in names]
        try:
            signature = dkim.sign(raw, self.selector.encode("ascii"), domain.encode("ascii"), key,
                                  include_headers=present or [b"from"])
        except dkim.DKIMException as exc:
            raise ConfigError(f"dkim: cannot sign for {domain} with {self.key_dir}/{domain}.pem: "
                              f"{exc}") from None
        return bytes(signature) + raw

