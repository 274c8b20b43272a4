"""End-to-end benchmark (``make bench``) at realistic origin latencies.

Starts the service as ``make run`` does (gunicorn + the embedded database) and serves
distinct catalogue-size JPEGs made from real photographs (scikit-image's data set, 2000 px
and smaller) from a simulated origin (bench/image_host.py) that waits ``latency`` seconds
before the first byte of every response, as a remote origin or CDN miss does. For each
latency (default 0, 0.3 and 1.0 s), on a freshly started service, it uploads one CSV and
measures:

- end-to-end images/s, from the upload to the terminal status; the same excluding one
  latency (the first bytes can arrive no earlier: nothing finishes in that time whatever
  the service does); and the steady rate between 10% and 90% of the images finished;
- the ratio to the compress-only ceiling: the same bytes decoded and re-encoded at the
  same quality by a plain Pillow loop on one thread per core, run before the first service
  and after each (the VM's speed drifts); each batch is set against the mean of the runs
  just before and after it, and, conservatively, against the best run of all;
- status latency p50/p99 while a user polls the request's default status page, and from the
  service's access lines the p99 of the time its handler took and of the database's part;
- the peak RSS of every service process, and CPU seconds by role (image host included);
- after the first batch, on the same service and at latency 0: the time to accept a
  10,000-row CSV (20,000 URLs) and that batch's run on small images, status polled;

and, on a throw-away embedded database, what journaled writes cost (bench/durability.py).

The batches run ``--rounds`` times over (default 5: the ratio of one 400-image batch moves
by +-0.08 on this VM from minute to minute, and with 3 rounds the median at 0 s still
ranged over 0.88-1.01 in runs 35-40; the big CSV and the write concerns run once):
the ratio is checked by its median over the rounds, the RSS and status latency in every
batch.

The batch at latency L has ``--images`` + ``--images-per-latency-s`` x L images (whole
passes over the distinct ones; each phase has URLs of its own, so no phase is served from
an earlier one's cache), so that the first latency, in which nothing can finish, is a
small part of the run: 400, 800 and 2,000 by default (the 2,000 at 1 s is the RSS batch).

Prints tables and one JSON line (the last line). Exit status 1 if a target is missed:
ratio (excluding one latency, median over the rounds) >= 0.9 at every latency, app peak RSS
< 400 MB and status p99 < 100 ms in every batch, the big CSV accepted in < 1 s.

Usage: python bench/bench.py [--latencies 0,0.3,1.0] [--rounds 5] [--images 400]
                            [--images-per-latency-s 1600] [--big-rows 10000] [--quality 50]
                            [--storage local|gridfs|s3] [--durability-products 10000]
                            [--profile] [--keep]
Service settings pass through the environment (e.g. IMGPROC_CPU_SLOTS=2 make bench).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import durability  # noqa: E402
from image_host import ImageHost  # noqa: E402
from photos import catalogue_images  # noqa: E402
from tables import markdown  # noqa: E402

from imgproc.embedded_db import free_port  # noqa: E402

__all__ = [
    "ImageHost",
    "RssSampler",
    "catalogue_images",
    "csv_for",
    "start_service",
    "stop_service",
]

# ratio: e2e images/s excluding one latency over the ceiling, at every latency.
# status_p99_ms: in every phase (each batch, and the big CSV's run).
TARGETS = {"ratio": 0.9, "app_peak_rss_mb": 400.0, "big_accept_s": 1.0, "status_p99_ms": 100.0}
TERMINAL = ("completed", "completed_with_errors", "failed")


def ceiling(images: list[bytes], quality: int) -> float:
    """Images/s of a plain Pillow decode + encode loop, one thread per core."""

    def one(data: bytes) -> int:
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).save(out, "JPEG", quality=quality)
        return len(out.getvalue())

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, images[:20]))  # warm up
        started = time.perf_counter()
        list(pool.map(one, images))
        return len(images) / (time.perf_counter() - started)


def process_tree(root_pid: int) -> dict[int, str]:
    """The launcher and its descendants: pid -> short command."""
    found: dict[int, str] = {}
    frontier = [root_pid]
    while frontier:
        pid = frontier.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found[pid] = cmd
        frontier.extend(map(int, children))
    return found


def role(cmd: str) -> str:
    if "secantusd" in cmd:
        return "database"
    if "gunicorn" in cmd:
        return "gunicorn"
    return "launcher"


class RssSampler(threading.Thread):
    """Samples the peak RSS (VmHWM, the kernel's high-water mark) of every service process
    while it lives, so the peak of a process that exits is kept too."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.peaks: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        """Read every process's VmHWM now."""
        for pid, cmd in process_tree(self.root_pid).items():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) / 1024
                        with self._lock:
                            self.peaks[pid] = (
                                role(cmd),
                                max(peak, self.peaks.get(pid, ("", 0.0))[1]),
                            )
            except OSError:
                pass

    def peaks_now(self) -> dict[str, list[float]]:
        """Peak RSS in MB of every process so far, by role."""
        self.sample()
        by_role: dict[str, list[float]] = {}
        with self._lock:
            for process_role, peak in self.peaks.values():
                by_role.setdefault(process_role, []).append(round(peak, 1))
        return by_role


