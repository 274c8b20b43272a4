"""Command line: ``python -m imgproc serve`` (what ``make run`` runs), and the client
commands ``submit`` and ``status`` (see :mod:`imgproc.cli`).

``serve`` owns what it starts: Ctrl-C, SIGTERM or SIGHUP stop gunicorn gracefully and then
the embedded database; if the launcher itself is killed, the kernel sends its children
SIGTERM (``PR_SET_PDEATHSIG``). One launcher per data directory: it holds an exclusive
``flock`` on ``<data dir>/imgproc.lock``, and so does every process it starts, so the
directory stays locked until the last of them has exited.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from imgproc import cli, embedded_db, logs
from imgproc.config import ConfigError, load_settings

log = logging.getLogger("imgproc.serve")

LOCK_FILE = "imgproc.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DataDirInUse(Exception):
    """Another instance, or the processes of one that was killed, use the data directory."""


def dies_with_this_process(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get ``sig`` when this process dies (Linux
    ``PR_SET_PDEATHSIG``; None elsewhere). The kernel sends it when the *thread* that forked
    the child ends, so start children from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        # If the parent died before prctl, the signal will never come: don't start at all.
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[:1] not in ([b"Z"], [b"X"])
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _owner(fd: int) -> int | None:
    """The launcher pid written in the lock file, if any."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


def lock_data_dir(data_dir: str, wait: float, give_up: Callable[[], bool]) -> int:
    """An open descriptor holding an exclusive lock on ``data_dir``, with our pid in it.

    A live owner is refused at once (:class:`DataDirInUse`). An owner that is dead while its
    lock is still held is a launcher that was killed and whose children are still stopping:
    wait up to ``wait`` seconds for them, then refuse.
    """
    os.makedirs(data_dir, exist_ok=True)
    fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline: float | None = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            owner = _owner(fd)
        if owner is None or _alive(owner):
            os.close(fd)
            pid = f" (pid {owner})" if owner else ""
            raise DataDirInUse(
                f"{data_dir} is in use by another running instance{pid}; "
                "stop it first or set IMGPROC_DATA_DIR"
            )
        if deadline is None:
            deadline = time.monotonic() + wait
            log.info(
                "waiting up to %.0f s for the processes of stopped pid %s to exit", wait, owner
            )
        if time.monotonic() > deadline or give_up():
            os.close(fd)
            raise DataDirInUse(
                f"{data_dir} is still in use by the processes of a stopped instance "
                f"(pid {owner}) after {wait:.0f} s; see /proc/locks or lsof {LOCK_FILE}"
            )
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _dying_owner_wait(env: dict[str, str]) -> float:
    """How long a killed launcher's children may take to stop: gunicorn's graceful timeout
    (the shutdown grace + 10 s, see gunicorn_conf) and a margin."""
    try:
        grace = float(env.get("IMGPROC_SHUTDOWN_GRACE_SECONDS", "20"))
    except ValueError:
        grace = 20.0  # load_settings() reports it
    return grace + 15.0


class Launcher:
    """The processes ``serve`` starts, and what a signal to the launcher does to them: the
    first SIGINT, SIGTERM or SIGHUP stops gracefully; another SIGINT or SIGTERM kills what
    is left. Repeated SIGHUPs are ignored: closing a terminal may send more than one."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stop_signal: int | None = None
        self.db: embedded_db.EmbeddedDb | None = None
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self._forwarded = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def stopping(self) -> bool:
        """Whether a stop was asked for."""
        return self.stop_signal is not None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.pid:  # a child between fork and exec
            return
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = signum
            log.info("%s: stopping gunicorn gracefully, then the database", name)
            self._forward()
        elif signum != signal.SIGHUP:
            log.warning("%s again: killing what is left", name)
            self._kill()

    def _forward(self) -> None:
        """SIGTERM to gunicorn (a graceful stop), once."""
        if self.gunicorn is not None and not self._forwarded:
            self._forwarded = True
            self.gunicorn.send_signal(signal.SIGTERM)

    def _kill(self) -> None:
        if self.gunicorn is not None and self.gunicorn.returncode is None:
            try:
                os.killpg(self.gunicorn.pid, signal.SIGKILL)  # master and workers
            except ProcessLookupError:
                pass
        if self.db is not None and self.db.process.returncode is None:
            self.db.process.kill()

    def run(self, env: dict[str, str], data_dir: str, lock: int) -> int:
        """Start the database (unless MONGODB_URI) and gunicorn, each holding ``lock`` and
        tied to this process; wait for gunicorn; stop the database last. The exit code."""
        try:
            if not env.get("MONGODB_URI"):
                db_path = os.path.join(data_dir, "db")
                try:
                    self.db = embedded_db.start(
                        db_path,
                        log_path=os.path.join(data_dir, "secantusd.log"),
                        pass_fds=(lock,),
                        preexec_fn=dies_with_this_process(signal.SIGTERM),
                    )
                except embedded_db.EmbeddedDbError as exc:
                    log.error("the embedded database did not start: %s", exc)
                    return 1
                env["MONGODB_URI"] = self.db.uri
                log.info(
                    "embedded MongoDB server (SecantusDB) at %s, data in %s", self.db.uri, db_path
                )
            try:
                os.environ.update(env)
                load_settings()  # a bad setting stops here with a clear message
            except ConfigError as exc:
                log.error("configuration error: %s", exc)
                return 2
            if self.stopping():
                return 0
            self.gunicorn = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:imgproc.gunicorn_conf",
                    "wsgi:app",
                ],
                env=env,
                start_new_session=True,  # Ctrl-C reaches only the launcher, which stops it
                pass_fds=(lock,),
                preexec_fn=dies_with_this_process(signal.SIGTERM),  # graceful, as on Ctrl-C
            )
            if self.stopping():
                self._forward()  # the signal came while gunicorn was being started
            log.info("serving on http://127.0.0.1:%s", env.get("PORT", "8000"))
            code = self.gunicorn.wait()
        finally:
            if self.gunicorn is not None and self.gunicorn.poll() is None:
                os.killpg(self.gunicorn.pid, signal.SIGKILL)
                self.gunicorn.wait()
            if self.db is not None:
                self.db.stop()
        if code in (0, -signal.SIGTERM):
            return 0
        return 128 - code if code < 0 else code


def serve() -> int:
    """Start the embedded database (unless MONGODB_URI is set) and gunicorn; stop both,
    whatever ends the launcher."""
    logs.configure(os.environ.get("IMGPROC_LOG_LEVEL", "INFO"))
    env = dict(os.environ)
    data_dir = env.setdefault("IMGPROC_DATA_DIR", "./data")
    launcher = Launcher()
    try:
        lock = lock_data_dir(data_dir, _dying_owner_wait(env), launcher.stopping)
    except DataDirInUse as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot lock the data directory %s: %s", data_dir, exc)
        return 1
    try:
        return launcher.run(env, data_dir, lock)
    finally:
        os.close(lock)


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
