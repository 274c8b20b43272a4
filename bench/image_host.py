"""The benchmarks' image host: a remote origin simulated on loopback.

Real catalogues keep images on origins and CDNs whose first byte takes 0.1-1 s. The host
waits ``latency`` seconds before the first byte of every response (per request, on every
keep-alive connection, as an origin miss behaves), then sends a prebuilt response from
memory. It is one asyncio event loop in its own thread: a waiting request is a timer, not
a thread, so hundreds of connections cost little CPU and the host never becomes the
bottleneck it simulates (``python bench/image_host.py`` measures that).

Paths: an exact path given in ``images``; ``/pool/<tag>/<n>.jpg`` is ``pool[n % len(pool)]``
(any tag, so each benchmark phase has URLs of its own over the same bytes);
``/small/<anything>`` is the small image; anything else is a 404.

Usage: python bench/image_host.py [--connections 300] [--latency 1.0] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MISSING = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def http_response(data: bytes) -> bytes:
    """A complete HTTP/1.1 200 response carrying a JPEG."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class HostCounters:
    """What the host saw since the last :meth:`ImageHost.reset`."""

    requests: int = 0
    not_found: int = 0
    connections: int = 0
    open_connections: int = 0
    peak_connections: int = 0
    waiting: int = 0
    peak_waiting: int = 0
    cpu_at_reset: float = 0.0


class ImageHost:
    """A keep-alive HTTP/1.1 image server on 127.0.0.1 with a time to first byte.

    ``latency`` may be changed between phases; it applies to requests that arrive after.
    Used as a context manager that yields the base URL.
    """

    def __init__(
        self,
        images: Mapping[str, bytes] | None = None,
        small: bytes = b"",
        *,
        pool: Sequence[bytes] = (),
        latency: float = 0.0,
    ) -> None:
        self.latency = latency
        self._exact = {path: http_response(data) for path, data in (images or {}).items()}
        self._pool = [http_response(data) for data in pool]
        self._small = http_response(small)
        self.counters = HostCounters()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._native_id = 0
        self.url = ""

    def route(self, path: str) -> bytes:
        """The prebuilt response for ``path`` (a 404 for an unknown one)."""
        found = self._exact.get(path)
        if found is not None:
            return found
        if path.startswith("/small/"):
            return self._small
        if path.startswith("/pool/") and path.endswith(".jpg") and self._pool:
            number = path[path.rfind("/") + 1 : -4]
            if number.isdigit() and path.count("/") == 3:
                return self._pool[int(number) % len(self._pool)]
        return MISSING

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # self.counters, never a local: reset() replaces it while connections stay open.
        self.counters.connections += 1
        self.counters.open_connections += 1
        self.counters.peak_connections = max(
            self.counters.peak_connections, self.counters.open_connections
        )
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head[: head.find(b"\r\n")].split(b" ")
                response = self.route(parts[1].decode("latin-1") if len(parts) > 2 else "")
                self.counters.requests += 1
                self.counters.not_found += response is MISSING
                if self.latency > 0:
                    await self._wait(self.latency)
                writer.write(response)
                await writer.drain()
                if b"\r\nconnection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away, or sent no HTTP
        except asyncio.CancelledError:
            # The host is stopping with the connection open. Ending here instead of as
            # cancelled spares Python 3.11's stream callback, which calls exception() on
            # the cancelled task and logs a CancelledError traceback per connection.
            pass
        finally:
            self.counters.open_connections -= 1
            writer.close()

    async def _wait(self, latency: float) -> None:
        """The time to first byte; counted as one request waiting."""
        self.counters.waiting += 1
        self.counters.peak_waiting = max(self.counters.peak_waiting, self.counters.waiting)
        try:
            await asyncio.sleep(latency)
        finally:
            self.counters.waiting -= 1

    def cpu_seconds(self) -> float:
        """CPU seconds the host's thread has used since it started."""
        return thread_cpu_seconds(self._native_id)

    def reset(self) -> HostCounters:
        """Start counting afresh (between phases); returns the counters so far."""

        async def swap() -> HostCounters:  # in the loop's thread, between two of its steps
            previous = self.counters
            self.counters = HostCounters(
                open_connections=previous.open_connections,
                peak_connections=previous.open_connections,
                waiting=previous.waiting,
                cpu_at_reset=self.cpu_seconds(),
            )
            return previous

        return asyncio.run_coroutine_threadsafe(swap(), self._loop).result(10)

    def report(self) -> dict[str, float]:
        """Requests, connections, peak parallelism and CPU since the last reset."""
        counters = self.counters
        return {
            "requests": counters.requests,
            "not_found": counters.not_found,
            "connections": counters.connections,
            "peak_connections": counters.peak_connections,
            "peak_waiting": counters.peak_waiting,
            "cpu_s": round(self.cpu_seconds() - counters.cpu_at_reset, 2),
        }

    def __enter__(self) -> str:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.url = started.result(10)
        return self.url

    async def _start(self) -> str:
        self._native_id = threading.get_native_id()
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, backlog=4096, reuse_address=True
        )
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# ---- capacity check: a load generator in another process --------------------------------


