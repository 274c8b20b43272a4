"""Images that come out right, end to end through the API: what a user downloads."""

from __future__ import annotations

import io
from typing import Any

from flask.testing import FlaskClient
from PIL import Image
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, get_closed, serve, upload, wait_terminal
from tests.images import animated_gif, oriented_jpeg, save


def test_catalogue_images_come_out_right(client: FlaskClient, image_host: HTTPServer) -> None:
    rgba = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (0, 0, 50, 50))
    tiny = save(Image.effect_noise((48, 48), 60).convert("RGB"), "JPEG", quality=5, optimize=True)
    urls = [
        serve(image_host, "/rotated.jpg", oriented_jpeg(6)),
        serve(image_host, "/logo.png", save(rgba, "PNG"), "image/png"),
        serve(image_host, "/spinner.gif", animated_gif(), "image/gif"),
        serve(image_host, "/tiny.jpg", tiny),
    ]
    request_id = upload(client, csv_bytes([(1, "Catalogue", urls)])).get_json()["request_id"]
    body = wait_terminal(client, request_id)
    assert body["status"] == "completed"
    rotated, logo, spinner, kept = body["products"][0]["images"]

    def download(image: dict[str, Any]) -> Image.Image:
        response = get_closed(client, image["output_url"])
        assert response.status_code == 200
        return Image.open(io.BytesIO(response.data))

    upright = download(rotated).convert("RGB")
    assert upright.size == (120, 80) and (rotated["width"], rotated["height"]) == (120, 80)
    assert upright.getpixel((10, 10))[0] > 200  # type: ignore[index]  # red corner top-left

    transparent = download(logo)
    assert logo["format"] == "WEBP" and transparent.format == "WEBP"
    assert transparent.convert("RGBA").getpixel((75, 25))[3] == 0  # type: ignore[index]

    animation = download(spinner)
    assert spinner["format"] == "WEBP" and getattr(animation, "n_frames", 1) == 3

    assert kept["kept_original"] is True
    assert kept["output_bytes"] == len(tiny) == kept["input_bytes"]
    assert get_closed(client, kept["output_url"]).data == tiny
    assert rotated["kept_original"] is False
