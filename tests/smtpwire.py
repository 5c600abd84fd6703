"""A raw-socket SMTP client for protocol tests: sends exact bytes, reads whole replies."""

from __future__ import annotations

import socket
import ssl


class Wire:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> None:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> list[str] | None:
        """All lines of one reply (None when the server closed the connection)."""
        lines: list[str] = []
        while True:
            line = self._line()
            if line is None:
                return lines or None
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def expect(self, code: str) -> list[str]:
        got = self.reply()
        assert got is not None, f"connection closed, expected {code}"
        assert got[-1].startswith(code), f"expected {code}, got {got}"
        return got

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self._line() is None
        except TimeoutError:
            return False

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert not self.buf, f"unread bytes before TLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        self.sock.close()
