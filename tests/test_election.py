"""One image worker per instance: of a gunicorn's worker processes exactly one runs the
pipeline (so its bounds hold per instance); an upload served by any of them starts at once;
when the one running it dies, another takes over and the batch completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer

from imgproc.worker import election
from imgproc.worker.election import Election
from tests.conftest import csv_bytes, make_image, serve, serve_slowly
from tests.processes import (
    Service,
    descendants,
    start_gunicorn,
    upload_http,
    wait_gone,
    wait_images_done,
    wait_terminal_http,
)
from tests.test_worker_recovery import service_env

pytestmark = pytest.mark.slow

LEADS = "runs the instance's image worker"


def logged_by(service: Service, text: str) -> list[int]:
    """The pids of the service's log lines that contain ``text``, in order."""
    lines = service.log.read_text().splitlines()
    return [int(json.loads(line)["pid"]) for line in lines if text in line]


def leaders(service: Service) -> list[int]:
    """The pids that logged taking the instance's worker lock, in order."""
    return logged_by(service, LEADS)


def wait_leaders(service: Service, count: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(found := leaders(service)) < count:
        assert time.monotonic() < deadline, f"{count} leaders expected, saw {found}"
        time.sleep(0.05)
    return found


def test_one_process_runs_the_work_and_any_process_starts_it(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    # A poll of a minute: only the wake-up from the process that took the upload can start
    # the work within seconds.
    env = {
        **service_env(mongo_uri, db_name, tmp_path / "data"),
        "IMGPROC_HTTP_WORKERS": "3",
        "IMGPROC_POLL_SECONDS": "60",
    }
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        (leader,) = wait_leaders(service, 1)
        url = serve(image_host, "/e.jpg", make_image())
        for attempt in range(6):  # fresh connections: the three processes share them out
            asked = time.monotonic()
            created = requests.post(
                f"{service.url}/csv/upload",
                files={"file": ("p.csv", csv_bytes([(1, f"A{attempt}", [url])]))},
                headers={"Connection": "close"},
                timeout=10,
            )
            body = wait_terminal_http(service.url, created.json()["request_id"], timeout=10)
            assert body["status"] == "completed"
            assert time.monotonic() - asked < 15  # woken, not found by the minute's poll
        time.sleep(0.5)
        assert leaders(service) == [leader]  # still the one, no other ever started
        started = [line for line in service.log.read_text().splitlines() if "in flight" in line]
        assert len(started) == 1  # one pipeline in the instance
    finally:
        service.stop()


def test_the_process_running_the_work_leaves_http_to_the_others(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    # Its GIL is the pipeline's: status polls answered there waited for it (make bench, at
    # 0.3 s: status p99 159-218 ms there, 32-53 ms in the other process).
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_HTTP_WORKERS": "3"}
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        (leader,) = wait_leaders(service, 1)
        url = serve(image_host, "/l.jpg", make_image())
        request_id = upload_http(service.url, csv_bytes([(1, "A", [url])]))
        assert wait_terminal_http(service.url, request_id, timeout=10)["status"] == "completed"
        status = f"{service.url}/csv/status/{request_id}"
        with requests.Session() as kept:  # one connection kept alive, and fresh ones
            for _ in range(12):
                assert kept.get(status, timeout=10).status_code == 200
                fresh = requests.get(status, headers={"Connection": "close"}, timeout=10)
                assert fresh.status_code == 200
        time.sleep(0.2)  # the last lines are written
        answers = logged_by(service, '"GET /csv/status/')  # the per-request log lines
        assert len(answers) >= 24
        assert leader not in answers, f"the leader {leader} answered: {answers}"
        assert leaders(service) == [leader]  # and it still runs the work
    finally:
        service.stop()


def test_another_process_takes_over_when_the_one_running_the_work_dies(
    image_host: HTTPServer, mongo_uri: str, db_name: str, mongo: Any, tmp_path: Path
) -> None:
    paths = [f"/t{i}.jpg" for i in range(16)]
    serve_slowly(image_host, paths, 0.3)
    env = {
        **service_env(mongo_uri, db_name, tmp_path / "data"),
        "IMGPROC_HTTP_WORKERS": "2",
        "IMGPROC_DOWNLOADS": "2",
    }
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        (first,) = wait_leaders(service, 1)
        rows = [(i + 1, f"P{i}", [image_host.url_for(p)]) for i, p in enumerate(paths)]
        created = requests.post(
            f"{service.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        request_id = created.json()["request_id"]
        wait_images_done(service.url, request_id, 2)
        os.kill(first, signal.SIGKILL)  # the process running the pipeline, not the instance

        _first, second = wait_leaders(service, 2)
        assert second != first
        body = wait_terminal_http(service.url, request_id, timeout=60)
        assert body["status"] == "completed"
        assert body["progress"]["images_done"] == 16
        assert mongo.processing_requests.count_documents({}) == 1
    finally:
        service.stop()


def test_a_graceful_stop_starts_no_second_pipeline(
    mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    # On SIGTERM every worker process stops; the one running the pipeline gives its lock up
    # once the pipeline has stopped, and the others must not take it and start one then.
    for attempt in range(4):  # the stops race: a few instances make a miss unlikely
        env = {
            **service_env(mongo_uri, db_name, tmp_path / f"data{attempt}"),
            "IMGPROC_HTTP_WORKERS": "4",
        }
        service = start_gunicorn(env, tmp_path / f"service{attempt}.log")
        try:
            wait_leaders(service, 1)
            assert service.terminate() == 0
            log = service.log.read_text().splitlines()
            assert len(leaders(service)) == 1, f"stop {attempt}: {leaders(service)}"
            assert len([line for line in log if "in flight" in line]) == 1
        finally:
            service.stop()


def run_dirs(parent: str) -> dict[int, str]:
    """The directories of gunicorn masters under ``parent``, by master pid."""
    found = {}
    for path in Path(parent).glob("imgproc-gunicorn-*"):
        pid, _started = (path / "master").read_text().split()
        found[int(pid)] = str(path)
    return found


def test_a_killed_masters_files_are_removed_by_the_next_master(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    # A master killed outright cannot remove its directory (the worker lock, the wake-up
    # socket, the metric files): every SIGKILL left two directories in /tmp for good. The
    # next master started on the host removes those of masters that are gone, and only those.
    parent = tempfile.mkdtemp(prefix="g", dir="/tmp")  # short: a socket's path has 108 bytes
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "TMPDIR": parent}
    env["IMGPROC_HTTP_WORKERS"] = "2"
    env["IMGPROC_POLL_SECONDS"] = "60"  # work starts within seconds only if woken
    started: list[Service] = []
    try:
        for name in ("killed", "alive"):
            started.append(start_gunicorn(env, tmp_path / f"{name}.log"))
            wait_leaders(started[-1], 1)
        killed, alive = started
        assert set(run_dirs(parent)) == {killed.process.pid, alive.process.pid}
        processes = descendants(killed.process.pid) | {killed.process.pid}
        killed.kill()
        wait_gone(processes, 10)
        assert killed.process.pid in run_dirs(parent)  # nothing removed it

        started.append(start_gunicorn(env, tmp_path / "next.log"))
        following = started[-1]
        assert set(run_dirs(parent)) == {alive.process.pid, following.process.pid}
        # The live instance's files are intact: alone on the database now, its worker is
        # woken through the socket there by the upload the other process answers (within
        # seconds, not the minute's poll), and its stop removes them.
        wait_leaders(following, 1)
        assert following.terminate() == 0
        url = serve(image_host, "/k.jpg", make_image())
        request_id = upload_http(alive.url, csv_bytes([(1, "A", [url])]))
        assert wait_terminal_http(alive.url, request_id, timeout=10)["status"] == "completed"
        assert len(leaders(alive)) == 1
        assert alive.terminate() == 0
        assert run_dirs(parent) == {}
    finally:
        for service in started:
            service.stop()
        shutil.rmtree(parent, ignore_errors=True)


def test_a_process_that_is_up_tries_for_the_lock_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh instance answers uploads from the moment its processes are up; the first lock
    # try used to wait for the next retry, leaving the first request unclaimed for up to
    # half a second. With a minute between retries, only an immediate try starts in time.
    monkeypatch.setattr(election, "RETRY_SECONDS", 60.0)
    directory = tempfile.mkdtemp(prefix="g", dir="/tmp")  # short: the wake-up socket's path
    started = threading.Event()
    chosen = Election(directory, started.set, lambda: None)
    try:
        chosen.begin()  # campaigning, not yet allowed: the process is not up
        assert not started.wait(0.3)
        chosen.allow(lambda: True, None)
        assert started.wait(10), "the lock was not tried when the process came up"
        assert chosen.leader
    finally:
        chosen.end()
        chosen.resign()
        shutil.rmtree(directory, ignore_errors=True)


def campaign_of(begin: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """The election thread that ``begin`` starts."""
    threads: list[threading.Thread] = []
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        threads.append(thread)
        start(thread)

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", recorded)
        begin()
    (thread,) = threads
    return thread


def test_a_process_told_to_stop_stops_campaigning_at_once_and_leaves_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(election, "RETRY_SECONDS", 60.0)
    directory = tempfile.mkdtemp(prefix="g", dir="/tmp")
    started = threading.Event()
    never_up = Election(directory, started.set, lambda: None)
    stopping = Election(directory, started.set, lambda: None)
    other = Election(directory, lambda: None, lambda: None)
    try:
        campaign = campaign_of(never_up.begin, monkeypatch)
        assert not started.wait(0.3)  # campaigning: waiting for the process to be up
        never_up.end()  # told to stop before it was up: it stops now, not in a minute
        campaign.join(5)
        assert not campaign.is_alive()
        stopping.allow(lambda: False, None)  # up, but already told to stop
        campaign = campaign_of(stopping.begin, monkeypatch)
        campaign.join(5)
        assert not campaign.is_alive()
        other.allow(lambda: True, None)
        other.begin()
        deadline = time.monotonic() + 10
        while not other.leader:
            assert time.monotonic() < deadline, "the lock was kept by a process that stopped"
            time.sleep(0.01)
        assert not started.is_set() and not never_up.leader and not stopping.leader
    finally:
        for one in (never_up, stopping, other):
            one.end()
            one.resign()
        shutil.rmtree(directory, ignore_errors=True)