class Profiler:
    """py-spy on every service process while the batch runs; a summary of where time goes."""

    def __init__(self, root_pid: int, out_dir: Path) -> None:
        self.root_pid = root_pid
        self.out_dir = out_dir
        self.recorders: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        spy = Path(sys.executable).parent / "py-spy"
        for pid, cmd in process_tree(self.root_pid).items():
            out = self.out_dir / f"profile-{role(cmd)}-{pid}.txt"
            process = subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                    "--rate",
                    "200",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.recorders.append((role(cmd), out, process))

    def stop(self) -> None:
        for _role, _out, process in self.recorders:
            process.send_signal(signal.SIGINT)
        for _role, _out, process in self.recorders:
            process.wait(30)

    def summary(self, top: int = 12) -> str:
        lines = []
        for process_role, out, _process in self.recorders:
            if not out.exists():
                continue
            inclusive: dict[str, int] = {}
            total = 0
            for line in out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                total += int(count)
                for frame in set(stack.split(";")):
                    if "threading.py" not in frame and "<module>" not in frame:
                        inclusive[frame] = inclusive.get(frame, 0) + int(count)
            if total < 50:
                continue
            lines.append(f"-- {process_role} {out.name}: {total} samples (inclusive share)")
            for frame, samples in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {samples / total:6.1%}  {frame[:110]}")
        return "\n".join(lines)


def cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far, by role; 'bench' is this whole process."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid, cmd in process_tree(root_pid).items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[role(cmd)] = used.get(role(cmd), 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    own = os.times()
    used["bench"] = own.user + own.system
    return used


def stop_service(service: subprocess.Popen[bytes], sampler: RssSampler) -> None:
    """Stop sampling, then stop the service as Ctrl-C would (SIGKILL if it hangs)."""
    sampler.stop.set()
    sampler.join()
    service.send_signal(signal.SIGTERM)
    try:
        service.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(service.pid, signal.SIGKILL)


def csv_for(urls: list[str], per_row: int) -> bytes:
    lines = ["S. No.,Product Name,Input Image Urls"]
    for n, start in enumerate(range(0, len(urls), per_row), 1):
        lines.append(f'{n},Product {n},"{",".join(urls[start : start + per_row])}"')
    return ("\n".join(lines) + "\n").encode()


