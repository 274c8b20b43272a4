"""The SSRF vectors that need name resolution, for real: a public-looking host that
redirects to private addresses, and a host name that resolves to a private one (what DNS
rebinding yields), in a network namespace this test makes with its own /etc/hosts. Nothing
leaves the machine; nothing of the resolver or the HTTP stack is patched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with a loopback, the test address 11.22.33.44 on it, and a hosts
    file naming shop.example (that address) and rebind.example (127.0.0.1)."""
    name = f"imgproc-ssrf-{os.getpid()}"
    hosts = Path("/etc/netns") / name
    try:
        sh("ip", "netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot create a network namespace (needs root and iproute2): {exc}")
    try:
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text("11.22.33.44 shop.example\n127.0.0.1 rebind.example\n")
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", "11.22.33.44/32", "dev", "lo")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(hosts, ignore_errors=True)


def test_redirects_and_names_that_lead_to_private_addresses(namespace: str, tmp_path: Path) -> None:
    image = tmp_path / "img.jpg"
    image.write_bytes(make_image(64, 48))
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            str(HERE / "netns_probe.py"),
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes["public"].startswith("ok ")  # a public host is fetched normally
    assert outcomes["to-private"] == "blocked address (127.0.0.1)"
    assert outcomes["to-rebind"] == "blocked address (127.0.0.1)"
    assert outcomes["to-metadata"] == "blocked address (169.254.169.254)"
    assert outcomes["to-decimal"] == "blocked address (127.0.0.1)"
    assert outcomes["rebind_direct"] == "blocked address (127.0.0.1)"
    assert outcomes["webhook_public"] == "delivered"
    assert outcomes["webhook_rebind"] == "blocked address (127.0.0.1)"
    assert outcomes["private_hits"] == ""  # not one request reached the private host
