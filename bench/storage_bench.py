"""Storage figures: put latency of each backend, and how ``/images/<key>`` should serve S3.

1. Durable put (put, then its sync) and get latency, p50/p99, of one ~200 KB JPEG, N times
   under distinct keys, for ``local`` (temporary file linked in, fsync of the file and of its
   directory: a flush that holds one output; a flush of many syncs their directory once),
   ``gridfs`` (the embedded database) and ``s3``
   (SeaweedFS on loopback, as the tests start it).
2. ``GET /images/<key>`` of a ~200 KB image through a real gunicorn service with S3 storage:
   streamed by the service (what it does) against a 302 to a presigned URL that the client
   follows to the bucket (the alternative), and a conditional GET (304). Latency p50/p99 as
   one client sees it, and the CPU the service process and the S3 gateway spent per request
   (from /proc).

Prints a table and one JSON line (the last line). Everything runs on loopback.

Usage: python bench/storage_bench.py [--puts 300] [--gets 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import photo  # noqa: E402

from imgproc import embedded_db  # noqa: E402
from imgproc.storage import Storage, image_key  # noqa: E402
from imgproc.storage.gridfs_bucket import GridFSStorage  # noqa: E402
from imgproc.storage.local import LocalStorage  # noqa: E402
from imgproc.storage.s3 import S3Storage  # noqa: E402
from imgproc.store import Store, connect  # noqa: E402
from tests.processes import start_process  # noqa: E402
from tests.s3server import S3Server  # noqa: E402

BUCKET = "bench"


def sample_jpeg(target: int = 200_000) -> bytes:
    """A real photograph as a JPEG of about ``target`` bytes."""
    import io

    image = photo("astronaut.png")
    for width in (1400, 1200, 1000, 900, 800, 700, 600):
        resized = image.resize((width, width * image.height // image.width))
        out = io.BytesIO()
        resized.save(out, "JPEG", quality=85)
        if out.tell() <= target:
            return out.getvalue()
    return out.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
    }


def timed(call: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def put_figures(storage: Storage, data: bytes, count: int) -> dict[str, Any]:
    """Put ``count`` distinct keys, then get them; latencies."""
    request_id = str(uuid.uuid4())
    keys = iter(image_key(request_id, row, 0, "jpg") for row in range(count * 2))
    storage.put(next(keys), data)  # warm the connection
    put_keys: list[str] = []

    def put() -> None:
        key = next(keys)
        storage.put(key, data)
        storage.sync([key])
        put_keys.append(key)

    puts = timed(put, count)
    got = iter(put_keys)
    gets = timed(lambda: storage.get(next(got)), count)
    return {"put": percentiles(puts), "get": percentiles(gets)}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and their children that were waited for."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def redirect_app() -> Any:
    """The service plus the alternative: ``/images-presigned/<key>`` answers 302 to a
    presigned GET of the object (gunicorn ``storage_bench:redirect_app()``)."""
    from flask import redirect

    from imgproc import create_app
    from imgproc.api import services

    app = create_app()

    @app.get("/images-presigned/<path:key>")
    def presigned(key: str) -> Any:
        storage = services().storage
        assert isinstance(storage, S3Storage)
        url = storage.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": storage.bucket, "Key": storage.prefix + key},
            ExpiresIn=300,
        )
        return redirect(url, 302)

    return app


def serving_figures(
    s3: S3Server, mongo_uri: str, data: bytes, count: int, workdir: Path
) -> dict[str, Any]:
    """Streamed vs presigned redirect vs 304, through a real gunicorn service."""
    prefix = "serve/"
    storage = S3Storage(BUCKET, prefix=prefix, endpoint_url=s3.endpoint)
    keys = [image_key(str(uuid.uuid4()), row, 0, "jpg") for row in range(count)]
    for key in keys:
        storage.put(key, data)
    env = {
        **s3.env(BUCKET, prefix),
        "MONGODB_URI": mongo_uri,
        "IMGPROC_DB_NAME": "bench_storage",
        "IMGPROC_DATA_DIR": str(workdir / "data"),
        "IMGPROC_START_WORKER": "false",
        "IMGPROC_HTTP_WORKERS": "1",
        "IMGPROC_LOG_LEVEL": "WARNING",
    }
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:imgproc.gunicorn_conf",
        "--pythonpath",
        str(Path(__file__).resolve().parent),
        "storage_bench:redirect_app()",
    ]
    service = start_process(args, env, workdir / "service.log", embedded_db.free_port())
    try:
        workers = children(service.process.pid)
        assert s3.gateway is not None
        gateway = [s3.gateway.pid]
        session = requests.Session()
        results: dict[str, Any] = {}
        modes: dict[str, Callable[[str], requests.Response]] = {
            "streamed": lambda key: session.get(f"{service.url}/images/{key}", timeout=10),
            "presigned_redirect": lambda key: session.get(
                f"{service.url}/images-presigned/{key}", timeout=10
            ),
        }
        for mode, fetch in modes.items():
            for key in keys[:20]:  # warm up
                assert fetch(key).content == data
            service_cpu, gateway_cpu = cpu_seconds(workers), cpu_seconds(gateway)
            position = iter(keys * 2)
            latencies = timed(lambda f=fetch, p=position: f(next(p)), count)
            results[mode] = {
                **percentiles(latencies),
                "service_cpu_ms_per_get": round(
                    (cpu_seconds(workers) - service_cpu) * 1000 / count, 3
                ),
                "gateway_cpu_ms_per_get": round(
                    (cpu_seconds(gateway) - gateway_cpu) * 1000 / count, 3
                ),
            }
        etags = {key: session.get(f"{service.url}/images/{key}").headers["ETag"] for key in keys}
        position = iter(keys * 2)

        def conditional() -> None:
            key = next(position)
            reply = session.get(
                f"{service.url}/images/{key}", headers={"If-None-Match": etags[key]}, timeout=10
            )
            assert reply.status_code == 304

        service_cpu = cpu_seconds(workers)
        latencies = timed(conditional, count)
        results["streamed_304"] = {
            **percentiles(latencies),
            "service_cpu_ms_per_get": round((cpu_seconds(workers) - service_cpu) * 1000 / count, 3),
        }
        return results
    finally:
        service.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=300)
    parser.add_argument("--gets", type=int, default=300)
    args = parser.parse_args()
    data = sample_jpeg()
    figures: dict[str, Any] = {"image_bytes": len(data)}
    with tempfile.TemporaryDirectory(prefix="imgproc-storage-bench-") as tmp:
        work = Path(tmp)
        database = embedded_db.start(str(work / "db"), log_path=str(work / "db.log"))
        s3 = S3Server.start(work / "s3", buckets=(BUCKET,))
        for name, value in s3.credentials_env().items():
            os.environ[name] = value
        client = connect(database.uri, timeout_ms=5000, pool_size=4)
        try:
            store = Store(client["bench_storage"])
            store.ensure_indexes()
            backends: dict[str, Storage] = {
                "local": LocalStorage(str(work / "images")),
                "gridfs": GridFSStorage(store),
                "s3": S3Storage(BUCKET, prefix="puts/", endpoint_url=s3.endpoint),
            }
            for name, storage in backends.items():
                figures[name] = put_figures(storage, data, args.puts)
            figures["serving"] = serving_figures(s3, database.uri, data, args.gets, work)
        finally:
            client.close()
            s3.stop()
            database.stop()
    print(f"image: {figures['image_bytes']} bytes")
    for name in ("local", "gridfs", "s3"):
        put, get = figures[name]["put"], figures[name]["get"]
        print(
            f"{name:8} put p50 {put['p50_ms']:7.2f} ms  p99 {put['p99_ms']:7.2f} ms   "
            f"get p50 {get['p50_ms']:7.2f} ms  p99 {get['p99_ms']:7.2f} ms"
        )
    for mode, row in figures["serving"].items():
        print(
            f"GET /images {mode:19} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
            f"service CPU {row['service_cpu_ms_per_get']:.3f} ms/GET  "
            f"gateway CPU {row.get('gateway_cpu_ms_per_get', 0):.3f} ms/GET"
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
