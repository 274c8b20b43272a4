"""The benchmark itself runs (small N), so it does not rot. Timing targets live in it, not here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import requests

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name: str) -> ModuleType:
    """A module of bench/ (not a package) without putting bench/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


image_host = _bench_module("image_host")


def test_image_host_serves_in_parallel_after_its_latency() -> None:
    """100 keep-alive connections at 0.3 s each: the host answers them all at once, not one
    after another, each after the latency; unknown paths are 404s."""
    with image_host.ImageHost(
        {"/exact.jpg": b"exact"}, b"small", pool=[b"a", b"bb"], latency=0.3
    ) as url:
        figures = asyncio.run(image_host.load(url, 100, 1.0))
        assert figures["ttfb_p50_ms"] >= 300
        assert figures["requests_per_s"] > 150  # 333 ideally; serially it would be 3.3
        fastest = 1.0
        for path, status, body in [
            ("/exact.jpg", 200, b"exact"),
            ("/small/123456.jpg", 200, b"small"),
            ("/pool/phase-a/3.jpg", 200, b"bb"),
            ("/pool/phase-b/4.jpg", 200, b"a"),
            ("/pool/3.jpg", 404, b""),
            ("/other/1.jpg", 404, b""),
        ]:
            reply = requests.get(url + path, timeout=5)
            assert (reply.status_code, reply.content) == (status, body), path
            fastest = min(fastest, reply.elapsed.total_seconds())
        assert fastest >= 0.3


def test_bench_runs_and_reports() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/bench.py",
            "--images",
            "6",
            "--latencies",
            "0,0.2",
            "--rounds",
            "2",
            "--images-per-latency-s",
            "30",
            "--big-rows",
            "40",
            "--durability-products",
            "200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a target missed
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["ceiling_images_per_s"] > 0
    assert len(figures["ceiling_runs"]) == 5  # before the first batch, and after each
    assert [p["latency_s"] for p in figures["phases"]] == [0.0, 0.2, 0.0, 0.2]
    assert [p["round"] for p in figures["phases"]] == [1, 1, 2, 2]
    assert [p["images"] for p in figures["phases"]] == [6, 12, 6, 12]  # whole passes over the 6
    for index, phase in enumerate(figures["phases"]):
        assert phase["ceilings_around"] == pytest.approx(
            figures["ceiling_runs"][index : index + 2], abs=0.06
        )
        assert phase["ratio_paired"] == pytest.approx(
            phase["e2e_less_latency_images_per_s"] / (sum(phase["ceilings_around"]) / 2),
            abs=0.002,
        )
        assert phase["status"] == "completed"
        assert phase["images_done"] == phase["images"]
        assert phase["image_host"]["requests"] >= phase["images"]
        assert phase["image_host"]["not_found"] == 0
        assert phase["e2e_less_latency_images_per_s"] >= phase["e2e_images_per_s"] > 0
        assert phase["ratio"] == pytest.approx(
            phase["e2e_less_latency_images_per_s"] / figures["ceiling_images_per_s"], abs=0.002
        )
        assert phase["app_peak_rss_mb"] > 0
        assert set(phase["peak_rss_mb"]) == {"launcher", "database", "gunicorn"}
        assert phase["status_p99_ms"] >= phase["status_p50_ms"] > 0
        # The service's side of the same polls, from its access lines: each one's handler
        # time within the poller's, and the database wait within that.
        assert phase["status_answered"] == phase["status_polls"]
        assert 0 < phase["status_db_p99_ms"] <= phase["status_handler_p99_ms"]
        assert phase["status_handler_p99_ms"] <= phase["status_p99_ms"]
    # every request waited 0.2 s before its first byte, so the batch took longer than that
    assert figures["phases"][1]["batch_s"] > 0.2
    for latency, summary in zip((0.0, 0.2), figures["by_latency"], strict=True):
        rounds = [p for p in figures["phases"] if p["latency_s"] == latency]
        paired = sorted(p["ratio_paired"] for p in rounds)
        assert summary["latency_s"] == latency and summary["rounds"] == 2
        assert summary["ratio_paired"] == pytest.approx(sum(paired) / 2, abs=0.002)  # median
        assert summary["ratio_paired_range"] == paired
        assert summary["status_p99_ms"] == max(p["status_p99_ms"] for p in rounds)
        assert summary["app_peak_rss_mb"] == max(p["app_peak_rss_mb"] for p in rounds)
    big = figures["big"]
    assert big["status"] == "completed" and big["accept_s"] > 0
    assert big["image_host"]["requests"] >= 80
    assert big["status_p99_ms"] >= big["status_p50_ms"] > 0
    assert big["status_answered"] == big["status_polls"]
    assert 0 < big["status_db_p99_ms"] <= big["status_handler_p99_ms"] <= big["status_p99_ms"]
    durability = figures["durability"]
    for concern in ("default", "w:1", "w:majority", "w:majority,j"):
        assert durability[concern]["insert_s"] > 0
        assert durability[concern]["bulk_128"]["p50_ms"] > 0
        assert durability[concern]["update_one"]["p99_ms"] > 0
    assert isinstance(figures["targets_missed"], list)
    assert any(line.startswith("| 0.2 s ") for line in result.stdout.splitlines())


def test_load_bench_runs_and_reports() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/load.py",
            "--uploads",
            "3",
            "--images",
            "4",
            "--duration",
            "2",
            "--polls-per-s",
            "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["error_responses"] == 0
    assert figures["completed"] == 3 and figures["images_done"] == 12
    assert figures["status_polls"] > 0 and figures["status_p99_ms"] >= figures["status_p50_ms"]