def start_service(data_dir: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "IMGPROC_DATA_DIR": data_dir,
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_LOG_LEVEL": "INFO",  # the access lines: each status poll's handler time
        **extra_env,
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
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return service, url
        except requests.RequestException:
            pass
        if service.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service did not start; see {log.name}")
        time.sleep(0.2)


def answered(log_path: Path, request_id: str) -> dict[str, Any]:
    """The service's own side of the status polls of ``request_id``, from its access lines:
    the p99 of the time in the handler, and the p99 of the database commands in it.
    The poller's figure adds the connection, gunicorn's queue and the client (here a thread
    of this process, beside the image host)."""
    handler, database = [], []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        # The processes share the file: a long line written in two parts can have another
        # process's line glued to it; a line of ours starts at its last '{"ts"'.
        try:
            entry = json.loads(line[line.rfind('{"ts"') :])
        except ValueError:
            continue  # not ours (a line the database or gunicorn wrote before logging was set)
        if (
            isinstance(entry, dict)
            and entry.get("route") == "/csv/status/<request_id>"
            and entry.get("request_id") == request_id
            and "db_ms" in entry
        ):
            handler.append(entry["duration_ms"] / 1000)
            database.append(entry["db_ms"] / 1000)
    return {
        "status_answered": len(handler),
        "status_handler_p99_ms": percentile_ms(handler, 0.99) if handler else None,
        "status_db_p99_ms": percentile_ms(database, 0.99) if database else None,
    }


def percentile_ms(values: list[float], share: float) -> float:
    """The ``share`` percentile of ``values`` (seconds), in milliseconds."""
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * share))], 1)


_DECODER = json.JSONDecoder()


def head_fields(body: bytes) -> tuple[str, dict[str, Any]]:
    """A status body's ``status`` and ``progress``, read from its head without parsing the
    products: a default page holds up to 1,000 of them (~1 MB), and decoding that 10 times
    a second would take a tenth of a core from the service under test. The head comes first
    and no product or image has a ``progress``; the first ``status`` is the request's."""

    def value(key: bytes) -> Any:
        at = body.index(b'"' + key + b'":') + len(key) + 3
        return _DECODER.raw_decode(body[at : at + 2048].decode("utf-8", "replace").lstrip())[0]

    return value(b"status"), value(b"progress")


class StatusPoller(threading.Thread):
    """A user polling a request's status page ``rate`` times a second until it is terminal.

    Keeps every poll's latency and the progress seen, (seconds since ``started``, images
    finished), from which the steady rate is read."""

    def __init__(self, url: str, request_id: str, started: float, rate: float, query: str) -> None:
        super().__init__(daemon=True)
        self.address = f"{url}/csv/status/{request_id}?{query}"
        self.started = started
        self.interval = 1 / rate
        self.latencies: list[float] = []
        self.progress: list[tuple[float, int]] = []
        self.total = 0
        self.final: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        try:
            while not self.stop.is_set():
                polled = time.perf_counter()
                reply = session.get(self.address, timeout=30)
                reply.raise_for_status()
                self.latencies.append(time.perf_counter() - polled)
                status, progress = head_fields(reply.content)
                self.total = progress["images_total"]
                finished = progress["images_done"] + progress["images_failed"]
                self.progress.append((time.time() - self.started, finished))
                if status in TERMINAL:
                    self.final = reply.json()
                    assert self.final["progress"] == progress, "head_fields misread the body"
                    return
                self.stop.wait(max(0.0, self.interval - self.latencies[-1]))
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def wait(self, timeout: float) -> dict[str, Any]:
        """The terminal status body; SystemExit if not terminal in ``timeout`` seconds."""
        self.join(timeout)
        self.stop.set()
        self.join()
        if self.error is not None:
            raise SystemExit(f"status polling failed: {self.error!r}")
        if not self.final:
            raise SystemExit(f"{self.address} not terminal in {timeout:.0f} s")
        return self.final

    def figures(self) -> dict[str, Any]:
        """Status latency p50/p99 and when the first and the last image were seen finished."""
        first = next((t for t, done in self.progress if done), None)
        last = next((t for t, done in self.progress if done >= self.total), None)
        return {
            "status_polls": len(self.latencies),
            "status_p50_ms": percentile_ms(self.latencies, 0.5),
            "status_p99_ms": percentile_ms(self.latencies, 0.99),
            "first_image_seen_s": None if first is None else round(first, 2),
            "all_images_seen_s": None if last is None else round(last, 2),
        }

    def steady_rate(self, low: float = 0.1, high: float = 0.9) -> float | None:
        """Images/s between ``low`` and ``high`` of the images finished (interpolated between
        polls); None when that window spans fewer than three polls."""

        def crossing(count: float) -> float | None:
            for (t0, d0), (t1, d1) in zip(self.progress, self.progress[1:], strict=False):
                if d0 < count <= d1:
                    return t0 + (t1 - t0) * (count - d0) / (d1 - d0)
            return None

        begin, end = crossing(low * self.total), crossing(high * self.total)
        if begin is None or end is None or end - begin < 3 * self.interval:
            return None
        return (high - low) * self.total / (end - begin)


