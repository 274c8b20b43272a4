"""gunicorn settings for ``make run`` (``gunicorn -c python:imgproc.gunicorn_conf wsgi:app``).

Each worker process builds its own services after the fork (no preload), so every process
has its own Mongo client and thread pool; ``worker_exit`` stops the pool gracefully and
releases leases so another process can take the work at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

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

# Metrics of all worker processes: prometheus_client keeps each process's values in files
# here, and a scrape answered by any worker adds them up. Set before a worker imports it.
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imgproc-metrics-")
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]

# One image worker per instance (imgproc.worker.election): the worker processes of this
# master race for a lock file here; inherited by the workers through the environment.
_instance_dir = tempfile.mkdtemp(prefix="imgproc-instance-")
os.environ["_IMGPROC_INSTANCE_DIR"] = _instance_dir


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
    """Remove the metrics directory if it was made here, and the instance directory."""
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
    shutil.rmtree(_instance_dir, ignore_errors=True)


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
    does, it leaves HTTP to the other processes."""
    services = _services(worker)
    if services is not None:
        services.election.may_lead = lambda: bool(worker.alive)
        services.election.on_lead = lambda: _leave_http_to_the_others(worker)


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
