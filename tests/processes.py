"""Real service processes for end-to-end tests: gunicorn as ``make run`` starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from imgproc.embedded_db import free_port
from imgproc.models import TERMINAL_REQUEST

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    """A running service process group and its base URL."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers), like a crash."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Make sure nothing is left running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0
) -> None:
    """Wait until ``url/healthz`` answers 200; fail with the log if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited with {process.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"service not healthy in {timeout}s:\n{log.read_text()}")


def start_process(args: list[str], env: dict[str, str], log: Path, port: int) -> Service:
    """Start ``args`` in its own process group with ``env`` added; wait until healthy."""
    full_env = {**os.environ, **env, "PORT": str(port)}
    with log.open("ab") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    return Service(process, url, log)


def start_gunicorn(env: dict[str, str], log: Path) -> Service:
    """gunicorn with the project's config, as ``make run`` serves the app."""
    args = [sys.executable, "-m", "gunicorn", "-c", "python:imgproc.gunicorn_conf", "wsgi:app"]
    return start_process(args, env, log, free_port())


def upload_http(url: str, csv: bytes) -> str:
    """POST a CSV to a running service; the new request's id (a 202 or the test fails)."""
    created = requests.post(f"{url}/csv/upload", files={"file": ("p.csv", csv)}, timeout=10)
    assert created.status_code == 202, created.text[:300]
    return str(created.json()["request_id"])


def wait_terminal_http(url: str, request_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll a running service's status until the request is terminal (a non-200 answer, as
    during a database outage, is polled past); fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        reply = requests.get(f"{url}/csv/status/{request_id}", timeout=10)
        if reply.status_code == 200 and reply.json()["status"] in TERMINAL_REQUEST:
            body: dict[str, Any] = reply.json()
            return body
        assert time.monotonic() < deadline, f"{request_id} not terminal: {reply.text[:300]}"
        time.sleep(0.1)


def wait_images_done(url: str, request_id: str, count: int, timeout: float = 30) -> None:
    """Poll a running service's status until at least ``count`` images are done; fail the
    test at the timeout (the service made no progress)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = requests.get(f"{url}/csv/status/{request_id}", timeout=5)
        if reply.json()["progress"]["images_done"] >= count:
            return
        assert time.monotonic() < deadline, f"{request_id}: fewer than {count} images done"
        time.sleep(0.05)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found.add(child)
                todo.append(child)
    return {child for child in found if not gone(child)}


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (no such process, or a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pids: set[int], timeout: float) -> float:
    """Seconds until every one of ``pids`` has exited; fail the test at the timeout. A pid
    seen gone once stays gone (it may be reused by a new process meanwhile)."""
    started = time.monotonic()
    left = set(pids)
    while True:
        left = {pid for pid in left if not gone(pid)}
        elapsed = time.monotonic() - started
        if not left:
            return elapsed
        assert elapsed < timeout, f"still running after {timeout}s: {sorted(left)}"
        time.sleep(0.05)


def spawn_process(args: list[str], env: dict[str, str], log: Path, port: int) -> Service:
    """Like :func:`start_process`, without waiting for it to be healthy."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **env, "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Service(process, f"http://127.0.0.1:{port}", log)