def upload(url: str, body: bytes, name: str, quality: int) -> tuple[str, float, float]:
    """POST a CSV: the request id, the wall time it was sent and how long the answer took."""
    started_wall = time.time()
    started = time.perf_counter()
    created = requests.post(
        f"{url}/csv/upload",
        files={"file": (name, body)},
        data={"quality": str(quality)},
        timeout=120,
    )
    accept = time.perf_counter() - started
    created.raise_for_status()
    return created.json()["request_id"], started_wall, accept


def completed_after(status: dict[str, Any], started_wall: float) -> float:
    """Seconds from the client's upload to the server's terminal transition (one clock)."""
    completed = datetime.fromisoformat(status["completed_at"].replace("Z", "+00:00"))
    return completed.timestamp() - started_wall


def batch_size(latency: float, images: int, per_latency_s: int) -> int:
    """Images in the batch at ``latency``: whole passes over the ``images`` distinct ones, so
    the ceiling (measured over those) is over the same mix."""
    passes = max(1, round((images + per_latency_s * latency) / images))
    return passes * images


def run_batch(
    url: str,
    host: ImageHost,
    service: subprocess.Popen[bytes],
    sampler: RssSampler,
    *,
    latency: float,
    count: int,
    tag: str,
    args: argparse.Namespace,
    phase_dir: Path,
) -> dict[str, Any]:
    """One CSV of ``count`` images at ``latency``, polled until terminal; its figures (the
    service's log and any profiles are in ``phase_dir``)."""
    host.latency = latency
    host.reset()
    body = csv_for([f"{host.url}/pool/{tag}/{i}.jpg" for i in range(count)], args.per_row)
    profiler = Profiler(service.pid, phase_dir) if args.profile else None
    if profiler:
        profiler.start()
    cpu_before = cpu_seconds(service.pid)
    host_cpu_before = host.cpu_seconds()
    request_id, started_wall, _ = upload(url, body, f"{tag}.csv", args.quality)
    poller = StatusPoller(url, request_id, started_wall, args.polls_per_s, args.status_query)
    poller.start()
    status = poller.wait(args.timeout)
    cpu_after = cpu_seconds(service.pid)
    host_cpu = host.cpu_seconds() - host_cpu_before
    rss = sampler.peaks_now()
    if profiler:
        profiler.stop()
        print(f"-- profile at latency {latency:g} s", flush=True)
        print(profiler.summary(), flush=True)
    elapsed = completed_after(status, started_wall)
    cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in cpu_after}
    cpu["bench"] = round(cpu["bench"] - host_cpu, 2)  # the poller, the sampler
    cpu["image_host"] = round(host_cpu, 2)
    steady = poller.steady_rate()
    return {
        "latency_s": latency,
        "images": count,
        "status": status["status"],
        "images_done": status["progress"]["images_done"],
        "batch_s": round(elapsed, 2),
        "e2e_images_per_s": round(count / elapsed, 2),
        "e2e_less_latency_images_per_s": round(count / max(elapsed - latency, 1e-3), 2),
        "steady_images_per_s": None if steady is None else round(steady, 2),
        **poller.figures(),
        **answered(phase_dir / "service.log", request_id),
        "app_peak_rss_mb": max(rss.get("gunicorn", [0.0])),
        "peak_rss_mb": rss,
        "cpu_s_by_role": cpu,
        "cpu_busy_share": round(sum(cpu.values()) / (elapsed * (os.cpu_count() or 1)), 3),
        "image_host": host.report(),
    }


