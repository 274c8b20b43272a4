"""gunicorn settings for ``make run`` (``gunicorn -c python:imgproc.gunicorn_conf wsgi:app``).

Each worker process builds its own services after the fork (no preload), so every process
has its own Mongo client and thread pool; ``worker_exit`` stops the pool gracefully and
releases leases so another process can take the work at once.
"""

from __future__ import annotations

import os
from typing import Any

bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("IMGPROC_HTTP_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("IMGPROC_HTTP_THREADS", "8"))
timeout = 120
graceful_timeout = int(float(os.environ.get("IMGPROC_SHUTDOWN_GRACE_SECONDS", "20"))) + 10
errorlog = "-"
loglevel = os.environ.get("IMGPROC_LOG_LEVEL", "info").lower()
preload_app = False
# No runtime control socket: it lives at one fixed path per user, so two instances on one
# host (tests, a blue/green restart) would fight over it, and nothing here needs it.
control_socket_disable = True


def worker_exit(server: Any, worker: Any) -> None:
    """Stop this worker's image pool and release its leases."""
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("imgproc") if app is not None else None
    if services is not None:
        services.close()
