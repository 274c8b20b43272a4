"""The benchmark itself runs (small N), so it does not rot. Timing targets live in it, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_and_reports() -> None:
    result = subprocess.run(
        [sys.executable, "bench/bench.py", "--images", "6", "--big-rows", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a target missed
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["status"] == "completed"
    assert figures["images_done"] == 6
    assert figures["e2e_images_per_s"] > 0 and figures["ceiling_images_per_s"] > 0
    assert figures["app_peak_rss_mb"] > 0
    assert set(figures["peak_rss_mb"]) == {"launcher", "database", "gunicorn"}
    assert figures["big_status"] == "completed" and figures["big_accept_s"] > 0
    assert figures["status_p99_ms"] >= figures["status_p50_ms"] > 0
    assert any(line.startswith("ratio ") for line in result.stdout.splitlines())


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