def run_big(
    url: str, host: ImageHost, sampler: RssSampler, args: argparse.Namespace, phase_dir: Path
) -> dict[str, Any]:
    """The 10,000-row CSV at latency 0: accept time, then its run with status polled."""
    host.latency = 0.0
    host.reset()
    urls = [f"{host.url}/small/{i}.jpg" for i in range(2 * args.big_rows)]
    big = csv_for(urls, 2)
    request_id, started_wall, accept = upload(url, big, "big.csv", args.quality)
    poller = StatusPoller(url, request_id, started_wall, args.polls_per_s, args.status_query)
    poller.start()
    status = poller.wait(args.timeout)
    elapsed = completed_after(status, started_wall)
    figures = poller.figures()
    rss = sampler.peaks_now()
    return {
        "rows": args.big_rows,
        "csv_mib": round(len(big) / 2**20, 2),
        "accept_s": round(accept, 3),
        "status": status["status"],
        "images_per_s": round(len(urls) / elapsed, 1),
        "status_polls": figures["status_polls"],
        "status_p50_ms": figures["status_p50_ms"],
        "status_p99_ms": figures["status_p99_ms"],
        **answered(phase_dir / "service.log", request_id),
        "app_peak_rss_mb": max(rss.get("gunicorn", [0.0])),
        "image_host": host.report(),
    }


def by_latency(phases: list[dict[str, Any]], latencies: list[float]) -> list[dict[str, Any]]:
    """The rounds of each latency together: medians of the rates and ratios (with the paired
    ratio's lowest and highest), the highest RSS and status p99."""
    summary = []
    for latency in dict.fromkeys(latencies):  # a latency listed twice: one row, all its runs
        runs = [p for p in phases if p["latency_s"] == latency]
        paired = [p["ratio_paired"] for p in runs]
        summary.append(
            {
                "latency_s": latency,
                "images": runs[0]["images"],
                "rounds": len(runs),
                "e2e_less_latency_images_per_s": round(
                    statistics.median(p["e2e_less_latency_images_per_s"] for p in runs), 2
                ),
                "ceiling_paired": round(statistics.median(p["ceiling_paired"] for p in runs), 2),
                "ratio_paired": round(statistics.median(paired), 3),
                "ratio_paired_range": [min(paired), max(paired)],
                "ratio": round(statistics.median(p["ratio"] for p in runs), 3),
                "app_peak_rss_mb": max(p["app_peak_rss_mb"] for p in runs),
                "status_p99_ms": max(p["status_p99_ms"] for p in runs),
                "peak_waiting": max(p["image_host"]["peak_waiting"] for p in runs),
            }
        )
    return summary


def check_targets(result: dict[str, Any]) -> list[str]:
    """Every target missed, as ``figure@where``: the ratio by its median over the rounds
    (paired), everything else in every batch."""
    missed = []
    for latency in result["by_latency"]:
        if latency["ratio_paired"] < TARGETS["ratio"]:
            missed.append(f"ratio@{latency['latency_s']:g}s")
    for phase in result["phases"]:
        where = f"@{phase['latency_s']:g}s"
        if phase["status"] != "completed":
            missed.append(f"status{where}")
        if phase["app_peak_rss_mb"] > TARGETS["app_peak_rss_mb"]:
            missed.append(f"app_peak_rss_mb{where}")
        if phase["status_p99_ms"] > TARGETS["status_p99_ms"]:
            missed.append(f"status_p99_ms{where}")
    big = result.get("big")
    if big:
        if big["status"] != "completed":
            missed.append("status@big")
        if big["accept_s"] > TARGETS["big_accept_s"]:
            missed.append("big_accept_s")
        if big["status_p99_ms"] > TARGETS["status_p99_ms"]:
            missed.append("status_p99_ms@big")
        if big["app_peak_rss_mb"] > TARGETS["app_peak_rss_mb"]:
            missed.append("app_peak_rss_mb@big")
    return list(dict.fromkeys(missed))  # once each, whichever rounds missed it


