"""Command line: ``python -m imgproc serve`` (what ``make run`` runs), and the client
commands ``submit`` and ``status`` (see :mod:`imgproc.cli`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from types import FrameType

from imgproc import cli, embedded_db, logs
from imgproc.config import ConfigError, load_settings

log = logging.getLogger("imgproc.serve")


def serve() -> int:
    """Start the embedded database (unless MONGODB_URI is set) and gunicorn; stop both."""
    logs.configure(os.environ.get("IMGPROC_LOG_LEVEL", "INFO"))
    env = dict(os.environ)
    data_dir = env.setdefault("IMGPROC_DATA_DIR", "./data")
    db: embedded_db.EmbeddedDb | None = None
    if not env.get("MONGODB_URI"):
        db_path = os.path.join(data_dir, "db")
        db = embedded_db.start(db_path, log_path=os.path.join(data_dir, "secantusd.log"))
        env["MONGODB_URI"] = db.uri
        log.info("embedded MongoDB server (SecantusDB) at %s, data in %s", db.uri, db_path)
    try:
        os.environ.update(env)
        load_settings()  # a bad setting stops here with a clear message
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        if db:
            db.stop()
        return 2
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:imgproc.gunicorn_conf", "wsgi:app"],
        env=env,
        start_new_session=True,
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        gunicorn.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    log.info("serving on http://127.0.0.1:%s", env.get("PORT", "8000"))
    try:
        code = gunicorn.wait()
    finally:
        if gunicorn.poll() is None:
            gunicorn.kill()
        if db:
            db.stop()
    return 0 if code in (0, -signal.SIGTERM) else code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m imgproc``."""
    parser = argparse.ArgumentParser(prog="python -m imgproc")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service (embedded database unless MONGODB_URI)")
    cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve()
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
