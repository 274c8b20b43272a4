"""The image pipeline of a process: downloads decoupled from CPU work.

::

    jobs ──add──► scheduler ──► download threads ──► codec threads ──► storage threads ──► job
                  (fair: round   (many: origins      (cores + 2:        (puts, so a slow
                  robin over     take 0.1-1 s to     decode/encode      store never holds
                  requests, then answer; a memory    outside the GIL)   a core)
                  hosts)         budget bounds the
                                 bytes waiting)

Many downloads are in flight (enough to cover a second of origin latency at the rate the
cores compress), so the cores stay busy however slow the hosts are, while decoding and
encoding stay bounded to the cores. Bytes downloaded and not yet stored (the encoded output
stands in for its input until its put is done) are bounded by a memory budget: a download
reserves its body's size before reading it and waits while the budget is spent, so neither
a slow codec nor a hung store piles images up in memory. The scheduler hands out download
slots round robin over the requests in the pipeline, and within a request over its hosts,
never to a host that already has as many connections as it may, or that asked for a pause
(429/503 with Retry-After): a slow or paused host holds back only its own images.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from imgproc import metrics
from imgproc.codec import Encoded
from imgproc.config import Settings
from imgproc.fetcher import Fetched
from imgproc.worker.image_task import ImageTask, ImageWork, RetryLater
from imgproc.worker.plan import Result

log = logging.getLogger(__name__)

STORAGE_THREADS = 16  # puts in flight: GridFS and S3 puts take 10-100 ms each
# The GIL's switch interval in the process that runs the pipeline (Python's default: 5 ms).
# A thread that wants the GIL back (after a socket read, a database round trip, a decode)
# waits up to that long for the holder to be asked to drop it. Measured while this process
# still answered API requests too (as it does when it is an instance's only one), two rounds
# each, same minutes: status polls had a p99 of 100-150 ms with 5 ms, 33-82 ms with 1 ms,
# and the 10,000-row CSV ran at 261 / 263 images/s against 232 / 254.
GIL_SWITCH_SECONDS = 0.001


class ByteBudget:
    """Bytes held by downloads between their first body byte and their output's store (the
    encoded output waiting for storage stands in the downloaded bytes' place, so a slow or
    unreachable store stops the downloads instead of piling outputs up in memory).

    Waiters queue in order and a release wakes only those that now fit: with hundreds of
    downloads waiting, waking them all on every release (a condition's notify_all) would
    spend the GIL on threads that only go back to sleep, and starve the codec of it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, threading.Event]] = deque()
        self._closed = False

    def reserve(self, size: int) -> None:
        """Take ``size`` bytes, waiting in line while they would overrun the budget (one
        download alone may always proceed, so nothing waits for ever)."""
        with self._lock:
            if not self._waiting and self._fits(size):
                self._count_in(size)
                return
            granted = threading.Event()
            self._waiting.append((size, granted))
        granted.wait()  # release() or close() has counted our bytes in

    def grow(self, size: int) -> None:
        """Take ``size`` more bytes for a holder now, without waiting: a body that turned out
        longer than declared (a decoded gzip). Were holders to wait for their growth, they
        could all wait on one another, the bytes they hold never coming back."""
        with self._lock:
            self._count_in(size)

    def close(self) -> None:
        """Let every waiter in, now and from now on: the process is stopping, and the work
        that would have released their room may be cancelled."""
        with self._lock:
            self._closed = True
            self._admit_waiting()

    def release(self, size: int) -> None:
        """Give ``size`` bytes back, and let in whoever waits first, while they fit."""
        if not size:
            return
        with self._lock:
            self.used -= size
            metrics.BUFFERED_BYTES.dec(size)
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Let waiters in, first come first, while they fit. Called with the lock held."""
        while self._waiting and self._fits(self._waiting[0][0]):
            wanted, granted = self._waiting.popleft()
            self._count_in(wanted)
            granted.set()

    def _count_in(self, size: int) -> None:
        self.used += size
        metrics.BUFFERED_BYTES.inc(size)

    def _fits(self, size: int) -> bool:
        return self._closed or not self.used or self.used + size <= self.limit


def host_of(url: str) -> str:
    """The origin a URL's connection goes to (what the per-host limit counts)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url


