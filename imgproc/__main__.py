"""Command line: ``python -m imgproc serve`` (what ``make run`` runs), and the client
commands ``submit`` and ``status`` (see :mod:`imgproc.cli`).

``serve`` owns what it starts. The launcher (the process ``make run`` runs) takes the data
directory's lock and forks a supervisor, which starts the embedded database and gunicorn,
and stops gunicorn gracefully and then the database. The launcher only relays Ctrl-C,
SIGTERM and SIGHUP to the supervisor; if the launcher is killed outright, the kernel sends
the supervisor SIGTERM (``PR_SET_PDEATHSIG``), so that stop happens in the same order.
The supervisor's children get SIGTERM the same way should the supervisor itself die.

One launcher per data directory: an exclusive ``flock`` on ``<data dir>/imgproc.lock``,
held through inherited descriptors by every process started, so the directory stays locked
until the last of them has exited.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _on_parent_death(sig: signal.Signals, parent: int) -> bool:
    """Have the kernel send this process ``sig`` when ``parent`` dies (Linux
    ``PR_SET_PDEATHSIG``; a no-op elsewhere); False if ``parent`` is already gone, as the
    signal will then never come. The kernel sends it when the *thread* that forked this
    process ends, so children are started from the main thread."""
    if sys.platform.startswith("linux"):
        _libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == parent


def dies_with_this_process(sig: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child get ``sig`` when this process dies."""
    parent = os.getpid()
    if sys.platform.startswith("linux"):
        _libc()  # loaded here, not between fork and exec

    def preexec() -> None:
        if not _on_parent_death(sig, parent):
            os._exit(1)  # orphaned before it could start: don't

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
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def lock_data_dir(data_dir: str, wait: float, give_up: Callable[[], bool]) -> int:
    """An open descriptor holding an exclusive lock on ``data_dir``, with our pid in it.

    A live owner is refused at once (:class:`DataDirInUse`). An owner that is dead while its
    lock is still held is a launcher that was killed and whose children are still stopping:
    wait up to ``wait`` seconds for them, then refuse.
    """
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        if give_up():
            os.close(fd)
            raise DataDirInUse(f"stopped while waiting for the processes of pid {owner} to exit")
        if time.monotonic() > deadline:
            os.close(fd)
            raise DataDirInUse(
                f"{data_dir} is still in use by the processes of a stopped instance "
                f"(pid {owner}) after {wait:.0f} s; they hold {path} (fuser -v {path})"
            )
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _dying_owner_wait(env: dict[str, str]) -> float:
    """How long a killed launcher's processes may take to stop: gunicorn's graceful timeout
    (the shutdown grace + 10 s, see gunicorn_conf), the database's stop (up to 15 s) and a
    margin."""
    try:
        grace = float(env.get("IMGPROC_SHUTDOWN_GRACE_SECONDS", "20"))
    except ValueError:
        grace = 20.0  # load_settings() reports it
    return grace + 30.0


class Supervisor:
    """The processes ``serve`` starts, and what a stop signal does to them: the first
    SIGINT, SIGTERM or SIGHUP stops gracefully; another SIGINT or SIGTERM kills what is
    left. Repeated SIGHUPs are ignored: closing a terminal may send more than one."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stop_signal: int | None = None
        self.db: embedded_db.EmbeddedDb | None = None
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self._forwarded = False
        for sig in STOP_SIGNALS:
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
                start_new_session=True,  # a group of its own: killpg reaches it and its workers
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


class Relay:
    """The launcher's own part: it passes every stop signal on to the supervisor (which
    decides what it means) and exits with the supervisor's code."""

    def __init__(self) -> None:
        self.early: list[int] = []  # received before there was a supervisor
        self.supervisor: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.supervisor is None:
            self.early.append(signum)
        else:
            os.kill(self.supervisor, signum)

    def stopping(self) -> bool:
        """Whether a stop was asked for before the supervisor started."""
        return bool(self.early)

    def relay_to(self, supervisor: int) -> None:
        """From now on pass signals to ``supervisor``, beginning with any that came early."""
        self.supervisor = supervisor
        for signum in self.early:
            os.kill(supervisor, signum)

    def wait(self) -> int:
        """The supervisor's exit code (128 + n for signal n)."""
        assert self.supervisor is not None
        _, status = os.waitpid(self.supervisor, 0)
        self.supervisor = None  # reaped: its pid may be reused
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code


def _supervise(env: dict[str, str], data_dir: str, lock: int, launcher: int) -> int:
    """The supervisor: runs in a child forked with the stop signals blocked."""
    # A session of its own, so a terminal's Ctrl-C reaches it once, through the launcher.
    os.setsid()
    supervisor = Supervisor()
    if not _on_parent_death(signal.SIGTERM, launcher):
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher is already gone: stop at once
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        return supervisor.run(env, data_dir, lock)
    finally:
        os.close(lock)


def serve() -> int:
    """Start the embedded database (unless MONGODB_URI is set) and gunicorn; stop both,
    whatever ends the launcher."""
    logs.configure(os.environ.get("IMGPROC_LOG_LEVEL", "INFO"))
    env = dict(os.environ)
    data_dir = env.setdefault("IMGPROC_DATA_DIR", "./data")
    relay = Relay()
    try:
        lock = lock_data_dir(data_dir, _dying_owner_wait(env), relay.stopping)
    except DataDirInUse as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot lock the data directory %s: %s", data_dir, exc)
        return 1
    # Blocked across the fork: a signal relayed before the supervisor has its handlers
    # waits for them instead of being lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    launcher = os.getpid()
    supervisor = os.fork()
    if supervisor == 0:
        return _supervise(env, data_dir, lock, launcher)
    os.close(lock)  # the supervisor holds it now, and hands it to every child
    relay.relay_to(supervisor)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return relay.wait()


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
