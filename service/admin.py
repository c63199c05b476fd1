"""The admin listener: `GET /healthz`, `/readyz` and `/metrics` on a port of their own
(`RERANK_ADMIN_PORT`), served by a stdlib HTTP server on threads of its own.

Why: the rerank requests and the main port's probes share one asyncio event loop. Under
overload the probes queue behind thousands of requests and go unanswered, so an
orchestrator restarts a replica that is merely busy (and its load lands on the others),
and scrapes time out exactly when the metrics matter. These threads block in the kernel,
not on the loop, and need the GIL only for the few microseconds of an answer: they
answer while the loop is saturated or blocked.

The answers are the main port's, from the same code: `Runtime.readiness()` (plain
attribute reads, safe from any thread) and `Runtime.exposition()` (every worker's
metrics in multiprocess mode).

With `--workers N > 1` every worker runs the app's lifespan and so opens this listener:
the socket is bound with SO_REUSEPORT, every worker listens on the same port and the
kernel spreads the connections over them. /healthz and /metrics answer the same from any
worker (metrics are aggregated over the workers); /readyz is the readiness of the worker
that answered. SO_REUSEPORT also lets another process of the same user share the port
silently, so a single worker binds without it and a taken port is a warning. A port that
cannot be bound never stops the service: it serves on without the admin listener.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import orjson

from service.settings import Settings

log = logging.getLogger("service.admin")


class Probed(Protocol):
    """What the admin listener reads: the app's Runtime."""

    settings: Settings

    def readiness(self) -> dict[str, Any]: ...

    def exposition(self) -> tuple[bytes, str]: ...


class _Handler(BaseHTTPRequestHandler):
    """One probe or scrape; the runtime is the server's."""

    server: AdminServer
    timeout = 10  # s: a client that stalls mid-request does not hold its thread for ever
    server_version, sys_version = "gref-serve-admin", ""  # no Python version in headers

    def do_GET(self) -> None:
        runtime = self.server.runtime
        path = self.path.partition("?")[0]
        if path == "/healthz":
            self._send(200, orjson.dumps({"status": "alive"}), "application/json")
        elif path == "/readyz":
            body = runtime.readiness()
            self._send(200 if body["ready"] else 503, orjson.dumps(body), "application/json")
        elif path == "/metrics":
            self._send(200, *runtime.exposition())
        else:
            self._send(404, orjson.dumps({"error": "not_found", "message": path}),
                       "application/json")  # fmt: skip

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """The service's logging (JSON lines), not raw stderr; a probe a second is noise."""
        log.debug(format, *args)


class AdminServer(ThreadingHTTPServer):
    """The listener, bound at construction (raises OSError); `start()` serves it on a daemon
    thread, `close()` stops it. Port 0 binds a free port (`port` says which)."""

    daemon_threads = True  # a stuck client never holds the process at exit

    def __init__(self, runtime: Probed, host: str, port: int, reuse_port: bool) -> None:
        self.runtime, self.reuse_port = runtime, reuse_port
        # the host's family: uvicorn takes IPv6 hosts ("::") too
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="admin", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def server_bind(self) -> None:
        if self.reuse_port:  # before bind(): the workers share the port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # TCPServer's, not HTTPServer's: its getfqdn() of the host may wait on DNS
        socketserver.TCPServer.server_bind(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An answer that failed (mostly a client that hung up): logged, not raw stderr."""
        log.warning("admin listener: answering %s failed", client_address, exc_info=True)

    def start(self) -> AdminServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (waits up to serve_forever's 0.5 s poll), close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def start_admin(runtime: Probed) -> AdminServer | None:
    """The settings' admin listener, serving; None when admin_port is 0, or when the port
    cannot be bound (a warning: the service runs on without it)."""
    s = runtime.settings
    if s.admin_port == 0:
        return None
    try:
        server = AdminServer(runtime, s.host, s.admin_port, reuse_port=s.workers > 1)
    except OSError as e:
        log.warning("admin listener off: cannot listen on %s:%d (%s); /healthz, /readyz and "
                    "/metrics answer on the main port only", s.host, s.admin_port, e)  # fmt: skip
        return None
    log.info("admin listener (/healthz, /readyz, /metrics) on %s:%d", s.host, server.port)
    return server.start()
