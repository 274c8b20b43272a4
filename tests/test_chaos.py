"""Chaos: real instances and the real database process, SIGKILLed at seeded random moments
(whole instances, the database itself and, with S3 storage, the S3 gateway), uploads racing
the kills, webhooks on; then every request must be completed with exact counts, every
output URL must answer with the complete image, each webhook must have been delivered under
its one ``webhook-id``, and no log may show an internal error. ``make test`` runs a few
seeds; ``make chaos SEEDS=N`` runs N per storage backend (``IMGPROC_CHAOS_SEEDS`` picks
them: ``1-50``, ``7,9``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from tests.chaos import Chaos, seeds_from_env
from tests.conftest import S3_PUBLIC_BUCKET
from tests.s3server import S3Server

pytestmark = pytest.mark.slow

SEEDS = seeds_from_env("9001,9002")


@pytest.mark.parametrize("storage", ["local", "gridfs", "s3"])
@pytest.mark.parametrize("seed", SEEDS)
def test_nothing_is_lost_whatever_dies(
    seed: int,
    storage: str,
    image_host: HTTPServer,
    webhook_receiver: HTTPServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    extra_env: dict[str, str] = {}
    targets = {}
    if storage == "s3":
        # Outputs in a bucket read through its public URL (the stand-in for a CDN), so the
        # service is not in the image path; the S3 gateway is killed like everything else.
        s3: S3Server = request.getfixturevalue("s3_server")
        extra_env = s3.env(
            S3_PUBLIC_BUCKET,
            prefix=f"chaos-{seed}-{tmp_path.name}/",
            public_url=s3.public_url(S3_PUBLIC_BUCKET),
        )
        targets = {"s3-gateway": (s3.kill_gateway, s3.start_gateway)}
    run = Chaos(
        seed,
        storage,
        tmp_path,
        image_host,
        webhook_receiver,
        extra_env=extra_env,
        kill_targets=targets,
    ).go()
    print(run.summary())
    assert run.events  # something was killed