@dataclass
class _Lane:
    """One job's place in the pipeline: its waiting tasks by host, and what it has out."""

    deliver: Callable[[Result], None]
    halted: Callable[[], bool]
    # Waiting tasks by host, each with its download deadline (set when it first starts).
    hosts: OrderedDict[str, deque[tuple[ImageTask, float | None]]] = field(
        default_factory=OrderedDict
    )
    queued: int = 0
    outstanding: int = 0  # queued + in flight, until the result is delivered


class Pipeline:
    """Runs image tasks for all jobs of the process."""

    def __init__(self, settings: Settings, work: ImageWork) -> None:
        self.settings = settings
        self.work = work
        self.budget = ByteBudget(settings.buffer_bytes)
        self.per_host = settings.connections_per_host
        self._free = settings.download_slots
        self._downloads = ThreadPoolExecutor(
            settings.download_slots, thread_name_prefix="imgproc-download"
        )
        self._codec = ThreadPoolExecutor(
            settings.codec_slots, thread_name_prefix="imgproc-codec", initializer=self._nice
        )
        self._storage = ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="imgproc-store")
        self._changed = threading.Condition()
        self._lanes: OrderedDict[Hashable, _Lane] = OrderedDict()
        self._busy: Counter[str] = Counter()  # connections per host now
        self._paused: dict[str, float] = {}  # host -> monotonic time it may be asked again
        self._closed = False
        self._scheduler = threading.Thread(
            target=self._schedule, name="imgproc-scheduler", daemon=True
        )
        self._scheduler.start()
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_SECONDS))

    def _nice(self) -> None:
        """Codec threads yield the CPU to API requests and the database (Linux: per thread)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.settings.worker_nice)
        except OSError as exc:  # not Linux, or not allowed: run at normal priority
            log.debug("could not lower the codec threads' priority: %s", exc)

    # ---- what jobs call -------------------------------------------------------------------

    def attach(
        self, key: Hashable, deliver: Callable[[Result], None], halted: Callable[[], bool]
    ) -> None:
        """Give a job a lane; its results go to ``deliver``."""
        with self._changed:
            self._lanes[key] = _Lane(deliver, halted)

    def detach(self, key: Hashable) -> None:
        """Remove a job's lane (its queued tasks are dropped; late results are discarded)."""
        with self._changed:
            self._lanes.pop(key, None)

    def add(self, key: Hashable, tasks: list[ImageTask]) -> None:
        """Queue tasks of the job ``key`` (a page at once, so its hosts take turns)."""
        with self._changed:
            lane = self._lanes[key]
            for task in tasks:
                lane.hosts.setdefault(host_of(task.url), deque()).append((task, None))
            lane.queued += len(tasks)
            lane.outstanding += len(tasks)
            self._changed.notify()

    def queued(self, key: Hashable) -> int:
        """Tasks of the job waiting for a download slot."""
        with self._changed:
            lane = self._lanes.get(key)
            return lane.queued if lane else 0

    def outstanding(self, key: Hashable) -> int:
        """Tasks of the job not yet delivered (queued or in flight)."""
        with self._changed:
            lane = self._lanes.get(key)
            return lane.outstanding if lane else 0

    def drop_queued(self, key: Hashable) -> int:
        """Drop the job's tasks that have not started (they stay open for the next claim)."""
        with self._changed:
            lane = self._lanes.get(key)
            if lane is None:
                return 0
            dropped = lane.queued
            lane.hosts.clear()
            lane.outstanding -= dropped
            lane.queued = 0
            return dropped

    def close(self) -> None:
        """Stop scheduling; queued work is dropped, work in flight finishes on its own."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for pool in (self._downloads, self._codec, self._storage):
            pool.shutdown(wait=False, cancel_futures=True)
        self.budget.close()  # downloads waiting for room that cancelled work would free

    # ---- the scheduler --------------------------------------------------------------------

    def _schedule(self) -> None:
        while True:
            with self._changed:
                picked = None
                while not self._closed:
                    picked = self._pick()
                    if picked is not None:
                        break
                    self._changed.wait(self._next_unpause())
                if picked is None:
                    return
                key, lane, host, task, deadline = picked
                self._free -= 1
                self._busy[host] += 1
            try:
                self._downloads.submit(self._download, key, lane, host, task, deadline)
            except RuntimeError:  # closed meanwhile
                return

    def _pick(self) -> tuple[Hashable, _Lane, str, ImageTask, float | None] | None:
        """The next task to download: requests in turn, hosts in turn within a request,
        skipping hosts at their limit or paused. Called with the lock held."""
        if self._free <= 0:
            return None
        now = time.monotonic()
        for key, lane in list(self._lanes.items()):
            for host, tasks in list(lane.hosts.items()):
                if self._busy[host] >= self.per_host or self._paused.get(host, 0.0) > now:
                    continue
                task, deadline = tasks.popleft()
                if tasks:
                    lane.hosts.move_to_end(host)  # its other hosts go first next time
                else:
                    del lane.hosts[host]
                lane.queued -= 1
                self._lanes.move_to_end(key)  # the other requests go first next time
                return key, lane, host, task, deadline
        return None

    def _next_unpause(self) -> float | None:
        """Seconds until the first paused host may be asked again (None: none is paused)."""
        now = time.monotonic()
        for host, until in list(self._paused.items()):
            if until <= now:
                del self._paused[host]
        if not self._paused:
            return None
        return max(0.01, min(self._paused.values()) - now)

    def _slot_free(self, host: str) -> None:
        with self._changed:
            self._free += 1
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            self._changed.notify()

    # ---- the stages -----------------------------------------------------------------------

    def _download(
        self, key: Hashable, lane: _Lane, host: str, task: ImageTask, deadline: float | None
    ) -> None:
        if deadline is None:  # its first try: a pause a host asks for must fit before this
            deadline = time.monotonic() + self.settings.download_deadline
        metrics.IN_FLIGHT.inc()
        try:
            got = self.work.download(task, lane.halted, self.budget, deadline)
        except RetryLater as pause:
            self._retry_later(key, lane, host, task, deadline, pause)
            metrics.IN_FLIGHT.dec()
            return
        finally:
            self._slot_free(host)
        if isinstance(got, Result):
            self._deliver(lane, got)
            return
        if not self._submit(self._codec, lane, task, self._compress, lane, task, got):
            self.budget.release(got.reserved)

    def _retry_later(
        self,
        key: Hashable,
        lane: _Lane,
        host: str,
        task: ImageTask,
        deadline: float,
        pause: RetryLater,
    ) -> None:
        log.info("%s asked for a pause of %.1f s (%s)", host, pause.seconds, pause.reason)
        with self._changed:
            until = time.monotonic() + pause.seconds
            self._paused[host] = max(self._paused.get(host, 0.0), until)
            if self._lanes.get(key) is lane and not lane.halted():
                tasks = lane.hosts.setdefault(host, deque())
                tasks.appendleft((task, deadline))
                lane.queued += 1
                self._changed.notify()
                return
            lane.outstanding -= 1  # the job is gone or stopping: the image stays open

    def _compress(self, lane: _Lane, task: ImageTask, fetched: Fetched) -> None:
        stored = False
        try:
            got = self.work.compress(task, fetched.data, lane.halted)
            if isinstance(got, Result):
                self._deliver(lane, got)
                return
            size = len(fetched.data)
            stored = self._submit(
                self._storage, lane, task, self._store, lane, task, size, fetched.reserved, got
            )
        finally:
            if not stored:
                self.budget.release(fetched.reserved)

    def _store(
        self, lane: _Lane, task: ImageTask, input_bytes: int, reserved: int, encoded: Encoded
    ) -> None:
        try:
            result = self.work.store_output(task, input_bytes, encoded, lane.halted)
        finally:
            self.budget.release(reserved)
        self._deliver(lane, result)

    def _submit(
        self,
        pool: ThreadPoolExecutor,
        lane: _Lane,
        task: ImageTask,
        stage: Callable[..., None],
        *args: object,
    ) -> bool:
        """Hand the image to its next stage; False when the process is stopping (the image
        then stays open)."""
        try:
            pool.submit(stage, *args)
            return True
        except RuntimeError:
            self._deliver(lane, task.ended(None))
            return False

    def _deliver(self, lane: _Lane, result: Result) -> None:
        """Hand the result to its job, then count it delivered (in that order: a job that
        sees nothing outstanding finds every result in its queue)."""
        metrics.IN_FLIGHT.dec()
        if result.outcome is not None:
            metrics.image_finished(result.outcome.fields())
        lane.deliver(result)
        with self._changed:
            lane.outstanding -= 1
