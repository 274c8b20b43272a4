"""One image worker per instance.

Under gunicorn only one worker process runs the image pipeline: the one holding an
exclusive lock on a file in the instance's directory (made by ``gunicorn_conf`` for this
master, so two instances never share it). The others serve the API; it serves it too only
when it is the instance's one worker process (see ``gunicorn_conf``). Then the bounds an
operator sets hold per instance, not per process: downloads in flight, connections per
host, codec slots, the download buffer. The others wait for the lock; the kernel releases it
when its holder dies, and the next in line starts the pipeline (the dead one's requests come
back to it when their leases expire). An upload served by a process that does not hold the
lock wakes the holder through a datagram socket beside the lock, so work starts at once.

Outside gunicorn (``create_app`` in tests, a single process) there is no directory and the
process runs its worker itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable

from imgproc.instance import WAKE_SOCKET, WORKER_LOCK

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5


class Election:
    """Runs ``start`` in this process once it holds the instance's worker lock."""

    def __init__(
        self, directory: str | None, start: Callable[[], None], wake: Callable[[], None]
    ) -> None:
        self.directory = directory
        self.start = start
        self.wake = wake
        self.leader = False
        # Under gunicorn (a directory): whether this worker process is still meant to run,
        # set by gunicorn_conf once the process is up (the gunicorn worker's ``alive``, False
        # from the moment SIGTERM arrives). Until then the lock is not tried; once it is
        # False the lock is not taken: when an instance stops, its leader gives the lock up
        # as soon as its pipeline has stopped, and a process that is stopping too must not
        # take it and start another pipeline (claiming requests) on its way out.
        self.may_lead: Callable[[], bool] | None = None
        # Called once the lock is ours, before the worker starts (gunicorn_conf: this process
        # then leaves HTTP to the instance's other processes).
        self.on_lead: Callable[[], None] | None = None
        self._ending = threading.Event()
        self._nudge = threading.Event()  # set by allow() and end(): look again now
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._listener: socket.socket | None = None

    @property
    def wake_path(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, WAKE_SOCKET)

    def begin(self) -> None:
        """Run the worker here now (no instance directory), or once the lock is ours."""
        if self.directory is None:
            self.leader = True
            self.start()
            return
        threading.Thread(target=self._campaign, name="imgproc-election", daemon=True).start()

    def allow(self, may_lead: Callable[[], bool], on_lead: Callable[[], None] | None) -> None:
        """The process is up (``gunicorn_conf``): try for the lock now, not at the next
        retry. Uploads are taken from the moment the process answers HTTP; a first lock
        try half a second later left the first request of a fresh instance unclaimed for
        that long (a 400-image batch at 0 s latency ran 15% slower for it)."""
        with self._lock:  # both at once: the campaign reads them under the lock
            self.on_lead = on_lead
            self.may_lead = may_lead
        self._nudge.set()

    def _campaign(self) -> None:
        assert self.directory is not None
        fd = os.open(os.path.join(self.directory, WORKER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        os.set_inheritable(fd, False)
        while not self._ending.is_set():
            try:
                if self.may_lead is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
            except BlockingIOError:
                pass
            self._nudge.wait(RETRY_SECONDS)  # the holder's death shows at the next try
            self._nudge.clear()
        else:
            os.close(fd)
            return
        with self._lock:
            if self._ending.is_set() or not self.may_lead():
                os.close(fd)  # this process is stopping: the lock is for one that is not
                return
            self._fd = fd
            self.leader = True
            if self.on_lead is not None:
                self.on_lead()
            self._listen()
            log.info("this process (pid %d) runs the instance's image worker", os.getpid())
            self.start()

    def _listen(self) -> None:
        """Take wake-ups from the instance's other processes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.wake_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(self.wake_path)
        self._listener = listener

        def receive() -> None:
            while True:
                try:
                    listener.recv(16)
                except OSError:
                    return  # closed
                self.wake()

        threading.Thread(target=receive, name="imgproc-wake", daemon=True).start()

    def notify(self) -> None:
        """Wake the instance's image worker, wherever it runs."""
        if self.leader or self.directory is None:
            self.wake()
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            with contextlib.suppress(OSError):  # no leader yet: it polls when it starts
                sender.sendto(b"!", self.wake_path)

    def end(self) -> None:
        """Stop campaigning and stop taking wake-ups (the lock is kept until :meth:`resign`,
        so no other process starts a worker while this one's is still stopping)."""
        with self._lock:
            self._ending.set()
            self._nudge.set()
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def resign(self) -> None:
        """Give the lock up (once this process's worker has stopped)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
