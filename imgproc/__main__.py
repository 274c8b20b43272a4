"""Command line: ``python -m imgproc serve`` (what ``make run`` runs)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from types import FrameType

from imgproc import embedded_db
from imgproc.config import ConfigError, load_settings


def serve() -> int:
    """Start the embedded database (unless MONGODB_URI is set) and gunicorn; stop both."""
    env = dict(os.environ)
    data_dir = env.setdefault("IMGPROC_DATA_DIR", "./data")
    db: embedded_db.EmbeddedDb | None = None
    if not env.get("MONGODB_URI"):
        db_path = os.path.join(data_dir, "db")
        db = embedded_db.start(db_path, log_path=os.path.join(data_dir, "secantusd.log"))
        env["MONGODB_URI"] = db.uri
        print(
            f"imgproc: embedded MongoDB server (SecantusDB) at {db.uri}, data in {db_path}",
            flush=True,
        )
    try:
        os.environ.update(env)
        load_settings()  # a bad setting stops here with a clear message
    except ConfigError as exc:
        print(f"imgproc: configuration error: {exc}", file=sys.stderr)
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
    print(f"imgproc: serving on http://127.0.0.1:{env.get('PORT', '8000')}", flush=True)
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
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
