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
encoding stay bounded to the cores. How many of the download slots are in use follows the
origins (:class:`DownloadDepth`): every one on slow origins, a few on fast ones, where a
burst of hundreds of finished downloads would only take the GIL from the codec. Bytes
downloaded and not yet stored (the encoded output stands in for its input until its put is
done) are bounded by a memory budget: a download reserves its body's size before reading it
and waits while the budget is spent, so neither a slow codec nor a hung store piles images
up in memory. The scheduler hands out download slots round robin over the requests in the
pipeline, and within a request over its hosts, never to a host that already has as many
connections as it may, or that asked for a pause (429/503 with Retry-After): a slow or
paused host holds back only its own images.
"""

from __future__ import annotations

import itertools
import logging
import math
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


class DownloadDepth:
    """How many images may be downloading, or downloaded and waiting for a codec thread.

    Enough downloads in flight to cover twice the time a download takes at the rate the
    codec takes images (Little's law), plus two images per codec thread ready for it; never
    more than the slots. The rate is what the codec threads manage by the time an image
    takes them, and at least ``min_rate`` (the cores' rate on catalogue images, or the slots
    when fewer): at a second of latency every slot is in use, at 0.3 s about a third of
    them. On fast origins a few are: were every slot
    used there, hundreds of downloads would finish in a burst, their threads taking the GIL
    from the codec threads (which need it to start and end each image) and their bytes
    piling up in memory.

    The time a download takes is its smoothed time (quickly up, slowly down), or the age of
    the oldest download in flight when that is longer: the pipeline deepens while the first
    answers are awaited, and at once when a host turns slow, not one latency later.
    Not thread-safe: the pipeline calls it holding its lock.
    """

    RISE = 0.5
    FALL = 0.05
    CODEC_WEIGHT = 0.1

    def __init__(self, slots: int, codec_threads: int, min_rate: float) -> None:
        self.slots = slots
        self.codec_threads = codec_threads
        self.min_rate = min_rate
        self.waiting = 2 * codec_threads
        self.ready = 0  # downloaded, not yet taken by a codec thread
        self.fetch_seconds: float | None = None  # smoothed; None until a download is measured
        self.codec_seconds: float | None = None  # smoothed time of an image in a codec thread
        self._since: OrderedDict[int, float] = OrderedDict()  # in flight: started, oldest first
        self._tokens = itertools.count()

    @property
    def in_flight(self) -> int:
        """Downloads started and not ended."""
        return len(self._since)

    def started(self, now: float) -> int:
        """Count a download in; the token is for :meth:`ended`."""
        token = next(self._tokens)
        self._since[token] = now
        return token

    def ended(self, token: int, now: float, *, to_codec: bool) -> None:
        """Count a download out; ``to_codec``: its image now waits for a codec thread."""
        seconds = now - self._since.pop(token)
        if not to_codec:
            return
        self.ready += 1
        rising = self.fetch_seconds is not None and seconds > self.fetch_seconds
        self.fetch_seconds = _smoothed(
            self.fetch_seconds, seconds, self.RISE if rising else self.FALL
        )

    def taken(self) -> None:
        """A codec thread took a downloaded image."""
        self.ready -= 1

    def compressed(self, seconds: float) -> None:
        """A codec thread spent ``seconds`` on an image."""
        self.codec_seconds = _smoothed(self.codec_seconds, seconds, self.CODEC_WEIGHT)

    @property
    def rate(self) -> float:
        """Images a second the codec takes, as far as the depth is concerned."""
        if not self.codec_seconds:
            return self.min_rate
        return max(self.min_rate, self.codec_threads / self.codec_seconds)

    def limit(self, now: float) -> int:
        """Images that may be downloading or waiting for the codec now."""
        seconds = max(self.fetch_seconds or 0.0, self._oldest_age(now))
        return min(self.slots, self.waiting + math.ceil(2 * self.rate * seconds))

    def admits(self, now: float) -> bool:
        """True when another download may start now."""
        return self.in_flight + self.ready < self.limit(now)

    def admits_in(self, now: float) -> float | None:
        """Seconds until another download may start as the oldest one ages, if nothing
        else changes (0: now; None: never by waiting alone: nothing in flight to age, or
        the depth is at the slots already)."""
        if self.admits(now):
            return 0.0
        wanted = self.in_flight + self.ready + 1
        if not self._since or wanted > self.slots:
            return None
        needed = (wanted - self.waiting) / (2 * self.rate)
        return max(0.001, needed - self._oldest_age(now))

    def _oldest_age(self, now: float) -> float:
        return now - next(iter(self._since.values())) if self._since else 0.0


def _smoothed(average: float | None, sample: float, weight: float) -> float:
    """An exponentially weighted average moved ``weight`` of the way to ``sample`` (the
    first sample stands for itself)."""
    return sample if average is None else average + weight * (sample - average)


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
        self._depth = DownloadDepth(
            settings.download_slots, settings.codec_slots, settings.codec_rate_floor
        )
        self._held_by_depth = False  # the scheduler waits because the depth admits no more
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
                    now = time.monotonic()  # one clock for both: no step of the depth between
                    picked = self._pick(now)
                    if picked is not None:
                        break
                    self._changed.wait(self._next_wake(now))
                if picked is None:
                    return
                key, lane, host, task, deadline = picked
                self._free -= 1
                self._busy[host] += 1
                token = self._depth.started(now)
            try:
                self._downloads.submit(self._download, key, lane, host, task, deadline, token)
            except RuntimeError:  # closed meanwhile
                return

    def _pick(self, now: float) -> tuple[Hashable, _Lane, str, ImageTask, float | None] | None:
        """The next task to download: requests in turn, hosts in turn within a request,
        skipping hosts at their limit or paused. Called with the lock held."""
        self._held_by_depth = False
        if self._free <= 0:
            return None  # a download's end wakes the scheduler
        self._held_by_depth = not self._depth.admits(now)
        if self._held_by_depth:
            return None
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

    def _next_wake(self, now: float) -> float | None:
        """Seconds until the scheduler may find work without being told: the first paused
        host may be asked again, or the depth it waits for grows as the oldest download
        ages (None: neither)."""
        for host, until in list(self._paused.items()):
            if until <= now:
                del self._paused[host]
        waits = [max(0.01, min(self._paused.values()) - now)] if self._paused else []
        deepens = self._depth.admits_in(now) if self._held_by_depth else None
        if deepens is not None:
            waits.append(deepens)
        return min(waits, default=None)

    def _slot_free(self, host: str, token: int, to_codec: bool) -> None:
        """A download ended; ``to_codec``: its image waits for a codec thread from now (in
        the same breath, so that the scheduler never sees it in neither place)."""
        with self._changed:
            held = self._free <= 0 or self._busy[host] >= self.per_host
            self._free += 1
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            self._depth.ended(token, time.monotonic(), to_codec=to_codec)
            if held:
                self._changed.notify()
            else:
                self._depth_changed()

    def _depth_changed(self) -> None:
        """Wake the scheduler if it waits for the depth and the depth now admits another
        download. Only then: a wake it sleeps through again costs the codec threads a turn
        at the GIL, and the depth changes several times an image. Called with the lock held.
        """
        if self._held_by_depth and self._depth.admits(time.monotonic()):
            self._held_by_depth = False
            self._changed.notify()

    def _codec_took_one(self) -> None:
        """A codec thread took a downloaded image: room for another download."""
        with self._changed:
            self._depth.taken()
            self._depth_changed()

    # ---- the stages -----------------------------------------------------------------------

    def _download(
        self,
        key: Hashable,
        lane: _Lane,
        host: str,
        task: ImageTask,
        deadline: float | None,
        token: int,
    ) -> None:
        if deadline is None:  # its first try: a pause a host asks for must fit before this
            deadline = time.monotonic() + self.settings.download_deadline
        metrics.IN_FLIGHT.inc()
        got: Result | Fetched | None = None
        try:
            got = self.work.download(task, lane.halted, self.budget, deadline)
        except RetryLater as pause:
            self._retry_later(key, lane, host, task, deadline, pause)
            metrics.IN_FLIGHT.dec()
            return
        finally:
            self._slot_free(host, token, to_codec=isinstance(got, Fetched))
        if isinstance(got, Result):
            self._deliver(lane, got)
            return
        submitted = False
        try:
            submitted = self._submit(self._codec, lane, task, self._compress, lane, task, got)
        finally:
            if not submitted:
                self._codec_took_one()
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
        self._codec_took_one()
        started = time.monotonic()
        try:
            got = self.work.compress(task, fetched.data, lane.halted)
            with self._changed:
                self._depth.compressed(time.monotonic() - started)
                self._depth_changed()
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
