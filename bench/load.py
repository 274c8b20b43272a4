"""Load benchmark (``make bench-load``): 20 concurrent uploads of 50 images each while 50
status polls a second run for a minute, against the service as ``make run`` starts it.

Reports error responses (must be none), whether every request completed, upload and status
latency p50/p99, the time until all batches were done, and the peak RSS of every process.
Prints a table and one JSON line; exits 1 on any error response or unfinished request.

Usage: python bench/load.py [--uploads 20] [--images 50] [--polls-per-s 50] [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    ImageHost,
    RssSampler,
    catalogue_images,
    csv_for,
    start_service,
    stop_service,
)

TERMINAL = ("completed", "completed_with_errors", "failed")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * share))], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--images", type=int, default=50, help="images per upload")
    parser.add_argument("--polls-per-s", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of polling")
    args = parser.parse_args()

    print(f"making {args.uploads * args.images} images ...", flush=True)
    images = catalogue_images(args.uploads * args.images)
    paths = {f"/img/{i}.jpg": data for i, data in enumerate(images)}
    data_dir = tempfile.mkdtemp(prefix="imgproc-load-")
    service, url = start_service(data_dir, {})
    sampler = RssSampler(service.pid)
    sampler.start()
    errors: list[str] = []
    upload_latency: list[float] = []
    status_latency: list[float] = []
    request_ids: list[str] = []
    done_at: dict[str, float] = {}
    lock = threading.Lock()
    try:
        with ImageHost(paths, b"") as host:
            keys = list(paths)
            bodies = [
                csv_for([host + k for k in keys[n * args.images : (n + 1) * args.images]], 2)
                for n in range(args.uploads)
            ]
            started = time.perf_counter()
            stop = threading.Event()

            def poller(index: int, rate: float) -> None:
                session = requests.Session()
                count = 0
                while not stop.is_set():
                    with lock:
                        ids = list(request_ids)
                    if ids:
                        request_id = ids[(index + count) % len(ids)]
                        count += 1
                        polled = time.perf_counter()
                        reply = session.get(f"{url}/csv/status/{request_id}", timeout=30)
                        elapsed = time.perf_counter() - polled
                        with lock:
                            status_latency.append(elapsed)
                            if reply.status_code != 200:
                                errors.append(f"status {reply.status_code}: {reply.text[:120]}")
                            elif reply.json()["status"] in TERMINAL:
                                done_at.setdefault(request_id, time.perf_counter() - started)
                        stop.wait(max(0.0, 1 / rate - elapsed))
                    else:
                        stop.wait(0.01)

            pollers = 10
            threads = [
                threading.Thread(target=poller, args=(i, args.polls_per_s / pollers), daemon=True)
                for i in range(pollers)
            ]
            for thread in threads:
                thread.start()

            def upload(body: bytes) -> None:
                sent = time.perf_counter()
                reply = requests.post(
                    f"{url}/csv/upload", files={"file": ("l.csv", body)}, timeout=60
                )
                with lock:
                    upload_latency.append(time.perf_counter() - sent)
                    if reply.status_code != 202:
                        errors.append(f"upload {reply.status_code}: {reply.text[:120]}")
                    else:
                        request_ids.append(reply.json()["request_id"])

            with ThreadPoolExecutor(args.uploads) as pool:
                list(pool.map(upload, bodies))
            time.sleep(max(0.0, args.duration - (time.perf_counter() - started)))
            deadline = time.monotonic() + 120  # polling stops only when all are done
            while len(done_at) < len(request_ids) and time.monotonic() < deadline:
                time.sleep(0.2)
            stop.set()
            for thread in threads:
                thread.join()
            final = [
                requests.get(f"{url}/csv/status/{r}?limit=1", timeout=30).json()
                for r in request_ids
            ]
    finally:
        stop_service(service, sampler)

    peaks: dict[str, list[float]] = {}
    for role, peak in sampler.peaks.values():
        peaks.setdefault(role, []).append(round(peak, 1))
    result: dict[str, Any] = {
        "uploads": args.uploads,
        "images_per_upload": args.images,
        "error_responses": len(errors),
        "completed": sum(1 for b in final if b["status"] == "completed"),
        "images_done": sum(b["progress"]["images_done"] for b in final),
        "all_done_s": round(max(done_at.values(), default=float("nan")), 2),
        "upload_p50_ms": percentile(upload_latency, 0.5),
        "upload_p99_ms": percentile(upload_latency, 0.99),
        "status_polls": len(status_latency),
        "status_p50_ms": percentile(status_latency, 0.5),
        "status_p99_ms": percentile(status_latency, 0.99),
        "peak_rss_mb": peaks,
        "errors_sample": errors[:3],
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    ok = not errors and result["completed"] == args.uploads
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
