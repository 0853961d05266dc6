"""Service transport: uvicorn's HTTP protocol with a deadline on each request's headers, so that a
client that connects and then sends nothing, or dribbles its headers, cannot hold a connection forever."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderDeadline(HttpToolsProtocol):
    """Closes the connection (after a 408) when a request's headers are not complete within
    `header_timeout_s` of the connection opening or of the request's first byte. Uvicorn's own
    keep-alive timeout covers only the idle time between requests."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.info("closed a connection from %s: no complete request headers within %s s",
                             self.client, self.header_timeout_s)
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()


def protocol(header_timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class for uvicorn's `http` setting, with this deadline."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": header_timeout_s})


def server_config(app: Any, host: str, port: int, header_timeout_s: float, access_log: bool,
                  **extra: Any) -> uvicorn.Config:
    """Uvicorn's settings for every way this service is served (one process, or each worker process)."""
    return uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log,
                          http=protocol(header_timeout_s), **extra)
