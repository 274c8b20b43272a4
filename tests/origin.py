"""A real HTTP/1.1 image origin for tests of the download pipeline: keep-alive connections,
a latency before each answer, scripted statuses (503 with Retry-After, ...), and a record of
what it saw: every request with its connection and time, and the most requests it was
answering at once."""

from __future__ import annotations

import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Seen:
    """One request as the origin saw it."""

    path: str
    connection: int
    at: float
    status: int


@dataclass
class Route:
    """What a path answers: ``statuses`` in turn (then 200 for good), after ``latency``."""

    body: bytes
    latency: float = 0.0
    statuses: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)


class Origin:
    """A threaded keep-alive HTTP/1.1 server on 127.0.0.1 serving registered routes."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()
        self._connections = 0
        origin = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with origin._lock:
                    origin._connections += 1
                    connection = origin._connections
                while True:
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    path = line.split(b" ")[1].decode() if b" " in line else ""
                    while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass  # headers
                    self.wfile.write(origin._answer(path, connection))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 512

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(
        self,
        path: str,
        body: bytes,
        latency: float = 0.0,
        statuses: list[tuple[int, dict[str, str]]] | None = None,
    ) -> str:
        """Serve ``body`` at ``path``; its absolute URL."""
        self.routes[path] = Route(body, latency, deque(statuses or []))
        return self.url + path

    def _answer(self, path: str, connection: int) -> bytes:
        route = self.routes.get(path)
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            status, headers = (200, {})
            if route is None:
                status = 404
            elif route.statuses:
                status, headers = route.statuses.popleft()
            self.seen.append(Seen(path, connection, time.monotonic(), status))
        try:
            if route is not None and route.latency:
                time.sleep(route.latency)
            body = route.body if route is not None and status == 200 else b"no"
            head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
            head += ["Content-Type: image/jpeg"] + [f"{k}: {v}" for k, v in headers.items()]
            return ("\r\n".join(head) + "\r\n\r\n").encode() + body
        finally:
            with self._lock:
                self.active -= 1

    def connections(self) -> int:
        """How many TCP connections were opened to the origin."""
        return self._connections

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
