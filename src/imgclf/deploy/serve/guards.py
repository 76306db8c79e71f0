"""What stands between the open network and the app: timeouts, limits and shutdown for each connection.

    uvicorn.run(app, port=8000, **uvicorn_options(config))   # the header timeout, connection limit, shutdown
    app.add_middleware(BodyTimeout, seconds=10)               # 408 for a body that trickles in
    app.add_middleware(BodyLimit, max_bytes=..., paths=("/predict",))  # 413 before a huge body is buffered

uvicorn (0.55) has a keep-alive timeout and a graceful-shutdown timeout, but no timeout for a request's
headers or body and no Retry-After on its connection limit; those are added here, each tested on a real
socket in tests/deploy/test_serve.py.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

# uvicorn's logger: its handler prints to stderr in the server's format ("INFO:     ...")
log = logging.getLogger("uvicorn.error")


def client_name(address) -> str:
    host, port = address or ("?", 0)
    return f"{host}:{port}"


class BodyTimeout:
    """ASGI middleware: 408 and a closed connection when a request's body has not all arrived
    ``seconds`` after its headers did. uvicorn has no body timeout of its own (only the keep-alive timeout
    between requests), so without this a client sending one byte a second holds a connection, a task and
    a multipart parser as long as it likes. Timing ``receive()`` here is the simplest place that sees
    every body; the headers are timed in the connection (:func:`_protocol_class`)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        done = False

        async def timed():
            nonlocal done
            if done:  # the body is in; later calls wait for a disconnect, which is not the client's pace
                return await receive()
            try:  # wait_for, not asyncio.timeout_at: Python 3.10 has no such thing
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("client %s sent its body too slowly: 408 after %g s (%s %s)", client_name(scope.get("client")),
                         self.seconds, scope["method"], scope["path"])
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s; "
                                         "send it faster, or send smaller images",
                                    headers={"Connection": "close"}) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return await self.app(scope, timed, send)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, by Content-Length before reading any of
    it, and by counting for chunked uploads, so a huge upload is never buffered."""

    def __init__(self, app, max_bytes: int, paths: tuple[str, ...]):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        detail = f"request body over {self.max_bytes / 1024 ** 2:.1f} MB; send fewer or smaller images"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, detail)
            return message

        return await self.app(scope, limited, send)


# An upload still arriving when the server is told to stop gets this long to finish, then its connection
# is closed (a slow client must not hold the shutdown; a quick upload should not be cut).
_UPLOAD_GRACE_S = 1.0


def _protocol_class(config):
    """uvicorn's h11 protocol, plus what uvicorn (0.55) lacks for a server facing the open network:

    - a header timeout: uvicorn arms no timer until a first answer (its keep-alive timer, cancelled by any
      byte received), so a client that connects and sends its headers a byte at a time (slowloris) holds
      the connection forever. One timer per connection, armed on connect and after each answer: if no
      request is in progress when it fires, the headers did not arrive in time: 408 (when some did) and
      close. No uvicorn option does this; ``h11_max_incomplete_event_size`` only bounds their size.
    - ``limit_concurrency`` with Retry-After: uvicorn's own answers a bare 503 (its ``service_unavailable``
      app, no header), so the check runs here instead, with the same counts (open connections, requests in
      progress) and a 503 that says when to retry.
    - on shutdown, uploads still arriving are closed after :data:`_UPLOAD_GRACE_S` rather than waited for.

    h11 on purpose, not "auto": the timers rely on its state, and auto would switch to httptools if
    installed. Subclassing touches uvicorn internals (``conn``, ``cycle``, ``on_response_complete``):
    tests/deploy/test_serve.py checks every behaviour on a real socket."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.limit_concurrency = None  # uvicorn's check off: _ConnectionLimit answers with Retry-After
            self.app = _ConnectionLimit(self.app, self.server_state, config.max_connections)
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(config.header_timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # closed, or a request is in progress (its body has _BodyTimeout)
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request's headers
                self.logger.info("client %s sent no complete request headers in %g s: 408, closed",
                                 client_name(self.client), config.header_timeout_s)
                body = b"request headers not received in time"
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def shutdown(self) -> None:
            super().shutdown()  # idle: closed now; a request in progress: closed after its answer
            if self.cycle is not None and not self.cycle.response_complete:
                self.loop.call_later(_UPLOAD_GRACE_S, self._close_if_uploading)

        def _close_if_uploading(self) -> None:
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.logger.info("shutting down: closed %s, still sending its request", client_name(self.client))
                self.cycle.scope["imgclf.closed"] = True  # not the client's doing: no "left" line
                self.transport.close()

    return Protocol


class _ConnectionLimit:
    """In front of the app, per connection: 503 + Retry-After + close past ``limit`` open connections or
    requests in progress (uvicorn's ``limit_concurrency`` rule, which answers without Retry-After)."""

    def __init__(self, app, state, limit: int):
        self.app, self.state, self.limit = app, state, limit

    async def __call__(self, scope, receive, send):
        # this request's connection and task are already counted
        if scope["type"] == "http" and max(len(self.state.connections), len(self.state.tasks)) > self.limit:
            body = b'{"detail":"busy: too many connections; retry shortly"}'
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                    (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def uvicorn_options(config) -> dict[str, Any]:
    """The options of ``uvicorn.run`` / ``uvicorn.Config`` that carry ``config``'s timeouts and limits:
    ``uvicorn.run(create_app(model, config), port=8000, **uvicorn_options(config))``."""
    return {"http": _protocol_class(config), "timeout_keep_alive": config.keep_alive_s,
            "timeout_graceful_shutdown": config.shutdown_timeout_s}
