"""The files of one instance (one gunicorn master and its worker processes), named once.

The master (``gunicorn_conf``) makes their directory, removes those of masters that are
gone, and hands the directory to its workers in the environment; the workers
(``imgproc.worker.election``) race for the lock file in it and wake its holder through the
socket there. This module imports nothing, so the master need not load the worker package
(Pillow, the pipeline) to know the names.
"""

INSTANCE_DIR_ENV = "_IMGPROC_INSTANCE_DIR"  # set by gunicorn_conf for its workers
WORKER_LOCK = "worker.lock"  # held by the one worker process that runs the pipeline
WAKE_SOCKET = "wake.sock"  # where the other processes wake it
