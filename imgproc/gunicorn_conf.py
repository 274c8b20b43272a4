"""gunicorn settings for ``make run`` (``gunicorn -c python:imgproc.gunicorn_conf wsgi:app``).

Each worker process builds its own services after the fork (no preload), so every process
has its own Mongo client and thread pool; ``worker_exit`` stops the pool gracefully and
releases leases so another process can take the work at once.
"""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import tempfile
from typing import Any

from imgproc.instance import INSTANCE_DIR_ENV, WORKER_LOCK

bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("IMGPROC_HTTP_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("IMGPROC_HTTP_THREADS", "8"))
timeout = 120
graceful_timeout = int(float(os.environ.get("IMGPROC_SHUTDOWN_GRACE_SECONDS", "20"))) + 10
errorlog = "-"
loglevel = os.environ.get("IMGPROC_LOG_LEVEL", "info").lower()
# gunicorn's own lines (master and workers) as JSON too; the app logs one line per request.
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "imgproc.logs.JsonFormatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
    },
}

# This master's files, in one directory: the instance's worker lock and wake-up socket
# (imgproc.worker.election: the worker processes race for the lock) and, unless the operator
# names a PROMETHEUS_MULTIPROC_DIR, the metric files (prometheus_client keeps each process's
# values there, and a scrape answered by any worker adds them up). Inherited by the workers
# through the environment. ``on_exit`` removes it; a master killed outright cannot, so each
# master removes those of masters that are gone when it starts.
RUN_PREFIX = "imgproc-gunicorn-"
MASTER_FILE = "master"  # the master's pid and start time (a pid alone may be reused)


def _start_time(pid: int) -> str | None:
    """When the process ``pid`` started (field 22 of its /proc stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def sweep(parent: str) -> list[str]:
    """Remove the directories of masters that are gone (Linux only: elsewhere nothing tells
    a dead master from a live one); the paths removed."""
    try:
        names = [name for name in os.listdir(parent) if name.startswith(RUN_PREFIX)]
    except OSError:
        return []  # nothing to sweep, and no reason not to start
    if _start_time(os.getpid()) is None:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, MASTER_FILE)) as master:
                pid, started = master.read().split()
            gone = _start_time(int(pid)) != started
        except (OSError, ValueError):
            continue  # not ours, or another master is making it right now
        if gone and not _locked(os.path.join(path, WORKER_LOCK)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _locked(path: str) -> bool:
    """Whether a process holds the lock file ``path``: one of a master's workers that has
    not noticed yet that its master is gone, or an instance whose processes this one cannot
    see (another PID namespace sharing the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


sweep(tempfile.gettempdir())
_run_dir = tempfile.mkdtemp(prefix=RUN_PREFIX)
_master_file = os.path.join(_run_dir, MASTER_FILE)
with open(_master_file + ".new", "w") as _master:  # renamed whole: never read half-written
    _master.write(f"{os.getpid()} {_start_time(os.getpid())}")
os.replace(_master_file + ".new", _master_file)
os.environ[INSTANCE_DIR_ENV] = _run_dir
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(_run_dir, "metrics")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server: Any) -> None:
    """Start from zero: files of an earlier run would add old counts to the new ones."""
    os.makedirs(_metrics_dir, exist_ok=True)
    for name in os.listdir(_metrics_dir):
        if name.endswith(".db"):
            os.unlink(os.path.join(_metrics_dir, name))


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges (images in flight) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove this master's directory (with the metric files, unless the operator's)."""
    shutil.rmtree(_run_dir, ignore_errors=True)


preload_app = False
# No runtime control socket: it lives at one fixed path per user, so two instances on one
# host (tests, a blue/green restart) would fight over it, and nothing here needs it.
control_socket_disable = True


def _services(worker: Any) -> Any:
    """The worker's imgproc services (``imgproc.services.Services``), or None before its
    app is loaded."""
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("imgproc") if app is not None else None


def post_worker_init(worker: Any) -> None:
    """The worker process is up: it may now run the instance's image worker while it is
    alive (not told to stop), see :attr:`imgproc.worker.election.Election.may_lead`; if it
    does, it leaves HTTP to the other processes.

    What the process has built by now (modules, the app, its services: about 75,000
    objects) lives as long as the process, so it is moved out of the garbage collector's
    sight: a full collection then scans only what came after. Without that, each process
    made one full collection in a 2,000-image batch at 1 s, holding the GIL 25-51 ms (a
    status poll, or every image thread, waited that long); with it, none.
    """
    gc.collect()  # what is garbage already is not kept for good
    gc.freeze()
    services = _services(worker)
    if services is not None:
        services.election.allow(
            lambda: bool(worker.alive), lambda: _leave_http_to_the_others(worker)
        )


def _leave_http_to_the_others(worker: Any) -> None:
    """The process that runs the pipeline takes no new HTTP connections while the instance
    has other worker processes, and closes those it has after their current answer.

    Its GIL is the pipeline's: a status poll answered there waited 40-200 ms for it at the
    start of a batch (its p99 in ``make bench`` at 0.3 s: 159-218 ms, against 32-53 ms when
    the other process answers), and the time spent on HTTP there was the pipeline's (ratio at
    0.3 s 0.78-0.93 against 0.91-1.01). Connections that arrive meanwhile wait in the
    listening socket's backlog for another process, not refused, even while the master
    replaces one that died. Uses the gthread worker's own bounds (gunicorn 27):
    ``test_election`` checks which process answers.
    """
    if worker.cfg.workers < 2:
        return  # the only one: it serves HTTP too
    worker.worker_connections = 0  # it accepts only while it holds fewer connections
    worker.max_keepalived = 0  # it keeps a connection open only while it holds fewer
    queue = getattr(worker, "method_queue", None)
    if queue is not None:
        queue.defer(lambda: None)  # its loop sees both now, not after its 1 s select


def worker_exit(server: Any, worker: Any) -> None:
    """Stop this worker's image pool and release its leases."""
    services = _services(worker)
    if services is not None:
        services.close()
