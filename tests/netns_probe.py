"""Run inside a test network namespace (see test_ssrf_netns.py): a public-looking image host
at 11.22.33.44 (``shop.example``) that redirects to private addresses, a private host on
127.0.0.1 (also reachable as ``rebind.example``), and imgproc's real Fetcher and
WebhookSender with the SSRF guard on. Prints one JSON object of outcomes."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgproc.config import load_settings  # noqa: E402
from imgproc.fetcher import Fetcher, FetchError  # noqa: E402
from imgproc.webhooks import WebhookSender  # noqa: E402

REDIRECTS = {
    "/to-private": "http://127.0.0.1:8081/secret.jpg",
    "/to-rebind": "http://rebind.example:8081/secret.jpg",
    "/to-metadata": "http://169.254.169.254/latest/meta-data/",
    "/to-decimal": "http://2130706433:8081/secret.jpg",
}
private_hits: list[str] = []


class Public(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = Path(sys.argv[1]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


class Private(Public):
    def do_GET(self) -> None:  # noqa: N802
        private_hits.append(self.path)
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        private_hits.append(self.path)
        super().do_POST()


def main() -> None:
    for address, handler in ((("11.22.33.44", 8080), Public), (("127.0.0.1", 8081), Private)):
        server = HTTPServer(address, handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = load_settings({"allow_private_urls": False, "fetch_attempts": 1})
    fetcher = Fetcher(settings)
    results: dict[str, str] = {}
    urls = {
        "public": "http://shop.example:8080/img.jpg",
        "rebind_direct": "http://rebind.example:8081/secret.jpg",
        **{name.strip("/"): f"http://shop.example:8080{name}" for name in REDIRECTS},
    }
    for name, url in urls.items():
        try:
            results[name] = f"ok {len(fetcher.fetch(url).data)} bytes"
        except FetchError as exc:
            results[name] = exc.reason
    hooks = WebhookSender(settings)
    for name, url in (
        ("webhook_public", "http://shop.example:8080/hook"),
        ("webhook_rebind", "http://rebind.example:8081/hook"),
    ):
        delivery = hooks.deliver(
            url,
            "msg_probe",
            {"probe": True},
            __import__("datetime").datetime.now(__import__("datetime").timezone.utc),
        )
        results[name] = "delivered" if delivery.ok else str(delivery.error)
    results["private_hits"] = ",".join(private_hits)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
