"""The chaos harness: several real service instances and the real database process, a seeded
schedule of SIGKILLs (of whole instances and of the database), uploads racing the chaos
with Idempotency-Key retries, webhooks on; then the end state checked exactly.

Used by ``tests/test_chaos.py`` (a few seeds in ``make test``, many in ``make chaos``).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import requests
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from imgproc import embedded_db
from imgproc.embedded_db import free_port
from tests.conftest import csv_bytes, make_image
from tests.processes import Service, spawn_process

TERMINAL = ("completed", "completed_with_errors", "failed")


@dataclass
class Scale:
    """How big one run is."""

    requests: int = 4
    products: int = 12
    images_per_product: int = 3
    image_latency: float = 0.25  # seconds the image host waits before answering
    events: tuple[int, int] = (4, 6)  # SIGKILLs per run, at least and at most
    window: float = 14.0  # seconds over which they are spread
    instances: int = 2


class Database:
    """The embedded database as its own process, on one port and one directory for good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = free_port()
        self.server: embedded_db.EmbeddedDb | None = None
        self.log = path.parent / "db.log"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        self.server = embedded_db.start(str(self.path), port=self.port, log_path=str(self.log))

    def kill(self) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class Instance:
    """One service instance (gunicorn master and its workers), killed as a whole."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.env = env
        self.logs = logs
        self.service: Service | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        assert self.service is not None
        return self.service.url

    def start(self) -> None:
        """Start and wait until it answers HTTP (its database may be down right now)."""
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        args = [sys.executable, "-m", "gunicorn", "-c", "python:imgproc.gunicorn_conf", "wsgi:app"]
        service = spawn_process(args, self.env, log, free_port())
        deadline = time.monotonic() + 60
        while True:
            if service.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{log.read_text()[-3000:]}")
            try:
                requests.get(f"{service.url}/healthz", timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, f"{self.name} never answered"
                time.sleep(0.1)
        self.service = service

    def kill(self) -> None:
        assert self.service is not None
        self.service.kill()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob(f"{self.name}-*.log")))


@dataclass
class Run:
    """What one run did and found."""

    seed: int
    storage: str
    events: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    upload_retries: int = 0
    webhook_posts: int = 0
    duplicate_webhooks: int = 0
    image_fetches: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return json.dumps(self.__dict__)


class Chaos:
    """One seeded run against ``storage`` (``local`` or ``gridfs``)."""

    def __init__(
        self,
        seed: int,
        storage: str,
        workdir: Path,
        image_host: HTTPServer,
        receiver: HTTPServer,
        scale: Scale | None = None,
        extra_env: dict[str, str] | None = None,
        kill_targets: dict[str, tuple[Callable[[], None], Callable[[], None]]] | None = None,
    ) -> None:
        self.rng = random.Random(seed)  # the schedule: the same kills for the same seed
        self.upload_rng = random.Random(seed + 1)  # which instance an upload goes to
        self.scale = scale or Scale()
        self.run = Run(seed, storage)
        self.workdir = workdir
        self.image_host = image_host
        self.receiver = receiver
        self.database = Database(workdir / "db")
        self.db_name = f"chaos_{seed}_{storage}"
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        env = {
            "IMGPROC_DB_NAME": self.db_name,
            "IMGPROC_DATA_DIR": str(workdir / "data"),  # shared: a volume every instance sees
            "IMGPROC_STORAGE": storage,
            "IMGPROC_ALLOW_PRIVATE_URLS": "true",
            "IMGPROC_LEASE_SECONDS": "2",
            "IMGPROC_POLL_SECONDS": "0.2",
            "IMGPROC_DOWNLOADS": "4",
            "IMGPROC_HTTP_WORKERS": "1",
            "IMGPROC_DB_TIMEOUT_MS": "1000",
            "IMGPROC_CONNECT_TIMEOUT": "2",
            "IMGPROC_WEBHOOK_TIMEOUT": "2",
            "IMGPROC_WEBHOOK_RETRY_DELAYS": "0.5,1,1,2,2,4,4,8,8,8",
            "IMGPROC_FETCH_BACKOFF": "0.1",
            **(extra_env or {}),
        }
        self.env = env
        self.instances = [
            Instance(f"i{n}", env, workdir / "logs") for n in range(self.scale.instances)
        ]
        self.extra_targets = kill_targets or {}
        self.expected: dict[str, tuple[int, int]] = {}  # image path -> its size
        self.fetches: Counter[str] = Counter()
        self.hook_path = f"/chaos-hook-{seed}-{storage}"

    # ---- the world ------------------------------------------------------------------------

    def serve_images(self) -> list[list[list[str]]]:
        """Distinct images (sizes tell them apart), served after a delay: URLs per request,
        per product."""
        lock = threading.Lock()
        latency = self.scale.image_latency

        def handler(request: Request) -> Response:
            with lock:
                self.fetches[request.path] += 1
            time.sleep(latency)
            width, height = self.expected[request.path]
            return Response(images[request.path], content_type="image/jpeg")

        images: dict[str, bytes] = {}
        urls: list[list[list[str]]] = []
        tag = f"{self.run.seed}-{self.run.storage}"
        for r in range(self.scale.requests):
            rows = []
            for p in range(self.scale.products):
                row = []
                for i in range(self.scale.images_per_product):
                    n = (r * self.scale.products + p) * self.scale.images_per_product + i
                    path = f"/chaos/{tag}/{r}-{p}-{i}.jpg"
                    size = (160 + n % 97, 120 + n // 97)
                    images[path] = make_image(*size)
                    self.expected[path] = size
                    self.image_host.expect_request(path).respond_with_handler(handler)
                    row.append(self.image_host.url_for(path))
                rows.append(row)
            urls.append(rows)
        return urls

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.service and i.service.process.poll() is None]

    def upload(self, index: int, rows: list[list[str]], done: threading.Event) -> None:
        """Upload one CSV through any live instance until it is accepted, retrying with the
        same Idempotency-Key through outages and kills: exactly one request must result."""
        body = csv_bytes([(p + 1, f"R{index}P{p}", urls) for p, urls in enumerate(rows)])
        key = f"chaos-{self.run.seed}-{self.run.storage}-{index}"
        while True:
            live = self.live()
            if live:
                instance = self.upload_rng.choice(live)
                try:
                    reply = requests.post(
                        f"{instance.url}/csv/upload",
                        files={"file": ("p.csv", body)},
                        data={"webhook_url": self.receiver.url_for(self.hook_path)},
                        headers={"Idempotency-Key": key},
                        timeout=10,
                    )
                    if reply.status_code in (200, 202):
                        self.run.request_ids.append(reply.json()["request_id"])
                        done.set()
                        return
                except requests.RequestException:
                    pass
            self.run.upload_retries += 1
            time.sleep(0.3)

    # ---- the run --------------------------------------------------------------------------

    def go(self) -> Run:
        started = time.monotonic()
        self.receiver.expect_request(self.hook_path, method="POST").respond_with_data("ok")
        urls = self.serve_images()
        self.database.start()
        self.env["MONGODB_URI"] = self.database.uri
        try:
            for instance in self.instances:
                instance.start()
            self._chaos(urls)
            self._wait_terminal()
            self.check()
        finally:
            for instance in self.instances:
                instance.stop()
            self.database.stop()
        self.run.seconds = round(time.monotonic() - started, 1)
        return self.run

    def _chaos(self, urls: list[list[list[str]]]) -> None:
        rng = self.rng
        uploaded = [threading.Event() for _ in urls]
        # Two uploads at once, the rest at random moments during the kills.
        starts = [0.0, 0.0] + [rng.uniform(0.5, self.scale.window) for _ in urls[2:]]
        threads = []
        t0 = time.monotonic()
        for index, (rows, at) in enumerate(zip(urls, starts, strict=True)):
            thread = threading.Timer(at, self.upload, args=(index, rows, uploaded[index]))
            thread.daemon = True
            thread.start()
            threads.append(thread)
        targets: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "database": (self.database.kill, self.database.start),
            **{i.name: (i.kill, i.start) for i in self.instances},
            **self.extra_targets,
        }
        names = sorted(targets)
        events = rng.randint(*self.scale.events)
        moments = sorted(rng.uniform(0.5, self.scale.window) for _ in range(events))
        for moment in moments:
            time.sleep(max(0.0, moment - (time.monotonic() - t0)))
            name = rng.choice(names)
            down = round(rng.uniform(0.2, 2.5), 2)
            kill, start = targets[name]
            kill()
            self.run.events.append(f"{time.monotonic() - t0:.1f}s kill {name} for {down}s")
            time.sleep(down)
            start()
        for event in uploaded:
            assert event.wait(120), "an upload was never accepted"
        for thread in threads:
            thread.join()

    def _status(self, request_id: str) -> dict[str, Any] | None:
        for instance in self.live():
            try:
                reply = requests.get(f"{instance.url}/csv/status/{request_id}", timeout=5)
            except requests.RequestException:
                continue
            if reply.status_code == 200:
                body: dict[str, Any] = reply.json()
                return body
        return None

    def _wait_terminal(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        for request_id in self.run.request_ids:
            while True:
                body = self._status(request_id)
                if body is not None and body["status"] in TERMINAL:
                    if body["webhook"]["status"] in ("delivered", "failed"):
                        break
                assert time.monotonic() < deadline, f"{request_id} not finished: {body}"
                time.sleep(0.2)

    # ---- the end state, exactly -----------------------------------------------------------

    def check(self) -> None:
        scale = self.scale
        ids = self.run.request_ids
        assert len(ids) == len(set(ids)) == scale.requests
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(self.database.uri)
        try:
            db = client[self.db_name]
            assert db.processing_requests.count_documents({}) == scale.requests  # no duplicate
            assert db.products.count_documents({}) == scale.requests * scale.products
        finally:
            client.close()
        server = self.live()[0].url
        per_request = scale.products * scale.images_per_product
        for request_id in ids:
            body = self._status(request_id)
            assert body is not None
            progress = body["progress"]
            errors = [i["error"] for p in body["products"] for i in p["images"] if i["error"]]
            assert body["status"] == "completed", (request_id, progress, errors, self.run.events)
            assert progress == {
                "products_total": scale.products,
                "products_done": scale.products,
                "images_total": per_request,
                "images_done": per_request,
                "images_failed": 0,
                "percent": 100.0,
            }
            assert body["webhook"]["status"] == "delivered", body["webhook"]
            for product in body["products"]:
                assert product["status"] == "processed"
                for image in product["images"]:
                    assert image["status"] == "done" and image["error"] is None, image
                    self._check_output(server, image)
            output = requests.get(f"{server}/csv/output/{request_id}", timeout=10)
            assert output.status_code == 200
            lines = output.text.strip().splitlines()
            assert len(lines) == scale.products + 1
        if self.run.storage == "local":  # the outputs and nothing else: no put's leftovers
            images = self.workdir / "data" / "images"
            assert sorted(os.listdir(images)) == sorted(ids)
            names = {
                f"{row}-{index}.jpg"
                for row in range(scale.products)
                for index in range(scale.images_per_product)
            }
            for request_id in ids:
                assert set(os.listdir(images / request_id)) == names, request_id
        self._check_webhooks()
        self._check_logs()
        self.run.image_fetches = sum(self.fetches.values())

    def _check_output(self, server: str, image: dict[str, Any]) -> None:
        path = "/" + image["input_url"].split("/", 3)[3]
        url = image["output_url"]
        if "/images/" in url:  # served by the service: any live instance will do
            url = server + "/images/" + url.split("/images/", 1)[1]
        served = requests.get(url, timeout=10)
        assert served.status_code == 200, (url, served.status_code)
        decoded = Image.open(io.BytesIO(served.content))
        decoded.load()  # complete bytes, not a part
        assert decoded.size == self.expected[path] == (image["width"], image["height"])
        assert len(served.content) == image["output_bytes"]

    def _check_webhooks(self) -> None:
        posts = [r for r, _ in self.receiver.log if r.path == self.hook_path]
        by_id = Counter(p.headers["webhook-id"] for p in posts)
        assert set(by_id) == {f"msg_{i}" for i in self.run.request_ids}, by_id
        for post in posts:
            payload = json.loads(post.get_data())
            assert post.headers["webhook-id"] == f"msg_{payload['request_id']}"
            assert payload["status"] == "completed"
        self.run.webhook_posts = len(posts)
        self.run.duplicate_webhooks = len(posts) - len(by_id)

    def _check_logs(self) -> None:
        for instance in self.instances:
            for line in instance.log_text().splitlines():
                assert "internal error" not in line, line
                assert "unexpected error" not in line, line
                assert "Traceback" not in line, line


def seeds_from_env(default: str) -> list[int]:
    """``IMGPROC_CHAOS_SEEDS``: ``"1-50"``, ``"3,7,9"`` or a mix; ``default`` otherwise."""
    spec = os.environ.get("IMGPROC_CHAOS_SEEDS", default)
    seeds: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds
