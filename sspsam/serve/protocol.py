"""uvicorn's HTTP/1.1 protocol with a deadline for the request head.

uvicorn times out idle keep-alive connections but not a client that opens a connection and sends
its request line and headers a byte at a time: a few hundred of those hold every socket the
process may open (slowloris). The deadline here closes a connection whose head is not complete
within ``header_timeout`` seconds of the connection (or of the previous response). Slow bodies are
bounded separately, by the app's body timeout.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(header_timeout: float) -> type[H11Protocol]:
    class TimedH11Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request head: a slow or dead client

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str) -> None:  # type: ignore[override]
            """uvicorn answers a malformed request (a negative Content-Length, a broken header) in
            plain text; every answer of this service is JSON, so clients parse one shape."""
            import json
            import uuid

            body = json.dumps({"error": {"code": "bad_request", "message": f"invalid HTTP request: {msg}",
                                         "request_id": uuid.uuid4().hex}}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol
