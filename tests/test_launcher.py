"""The launcher leaves nothing behind: whatever ends ``python -m imgproc serve`` (what
``make run`` runs), every process it started ends within seconds; one launcher per data
directory. Real processes and real signals, sent to the launcher only (not its group)."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from pytest_httpserver import HTTPServer

from imgproc import embedded_db
from imgproc.embedded_db import free_port
from tests.conftest import csv_bytes, make_image, serve
from tests.processes import (
    ROOT,
    Service,
    descendants,
    spawn_process,
    start_process,
    upload_http,
    wait_gone,
    wait_healthy,
    wait_terminal_http,
)

pytestmark = pytest.mark.slow

SERVE = [sys.executable, "-m", "imgproc", "serve"]
GONE_WITHIN = 15.0  # seconds from the signal until every process the launcher started is gone


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``serve`` with its own embedded database in a fresh data directory."""
    monkeypatch.delenv("MONGODB_URI", raising=False)
    return {
        "IMGPROC_DATA_DIR": str(tmp_path / "data"),
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_HTTP_WORKERS": "1",
    }


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def db_port(log: Path) -> int:
    """The embedded database's port, from the launcher's log."""
    ports = re.findall(r"mongodb://127\.0\.0\.1:(\d+)", log.read_text())
    assert ports, log.read_text()
    return int(ports[-1])


def log_text(service: Service) -> str:
    return service.log.read_text()


def started_by(service: Service) -> set[int]:
    """The processes the launcher started: supervisor, database, gunicorn and its worker."""
    pids = descendants(service.process.pid)
    assert len(pids) >= 4, pids
    return pids


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_stop_signal_ends_everything_the_launcher_started(
    signum: signal.Signals, env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    service = start_process(SERVE, env, log, free_port())
    try:
        port = db_port(log)
        pids = started_by(service)

        os.kill(service.process.pid, signum)
        took = wait_gone(pids, GONE_WITHIN)

        assert service.process.wait(GONE_WITHIN) == 0  # a graceful stop, asked for
        assert not port_open(port)
        print(f"{signum.name}: all {len(pids)} processes gone in {took:.2f} s")
    finally:
        service.stop()


def test_after_sigkill_of_the_launcher_a_new_one_starts_on_the_same_data(
    image_host: HTTPServer, env: dict[str, str], tmp_path: Path
) -> None:
    first = start_process(SERVE, env, tmp_path / "first.log", free_port())
    second: Service | None = None
    try:
        url = serve(image_host, "/a.jpg", make_image())
        request_id = upload_http(first.url, csv_bytes([(1, "A", [url])]))
        assert wait_terminal_http(first.url, request_id)["status"] == "completed"
        port = db_port(first.log)
        pids = started_by(first)

        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(5)
        # Started at once: it waits for the dying processes to let go of the directory.
        second = spawn_process(SERVE, env, tmp_path / "second.log", free_port())
        took = wait_gone(pids, GONE_WITHIN)
        print(f"SIGKILL: all {len(pids)} processes gone in {took:.2f} s")
        assert not port_open(port)

        wait_healthy(second.url, second.process, second.log)
        status = requests.get(f"{second.url}/csv/status/{request_id}", timeout=10)
        assert status.status_code == 200
        assert status.json()["status"] == "completed"  # the earlier data, intact
        assert second.terminate() == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_dead_owners_lock_is_waited_for_then_taken_and_a_second_launcher_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = Path(env["IMGPROC_DATA_DIR"])
    data.mkdir()
    owner = subprocess.Popen(["true"])
    owner.wait()
    lock = data / "imgproc.lock"
    lock.write_text(f"{owner.pid}{' ' * 20}\n")  # a launcher that was killed ...
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # ... and whose children are still stopping
    first = spawn_process(SERVE, env, tmp_path / "first.log", free_port())
    try:
        deadline = time.monotonic() + 20
        while f"for the processes of stopped pid {owner.pid} to exit" not in log_text(first):
            assert first.process.poll() is None, log_text(first)
            assert time.monotonic() < deadline, log_text(first)
            time.sleep(0.1)
        assert "embedded MongoDB" not in log_text(first)  # nothing started meanwhile
        os.close(held)  # the last of them has exited
        held = -1
        wait_healthy(first.url, first.process, first.log)

        started = time.monotonic()
        second = subprocess.run(
            SERVE,
            cwd=ROOT,
            env={**os.environ, **env, "PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=30,
        )
        took = time.monotonic() - started
        assert second.returncode == 1
        lines = (second.stdout + second.stderr).splitlines()
        assert len(lines) == 1, lines
        pid = first.process.pid
        assert f"{data} is in use by another running instance (pid {pid})" in lines[0]
        assert took < 10
        assert requests.get(f"{first.url}/healthz", timeout=5).status_code == 200
        assert first.terminate() == 0
    finally:
        first.stop()
        if held >= 0:
            os.close(held)


def test_a_database_that_does_not_start_is_one_line_and_a_non_zero_exit(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = Path(env["IMGPROC_DATA_DIR"])
    squatter = embedded_db.start(str(data / "db"))  # holds the database files' own lock
    try:
        result = subprocess.run(
            SERVE,
            cwd=ROOT,
            env={**os.environ, **env, "PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        squatter.stop()
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert "the embedded database did not start: secantusd-py exited with 1" in lines[0]
    assert str(data / "secantusd.log") in lines[0]
    assert "Traceback" not in result.stderr
