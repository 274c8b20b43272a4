"""Start and stop the embedded MongoDB wire-protocol server (SecantusDB) as its own process.

SecantusDB is GPL-2.0 and beta, so it is only ever run as a separate program
(``secantusd-py`` from the virtual environment); nothing here imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass


class EmbeddedDbError(RuntimeError):
    """The embedded server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_program() -> str:
    """Path of ``secantusd-py`` next to this interpreter, else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "secantusd-py")
    found = beside if os.path.exists(beside) else shutil.which("secantusd-py")
    if not found:
        raise EmbeddedDbError("secantusd-py not found: install requirements.txt (SecantusDB)")
    return found


@dataclass
class EmbeddedDb:
    """A running embedded server."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def uri(self) -> str:
        """The MongoDB URI to connect to it."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not go in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _last_line(path: str, start: int) -> str:
    """The last non-empty line written to ``path`` after offset ``start`` ("" if none)."""
    try:
        with open(path, "rb") as log:
            log.seek(start)
            lines = log.read()[-4096:].decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]


def start(
    storage_path: str,
    *,
    port: int | None = None,
    log_path: str | None = None,
    timeout: float = 60.0,
    pass_fds: Collection[int] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> EmbeddedDb:
    """Start a server on 127.0.0.1 and wait until it accepts connections.

    ``pass_fds`` and ``preexec_fn`` go to :class:`subprocess.Popen` (the launcher passes its
    data directory lock and ties the server's life to its own). Every failure to start is an
    :class:`EmbeddedDbError`, one line with the server's last log line and the log's path.
    """
    port = port or free_port()
    log_path = log_path or os.devnull
    try:
        if storage_path != ":memory:":
            os.makedirs(storage_path, exist_ok=True)
        with open(log_path, "ab") as log:
            log_start = log.tell()
            process = subprocess.Popen(
                [
                    server_program(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--storage-path",
                    storage_path,
                    "--log-level",
                    "WARNING",
                    # A standalone server, not a one-node replica set: nothing here uses
                    # change streams or transactions, and without the replica-set machinery
                    # every write costs this Python server about a third less CPU. Writes
                    # stay journaled (w: majority, j: true) and survive a SIGKILL.
                    "--standalone",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops us last
                pass_fds=tuple(pass_fds),
                preexec_fn=preexec_fn,
            )
    except OSError as exc:
        raise EmbeddedDbError(f"cannot start secantusd-py: {exc}") from exc
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if process.poll() is not None:
            tail = _last_line(log_path, log_start)
            raise EmbeddedDbError(
                f"secantusd-py exited with {process.returncode}"
                + (f" ({tail})" if tail else "")
                + f"; full log in {log_path}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise EmbeddedDbError(
                f"secantusd-py did not listen on port {port} in {timeout} s; see {log_path}"
            )
        time.sleep(0.1)
    return EmbeddedDb(process, port, log_path)