def columns(
    spec: list[tuple[str, Callable[[dict[str, Any]], str]]], items: list[dict[str, Any]]
) -> list[str]:
    """A Markdown table with a row per item: each column a header and how to show its cell."""
    return markdown(
        [header for header, _ in spec], [[cell(item) for _, cell in spec] for item in items]
    )


def report(result: dict[str, Any]) -> str:
    """The human-readable tables."""

    def figure(value: float | None, decimals: int) -> str:
        return "-" if value is None else f"{value:.{decimals}f}"

    ceiling_runs = " / ".join(f"{run:g}" for run in result["ceiling_runs"])
    lines = [
        f"{result['cores']} cores, quality {result['quality']}, storage {result['storage']}, "
        f"{result['images']} distinct images; ceiling runs {ceiling_runs} images/s "
        f"(best {result['ceiling_images_per_s']:g})",
        "",
    ]
    lines += columns(
        [
            ("latency", lambda s: f"{s['latency_s']:g} s"),
            ("images", lambda s: str(s["images"])),
            ("rounds", lambda s: str(s["rounds"])),
            ("e2e-L img/s", lambda s: figure(s["e2e_less_latency_images_per_s"], 1)),
            ("ceiling", lambda s: figure(s["ceiling_paired"], 1)),
            ("ratio", lambda s: figure(s["ratio_paired"], 2)),
            ("ratio range", lambda s: "-".join(f"{r:.2f}" for r in s["ratio_paired_range"])),
            ("ratio vs best", lambda s: figure(s["ratio"], 2)),
            ("app RSS MB", lambda s: figure(s["app_peak_rss_mb"], 0)),
            ("status p99 ms", lambda s: f"{s['status_p99_ms']:.0f}"),
            ("waiting", lambda s: str(s["peak_waiting"])),
        ],
        result["by_latency"],
    )
    lines += [
        "",
        f"ratio = e2e-L / ceiling, median over the rounds, checked against the target (>= "
        f"{TARGETS['ratio']});",
        "  e2e-L = images / (batch time - one latency): no image can finish before its first byte;",
        "  ceiling = the mean of the ceiling runs just before and just after the batch.",
        "ratio vs best = the same against the best ceiling run of all (the conservative one).",
        "app RSS, status p99: the highest over the rounds (targets < "
        f"{TARGETS['app_peak_rss_mb']:g} MB, < {TARGETS['status_p99_ms']:g} ms in every batch).",
        "waiting = the most requests the image host held at once (downloads in flight).",
        "",
        "every batch:",
    ]
    lines += columns(
        [
            ("round", lambda p: str(p["round"])),
            ("latency", lambda p: f"{p['latency_s']:g} s"),
            ("e2e img/s", lambda p: figure(p["e2e_images_per_s"], 1)),
            ("e2e-L img/s", lambda p: figure(p["e2e_less_latency_images_per_s"], 1)),
            ("steady img/s", lambda p: figure(p["steady_images_per_s"], 1)),
            (
                "ceiling before / after",
                lambda p: " / ".join(f"{c:.1f}" for c in p["ceilings_around"]),
            ),
            ("ratio", lambda p: figure(p["ratio_paired"], 2)),
            ("vs best", lambda p: figure(p["ratio"], 2)),
            ("overall", lambda p: figure(p["ratio_overall"], 2)),
            ("steady", lambda p: figure(p["ratio_steady"], 2)),
            ("app RSS MB", lambda p: figure(p["app_peak_rss_mb"], 0)),
            ("status p50/p99 ms", lambda p: f"{p['status_p50_ms']:.0f} / {p['status_p99_ms']:.0f}"),
            (
                "in service p99 ms",
                lambda p: (
                    f"{figure(p['status_handler_p99_ms'], 0)} / {figure(p['status_db_p99_ms'], 0)}"
                ),
            ),
        ],
        result["phases"],
    )
    lines += [
        "overall = e2e / best ceiling; steady = images/s from 10% to 90% finished / best ceiling.",
        "status p50/p99 = as the poller saw them; in service = the p99 of the time in the",
        "  handler / the p99 of its database commands (each over all polls; access lines).",
    ]
    big = result.get("big")
    if big:
        lines += [
            "",
            f"big CSV: {big['rows']:,} rows ({2 * big['rows']:,} URLs, {big['csv_mib']} MiB) "
            f"accepted in {big['accept_s']:.3f} s;",
            f"  ran at {big['images_per_s']:g} images/s (small images, latency 0); status "
            f"p50/p99 {big['status_p50_ms']:.0f} / {big['status_p99_ms']:.0f} ms (in service "
            f"p99 {figure(big['status_handler_p99_ms'], 0)} / "
            f"{figure(big['status_db_p99_ms'], 0)});",
            f"  app peak RSS {big['app_peak_rss_mb']:.0f} MB (that service's life: the first "
            "batch, then the big CSV)",
        ]
    lines.append("")
    for p in result["phases"]:
        host = p["image_host"]
        lines.append(
            f"CPU s, round {p['round']}, at {p['latency_s']:g} s: "
            + ", ".join(f"{k} {v:g}" for k, v in p["cpu_s_by_role"].items())
            + f" ({p['cpu_busy_share']:.0%} of the cores busy); image host: "
            f"{host['requests']} requests, {host['connections']} connections"
        )
    if "durability" in result:
        lines += ["", "write concerns (embedded database, pymongo directly):"]
        lines.append(durability.table(result["durability"]))
    missed = result["targets_missed"]
    lines += ["", "targets missed: " + (", ".join(missed) if missed else "none")]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latencies",
        default="0,0.3,1.0",
        help="origin latencies (time to first byte, s), comma-separated; one batch each",
    )
    parser.add_argument("--images", type=int, default=400, help="distinct images; batch at 0 s")
    parser.add_argument(
        "--images-per-latency-s",
        type=int,
        default=1600,
        help="images added to the batch per second of latency (rounded to whole passes)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="passes over the latencies (each batch between two ceiling runs); medians reported",
    )
    parser.add_argument("--per-row", type=int, default=2)
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument(
        "--big-rows",
        type=int,
        default=10_000,
        help="rows of the big CSV (2 URLs each); 0 skips that phase",
    )
    parser.add_argument("--polls-per-s", type=float, default=10.0)
    parser.add_argument(
        "--status-query",
        default="",
        help="query string of the status polls (default: a user's default)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per batch, seconds")
    parser.add_argument(
        "--durability-products",
        type=int,
        default=10_000,
        help="products inserted by the write-concern phase; 0 skips it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample every service process with py-spy during each batch",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the services' data directories (logs, outputs, database; kept with --profile)",
    )
    parser.add_argument(
        "--storage",
        choices=("local", "gridfs", "s3"),
        default="local",
        help="IMGPROC_STORAGE of the service; s3 starts SeaweedFS on loopback (tests/s3server.py)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    latencies = [float(value) for value in args.latencies.split(",") if value.strip()]

    began = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", flush=True)

    progress(f"making {args.images} catalogue images from real photographs ...")
    images = catalogue_images(args.images)
    small_img = Image.open(io.BytesIO(images[0]))
    small_img.thumbnail((160, 160))
    out = io.BytesIO()
    small_img.save(out, "JPEG", quality=85)
    small = out.getvalue()

    ceilings = [ceiling(images, args.quality)]
    work = Path(tempfile.mkdtemp(prefix="imgproc-bench-"))
    storage_env = {"IMGPROC_STORAGE": args.storage}
    s3_server = None
    if args.storage == "s3":
        from tests.s3server import S3Server

        s3_server = S3Server.start(work / "s3", buckets=("bench",))
        storage_env = s3_server.env("bench")
    result: dict[str, Any] = {
        "images": args.images,
        "quality": args.quality,
        "cores": os.cpu_count(),
        "storage": args.storage,
        "latencies_s": latencies,
        "ratio_uses": "e2e_less_latency_images_per_s",
        "phases": [],
    }
    host = ImageHost(pool=images, small=small)
    finished = False
    try:
        with host:
            for index, (turn, latency) in enumerate(
                (turn, latency) for turn in range(args.rounds) for latency in latencies
            ):
                count = batch_size(latency, args.images, args.images_per_latency_s)
                progress(
                    f"round {turn + 1}, latency {latency:g} s: starting the service for "
                    f"{count} images ..."
                )
                phase_dir = work / f"phase-{index}"
                phase_dir.mkdir()
                service, url = start_service(str(phase_dir), storage_env)
                sampler = RssSampler(service.pid)
                sampler.start()
                try:
                    phase = run_batch(
                        url,
                        host,
                        service,
                        sampler,
                        latency=latency,
                        count=count,
                        tag=f"p{index}-{round(latency * 1000)}ms",
                        args=args,
                        phase_dir=phase_dir,
                    )
                    result["phases"].append({"round": turn + 1, **phase})
                    if index == 0 and args.big_rows:
                        progress(f"big CSV: {args.big_rows} rows ...")
                        result["big"] = run_big(url, host, sampler, args, phase_dir)
                finally:
                    progress("stopping the service ...")
                    stop_service(service, sampler)
                progress("ceiling ...")
                ceilings.append(ceiling(images, args.quality))
                # the runs just before and just after this batch: the machine's speed then
                result["phases"][-1]["ceilings_around"] = [
                    round(ceilings[-2], 2),
                    round(ceilings[-1], 2),
                ]
        finished = True
    finally:
        if s3_server is not None:
            s3_server.stop()
        if finished and not (args.keep or args.profile):
            shutil.rmtree(work, ignore_errors=True)  # hundreds of MB of outputs and databases
        else:
            progress(f"kept the services' data, logs and profiles in {work}")

    if args.durability_products:
        progress("write concerns ...")
        result["durability"] = durability.run(
            count=args.durability_products,
            bulks=max(2, min(20, args.durability_products // 128)),
            singles=max(10, min(200, args.durability_products // 50)),
        )

    # The machine's speed drifts (a shared VM: the ceiling has been seen anywhere from 65 to
    # 122 images/s within an hour). The best of all the ceiling runs is what the hardware
    # allows at its best, and the ratio against it is the conservative one; but it sets a
    # batch run in a slow minute against the fastest minute of the whole run. The paired
    # ratio sets each batch against the mean of the ceiling runs just before and just after
    # it, and its median over the rounds is what the target is checked against.
    top = max(ceilings)
    result["ceiling_images_per_s"] = round(top, 2)
    result["ceiling_runs"] = [round(run, 1) for run in ceilings]
    for phase in result["phases"]:
        paired = sum(phase["ceilings_around"]) / 2
        phase["ceiling_paired"] = round(paired, 2)
        phase["ratio_paired"] = round(phase["e2e_less_latency_images_per_s"] / paired, 3)
        phase["ratio"] = round(phase["e2e_less_latency_images_per_s"] / top, 3)
        phase["ratio_overall"] = round(phase["e2e_images_per_s"] / top, 3)
        steady = phase["steady_images_per_s"]
        phase["ratio_steady"] = None if steady is None else round(steady / top, 3)
    result["by_latency"] = by_latency(result["phases"], latencies)
    result["app_peak_rss_mb"] = max(
        [phase["app_peak_rss_mb"] for phase in result["phases"]]
        + ([result["big"]["app_peak_rss_mb"]] if "big" in result else [])
    )
    result["targets"] = TARGETS
    result["targets_missed"] = check_targets(result)
    print(report(result))
    print(json.dumps(result))
    return 1 if result["targets_missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