async def _client_connection(
    host: str, port: int, path: str, until: float, ttfb: list[float], finished: list[float]
) -> None:
    """One keep-alive connection sending GETs back to back until ``until``; responses read."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        while time.monotonic() < until:
            sent = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            ttfb.append(time.monotonic() - sent)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            finished.append(time.monotonic())
    finally:
        writer.close()


async def load(url: str, connections: int, seconds: float) -> dict[str, float]:
    """Requests/s over the window from the first response to the end, and TTFB p50/p99."""
    host, port = url.removeprefix("http://").split(":")
    until = time.monotonic() + seconds
    ttfb: list[float] = []
    finished: list[float] = []
    await asyncio.gather(
        *(
            _client_connection(host, int(port), f"/pool/load/{n}.jpg", until, ttfb, finished)
            for n in range(connections)
        )
    )
    ttfb.sort()
    in_window = [t for t in finished if t <= until]
    return {
        "responses": len(finished),
        "requests_per_s": round((len(in_window) - 1) / (until - in_window[0]), 1),
        "ttfb_p50_ms": round(1000 * ttfb[len(ttfb) // 2], 1),
        "ttfb_p99_ms": round(1000 * ttfb[int(len(ttfb) * 0.99)], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=60, help="distinct images served")
    parser.add_argument("--client", nargs=3, metavar=("URL", "CONNECTIONS", "SECONDS"))
    args = parser.parse_args()
    if args.client:
        url, connections, seconds = args.client
        print(json.dumps(asyncio.run(load(url, int(connections), float(seconds)))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from photos import catalogue_images

    pool = catalogue_images(args.images)
    host = ImageHost(pool=pool, latency=args.latency)
    with host as url:
        cpu_before = host.cpu_seconds()
        started = time.monotonic()
        client = subprocess.run(
            [sys.executable, __file__, "--client", url, str(args.connections), str(args.seconds)],
            capture_output=True,
            text=True,
            check=True,
        )
        host_cpu = host.cpu_seconds() - cpu_before
        elapsed = time.monotonic() - started  # includes the client's start-up (idle host)
        counters = host.report()
    figures = json.loads(client.stdout)
    mean_bytes = sum(map(len, pool)) / len(pool)
    result = {
        "connections": args.connections,
        "latency_s": args.latency,
        "mean_image_kb": round(mean_bytes / 1024),
        **figures,
        "ideal_requests_per_s": round(args.connections / args.latency, 1) if args.latency else None,
        "host_peak_waiting": counters["peak_waiting"],
        "host_cpu_s": round(host_cpu, 2),
        "host_cpu_share_of_one_core": round(host_cpu / elapsed, 3),
        "host_cpu_ms_per_request": round(1000 * host_cpu / figures["responses"], 3),
    }
    for key, value in result.items():
        print(f"{key:<28}{value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
