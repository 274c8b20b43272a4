"""The process's image pipeline: a pool of image threads shared by every job, a bound on
images queued or in flight, and CPU slots for decoding and encoding."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from imgproc.config import Settings
from imgproc.worker.image_task import ImageTask, ImageWork
from imgproc.worker.plan import Result

log = logging.getLogger(__name__)


class Pipeline:
    """Runs image tasks for all jobs of the process."""

    def __init__(self, settings: Settings, make_work: Callable[[threading.Semaphore], ImageWork]):
        self.settings = settings
        # Decoding and encoding run outside the GIL. One image per core, plus one so that a
        # core never waits while another image is in the Python parts of the codec, keeps
        # the cores busy without thrashing them; the other threads download meanwhile.
        self.cpu = threading.BoundedSemaphore(settings.cpu_slots or (os.cpu_count() or 1) + 1)
        self.work = make_work(self.cpu)
        self._places = threading.BoundedSemaphore(settings.workers * 2)
        self._executor = ThreadPoolExecutor(
            settings.workers, thread_name_prefix="imgproc", initializer=self._lower_priority
        )

    def _lower_priority(self) -> None:
        """Image threads yield the CPU to API requests and the database (Linux: per thread)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.settings.worker_nice)
        except OSError as exc:  # not Linux, or not allowed: run at normal priority
            log.debug("could not lower the image threads' priority: %s", exc)

    def submit(
        self,
        task: ImageTask,
        deliver: Callable[[Result], None],
        halted: Callable[[], bool],
        timeout: float,
    ) -> Future[None] | None:
        """Queue ``task`` if a place frees up within ``timeout`` (None otherwise). Unless the
        returned future is cancelled before it starts, ``deliver`` gets its one result."""
        if not self._places.acquire(timeout=timeout):
            return None
        try:
            future = self._executor.submit(self._run, task, deliver, halted)
        except BaseException:
            self._places.release()
            raise
        future.add_done_callback(lambda _future: self._places.release())
        return future

    def _run(
        self, task: ImageTask, deliver: Callable[[Result], None], halted: Callable[[], bool]
    ) -> None:
        deliver(self.work.run(task, halted))

    def shutdown(self) -> None:
        """Drop queued tasks; threads still running finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
