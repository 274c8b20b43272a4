"""The download pipeline on real origins: connections per host bounded and reused, a
Retry-After honoured without holding a slot, a slow host never holding back another,
requests sharing the pipe, downloads in flight following the origins' latency, and the
memory budget for downloaded bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from imgproc.worker.pipeline import ByteBudget, DownloadDepth
from tests.conftest import csv_bytes, make_image, upload, wait_terminal
from tests.origin import Origin

IMAGE = make_image(120, 80)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


@pytest.fixture
def other_origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


def submit(client: FlaskClient, urls: list[str], per_row: int = 1) -> str:
    rows = [
        (n + 1, f"P{n}", urls[start : start + per_row])
        for n, start in enumerate(range(0, len(urls), per_row))
    ]
    response = upload(client, csv_bytes(rows))
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def images_done(client: FlaskClient, request_id: str) -> int:
    body = client.get(f"/csv/status/{request_id}?limit=1").get_json()
    return int(body["progress"]["images_done"])


def test_connections_to_one_host_never_exceed_the_limit_and_are_reused(
    make_app: Callable[..., Flask], origin: Origin, other_origin: Origin
) -> None:
    client = make_app(downloads=32, max_connections_per_host=3).test_client()
    slow = [origin.route(f"/a{i}.jpg", IMAGE, latency=0.15) for i in range(24)]
    fast = [other_origin.route(f"/b{i}.jpg", IMAGE, latency=0.15) for i in range(24)]
    body = wait_terminal(client, submit(client, slow + fast, per_row=4), timeout=60)

    assert body["progress"]["images_done"] == 48
    for host in (origin, other_origin):
        assert host.most_active == 3  # the limit, and all of it used
        assert host.connections() <= 6  # kept alive and reused, not one per image
        assert len(host.seen) == 24


def test_retry_after_is_honoured_and_the_host_is_left_alone_meanwhile(
    make_app: Callable[..., Flask], origin: Origin, other_origin: Origin
) -> None:
    client = make_app(downloads=8, max_connections_per_host=2, download_deadline=10.0)
    client = client.test_client()
    busy = origin.route("/busy.jpg", IMAGE, statuses=[(503, {"Retry-After": "1"})])
    queued = [origin.route(f"/q{i}.jpg", IMAGE, latency=0.05) for i in range(6)]
    later = other_origin.route("/later.jpg", IMAGE, statuses=[(429, {"Retry-After": "60"})])
    body = wait_terminal(client, submit(client, [busy, *queued, later]), timeout=30)

    images = [p["images"][0] for p in body["products"]]
    assert [i["status"] for i in images[:7]] == ["done"] * 7
    assert images[7]["error"] == "HTTP 429"  # a pause past the download deadline: failed
    assert len(other_origin.seen) == 1  # ...and not asked again
    paused = next(s for s in origin.seen if s.status == 503).at
    retried = next(s for s in origin.seen if s.path == "/busy.jpg" and s.status == 200).at
    assert retried - paused >= 0.95
    # The host's other queued images waited out the pause too: nothing asked of it while
    # it was paused (the one request already in flight when the 503 came aside).
    assert not [s for s in origin.seen if 0.1 < s.at - paused < 0.95]


def test_a_slow_host_does_not_hold_back_another(
    make_app: Callable[..., Flask], origin: Origin, other_origin: Origin
) -> None:
    client = make_app(downloads=8).test_client()
    slow = [origin.route(f"/s{i}.jpg", IMAGE, latency=3.0) for i in range(24)]
    fast = [other_origin.route(f"/f{i}.jpg", IMAGE) for i in range(6)]
    request_id = submit(client, slow + fast, per_row=6)  # slow images first in the file

    deadline = time.monotonic() + 30
    while images_done(client, request_id) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Done before the slow host could have answered anything: no slow image held them back.
    first_slow_answer = min(s.at for s in origin.seen) + 3.0
    assert time.monotonic() < first_slow_answer
    assert max(s.at for s in other_origin.seen) < first_slow_answer


def test_requests_share_the_pipe_and_a_small_one_finishes_in_seconds(
    make_app: Callable[..., Flask], origin: Origin, other_origin: Origin
) -> None:
    client = make_app(downloads=16).test_client()
    big = [origin.route(f"/big{i}.jpg", IMAGE, latency=0.5) for i in range(64)]
    bigger = [origin.route(f"/bigger{i}.jpg", IMAGE, latency=0.5) for i in range(64)]
    small = [other_origin.route(f"/small{i}.jpg", IMAGE, latency=0.2) for i in range(4)]
    first = submit(client, big, per_row=8)
    second = submit(client, bigger, per_row=8)
    time.sleep(0.5)
    little = submit(client, small, per_row=4)

    body = wait_terminal(client, little, timeout=20)
    assert body["status"] == "completed"
    assert images_done(client, first) < 64  # not after the big ones: while they still run

    wait_terminal(client, first, timeout=30)
    # Shared, not one after the other: the second was half done when the first ended
    # (one after the other, it would have had nothing but what the first left over).
    assert images_done(client, second) >= 32


def test_a_fast_origin_gets_a_few_downloads_at_once_and_a_slow_one_every_slot(
    make_app: Callable[..., Flask], origin: Origin, other_origin: Origin
) -> None:
    # Every slot on a fast origin would finish hundreds of downloads in a burst, their
    # threads taking the GIL from the codec and their bytes piling up in memory.
    client = make_app(downloads=64, cpu_slots=2).test_client()
    photo = make_image(1600, 1200)  # ~30 ms in the codec: ~64 a second on two threads
    fast = [origin.route(f"/f{i}.jpg", photo, latency=0.06) for i in range(120)]
    body = wait_terminal(client, submit(client, fast, per_row=5), timeout=60)
    assert body["progress"]["images_done"] == 120
    # 2 x ~64/s x 60 ms plus 4 waiting: ~12 (more when this machine is slow to answer)
    assert origin.most_active <= 32

    # The pipeline deepens while the first answers are awaited, before any has come back.
    slow = [other_origin.route(f"/s{i}.jpg", IMAGE, latency=1.0) for i in range(96)]
    body = wait_terminal(client, submit(client, slow, per_row=8), timeout=60)
    assert body["progress"]["images_done"] == 96
    assert other_origin.most_active == 64


def test_a_shallow_pipeline_never_stalls(make_app: Callable[..., Flask], origin: Origin) -> None:
    # The scheduler sleeps while the depth admits no more, and is woken only when it does:
    # a missed wake leaves the images queued with nothing in flight (this stalled a
    # benchmark once, 362 images in).
    client = make_app(downloads=32, cpu_slots=2).test_client()
    images = [make_image(60 + i % 7 * 90, 60 + i % 5 * 70) for i in range(35)]
    urls = [origin.route(f"/n{i}.jpg", images[i % 35]) for i in range(700)]
    request_id = submit(client, urls, per_row=7)
    seen, still_since = -1, time.monotonic()
    while True:
        body = client.get(f"/csv/status/{request_id}?limit=1").get_json()
        done = int(body["progress"]["images_done"])
        if done != seen:
            seen, still_since = done, time.monotonic()
        assert time.monotonic() - still_since < 3.0, f"no progress for 3 s at {done} of 700"
        if body["status"] in ("completed", "completed_with_errors", "failed"):
            break
        time.sleep(0.02)
    assert body["status"] == "completed" and done == 700


def test_the_depth_covers_twice_the_download_time_plus_the_images_waiting() -> None:
    depth = DownloadDepth(slots=100, codec_threads=2, min_rate=100)  # 100 images/s, 4 waiting
    assert depth.limit(0.0) == 4  # nothing measured, nothing in flight
    tokens = [depth.started(0.0) for _ in range(4)]
    assert not depth.admits(0.0)
    assert depth.admits_in(0.0) == pytest.approx(0.005)  # one more per 5 ms they wait
    assert depth.limit(0.25) == 4 + 50
    assert depth.limit(2.0) == 100  # never more than the slots
    assert DownloadDepth(slots=4, codec_threads=2, min_rate=4).admits_in(0.0) == 0.0  # room now

    for token in tokens:  # answers in 10 ms: 2 x 100/s x 10 ms = 2 in flight, and 4 ready
        depth.ended(token, 0.01, to_codec=True)
    assert depth.limit(0.01) == 4 + 2
    assert depth.ready == 4 and depth.in_flight == 0
    assert depth.admits(0.01)
    depth.started(0.01)
    depth.started(0.01)
    assert not depth.admits(0.01)  # the images waiting for the codec count too
    depth.taken()
    assert depth.admits(0.01)
    for _ in range(95):
        depth.started(0.01)
    assert depth.in_flight + depth.ready == 100
    assert depth.admits_in(5.0) is None  # every slot in use: waiting adds none


def test_one_slow_answer_deepens_at_once_and_fast_ones_shallow_slowly() -> None:
    depth = DownloadDepth(slots=100, codec_threads=2, min_rate=100)
    for _ in range(50):
        depth.ended(depth.started(0.0), 0.002, to_codec=True)
    assert depth.limit(0.002) == 4 + 1
    depth.ended(depth.started(1.0), 2.0, to_codec=True)  # one host turned slow
    assert depth.limit(2.0) == 100
    for _ in range(5):
        depth.ended(depth.started(2.0), 2.002, to_codec=True)
    assert depth.limit(2.002) > 50  # a few fast ones do not undo it
    for _ in range(150):
        depth.ended(depth.started(2.0), 2.002, to_codec=True)
    assert depth.limit(2.002) < 10
    depth.ended(depth.started(3.0), 3.001, to_codec=False)  # failures are not measured
    assert depth.limit(3.001) < 10


def test_a_codec_faster_than_the_slots_are_sized_for_deepens_the_pipeline() -> None:
    depth = DownloadDepth(slots=500, codec_threads=2, min_rate=500)
    for _ in range(50):
        depth.ended(depth.started(0.0), 0.05, to_codec=True)  # 50 ms answers
    depth.compressed(0.04)  # photos: 2 threads / 40 ms = 50/s, less than 500/s: 500/s
    assert depth.limit(0.05) == 4 + 50
    for _ in range(100):
        depth.compressed(0.001)  # thumbnails: 2,000/s
    assert depth.limit(0.05) == 4 + 200


def test_slots_beyond_the_cores_rate_are_used_only_as_slow_origins_need_them() -> None:
    """The default: twice as many slots as a second at the cores' rate needs. At 1 s every
    slot is in use; at 0.3 s fewer than half (as many as the cores' rate needs)."""
    depth = DownloadDepth(slots=512, codec_threads=4, min_rate=256)
    for _ in range(20):
        depth.ended(depth.started(0.0), 0.3, to_codec=True)
    depth.compressed(0.016)  # 4 threads / 16 ms: 250 images/s, under the floor
    assert depth.limit(0.3) == 8 + 154  # 2 x 256/s x 0.3 s = 153.6, rounded up
    for _ in range(20):
        depth.ended(depth.started(0.0), 1.0, to_codec=True)  # the host slows to 1 s
    assert depth.limit(1.0) == 512


def test_the_byte_budget_waits_for_room_but_never_for_ever() -> None:
    budget = ByteBudget(1000)
    budget.reserve(600)
    budget.reserve(400)
    got_in = threading.Event()

    def third() -> None:
        budget.reserve(300)
        got_in.set()

    waiter = threading.Thread(target=third)
    waiter.start()
    assert not got_in.wait(0.2)  # full: it waits
    budget.release(400)
    assert got_in.wait(2)
    waiter.join()
    assert budget.used == 900
    budget.release(900)
    budget.reserve(5000)  # alone, more than the budget: admitted rather than stuck
    assert budget.used == 5000
    budget.release(5000)


def test_a_body_longer_than_declared_grows_its_share_without_waiting() -> None:
    """Holders that find their body longer than declared (a decoded gzip) take the rest at
    once: were they to wait in line for it, they would wait on one another for ever."""
    budget = ByteBudget(1000)
    budget.reserve(600)
    budget.reserve(400)
    waiter = threading.Thread(target=budget.reserve, args=(300,), daemon=True)
    waiter.start()
    time.sleep(0.1)
    budget.grow(100)  # returns at once, though the budget is full and someone waits
    assert budget.used == 1100
    budget.release(1100)
    waiter.join(2)
    assert not waiter.is_alive() and budget.used == 300
    budget.release(300)  # the gauge in /metrics is the process's


def test_closing_the_budget_lets_every_waiter_go() -> None:
    budget = ByteBudget(1000)
    budget.reserve(1000)
    waiters = [threading.Thread(target=budget.reserve, args=(500,), daemon=True) for _ in "ab"]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.1)
    assert all(waiter.is_alive() for waiter in waiters)
    budget.close()  # the process stops: the work that would free room may be cancelled
    for waiter in waiters:
        waiter.join(2)
        assert not waiter.is_alive()
    budget.reserve(5000)  # and nobody waits any more
    assert budget.used == 7000
    budget.release(7000)  # the gauge in /metrics is the process's


def test_downloaded_bytes_stay_within_the_budget(
    make_app: Callable[..., Flask], origin: Origin
) -> None:
    image = make_image(600, 400)  # ~60 KB; the budget holds three at a time
    limit = 3 * len(image) + 1000
    app = make_app(downloads=16, max_image_bytes=limit, download_buffer_bytes=limit)
    client = app.test_client()
    urls = [origin.route(f"/m{i}.jpg", image, latency=0.3) for i in range(24)]
    request_id = submit(client, urls, per_row=6)
    samples: list[float] = []
    while client.get(f"/csv/status/{request_id}?limit=1").get_json()["status"] != "completed":
        samples.append(buffered(client))
        time.sleep(0.01)
    assert max(samples) <= limit
    assert max(samples) > 0


def buffered(client: FlaskClient) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith("imgproc_download_buffer_bytes "):
            return float(line.split()[1])
    raise AssertionError("no imgproc_download_buffer_bytes in /metrics")
