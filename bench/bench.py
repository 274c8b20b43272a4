"""End-to-end benchmark: start the service as ``make run`` does (gunicorn + embedded
database), serve N distinct photo-like JPEGs from a local host, upload one CSV, and time
the batch from upload to terminal status. Also measures the compress-only ceiling (the same
bytes decoded and re-encoded by a plain Pillow loop on one thread per core) and the ratio.

Usage: python bench/bench.py [--images N] [--size PX] [--quality Q]
Prints a table and one JSON line (the last line of output).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image, ImageDraw, ImageFilter
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgproc.embedded_db import free_port  # noqa: E402


def photo_like(seed: int, size: int) -> bytes:
    """A JPEG with gradients, shapes and noise: compresses roughly like a product photo."""
    rng = random.Random(seed)
    width, height = size, size * 3 // 4
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(size // 40, size // 6)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)  # type: ignore[arg-type]
    image = image.filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.15)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


class ImageHost:
    """A threaded HTTP server on loopback serving the images from memory."""

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images

        @Request.application  # type: ignore[arg-type]
        def app(request: Request) -> Response:
            data = self.images.get(request.path)
            if data is None:
                return Response("not found", status=404)
            return Response(data, content_type="image/jpeg")

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()


def ceiling(images: list[bytes], quality: int) -> float:
    """Images per second of a plain Pillow decode + encode loop, one thread per core."""

    def one(data: bytes) -> int:
        image = Image.open(io.BytesIO(data))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=quality)
        return len(out.getvalue())

    cores = os.cpu_count() or 1
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(one, images[: min(len(images), 20)]))  # warm up
        started = time.perf_counter()
        list(pool.map(one, images))
        return len(images) / (time.perf_counter() - started)


def rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process in MB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def service_pids(root_pid: int) -> list[int]:
    """The launcher and all its descendants."""
    pids, frontier = [root_pid], [root_pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            pids.append(child)
            frontier.append(child)
    return pids


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per image served
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=2000, help="width in pixels")
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument("--per-row", type=int, default=2)
    args = parser.parse_args()

    print(f"generating {args.images} images of {args.size}px ...", flush=True)
    images = {f"/img/{i}.jpg": photo_like(i, args.size) for i in range(args.images)}
    data_dir = tempfile.mkdtemp(prefix="imgproc-bench-")
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "IMGPROC_DATA_DIR": data_dir,
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_LOG_LEVEL": "WARNING",
    }
    env.pop("MONGODB_URI", None)
    log = open(Path(data_dir) / "service.log", "wb")  # noqa: SIM115
    service = subprocess.Popen(
        [sys.executable, "-m", "imgproc", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"service did not start; see {log.name}")
            time.sleep(0.2)

        with ImageHost(images) as host:
            paths = list(images)
            lines = ["S. No.,Product Name,Input Image Urls"]
            for n, start in enumerate(range(0, len(paths), args.per_row), 1):
                urls = ",".join(host + p for p in paths[start : start + args.per_row])
                lines.append(f'{n},Product {n},"{urls}"')
            body = ("\n".join(lines) + "\n").encode()
            started = time.perf_counter()
            created = requests.post(
                f"{url}/csv/upload",
                files={"file": ("b.csv", body)},
                data={"quality": str(args.quality)},
                timeout=60,
            )
            created.raise_for_status()
            accepted = time.perf_counter() - started
            request_id = created.json()["request_id"]
            latencies = []
            while True:
                t0 = time.perf_counter()
                status = requests.get(f"{url}/csv/status/{request_id}?limit=1", timeout=30).json()
                latencies.append(time.perf_counter() - t0)
                if status["status"] not in ("pending", "processing"):
                    break
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        peak = {pid: rss_mb(pid) for pid in service_pids(service.pid)}
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
        log.close()

    e2e = args.images / elapsed
    top = ceiling(list(images.values()), args.quality)
    latencies.sort()
    result = {
        "images": args.images,
        "size_px": args.size,
        "quality": args.quality,
        "status": status["status"],
        "images_done": status["progress"]["images_done"],
        "images_failed": status["progress"]["images_failed"],
        "upload_accept_s": round(accepted, 3),
        "batch_s": round(elapsed, 2),
        "e2e_images_per_s": round(e2e, 2),
        "ceiling_images_per_s": round(top, 2),
        "ratio": round(e2e / top, 3),
        "status_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "status_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
        "peak_rss_mb_total": round(sum(peak.values()), 1),
        "cores": os.cpu_count(),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0 if status["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
