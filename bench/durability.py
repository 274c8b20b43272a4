"""What journaled writes cost: the store's write patterns under each write concern.

The service writes everything with ``{w: "majority", j: true}`` (acknowledged means
durable). Against the embedded database (SecantusDB, started as ``make run`` starts it, in
a throw-away directory) this times, with pymongo directly:

- the upload: N product documents in ``insert_many`` batches of 1,000;
- an outcome flush: one ``bulk_write`` of 128 conditional ``update_one`` (an image's
  outcome, only if that image is not finished yet);
- a single ``update_one`` by ``_id`` (a progress counter, a lease renewal);

under the server's default, ``{w: 1}``, ``{w: "majority"}`` and ``{w: "majority", j: true}``.
The concerns take turns at every step (each on its own collection), so the machine's
drift touches them alike. Prints a table and one JSON line (the last line).

Usage: python bench/durability.py [--products 10000] [--bulks 20] [--singles 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.write_concern import WriteConcern

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import markdown  # noqa: E402

from imgproc import embedded_db  # noqa: E402
from imgproc.documents import new_product, new_request  # noqa: E402
from imgproc.models import ProductRow  # noqa: E402

Doc = dict[str, Any]

CONCERNS: dict[str, WriteConcern] = {
    "default": WriteConcern(),
    "w:1": WriteConcern(w=1),
    "w:majority": WriteConcern(w="majority"),
    "w:majority,j": WriteConcern(w="majority", j=True),
}
INSERT_BATCH = 1000
BULK = 128


def milliseconds(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples`` (seconds) in milliseconds."""
    ordered = sorted(samples)
    return {
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def products(request_id: str, count: int) -> list[Doc]:
    """Product documents as an upload stores them (two image URLs each)."""
    return [
        new_product(
            request_id,
            row,
            ProductRow(
                row=row + 2,
                serial_number=row + 1,
                product_name=f"Product {row + 1}",
                input_urls=[
                    f"https://cdn.example.com/catalogue/{row}/front.jpg",
                    f"https://cdn.example.com/catalogue/{row}/back.jpg",
                ],
            ),
        )
        for row in range(count)
    ]


def outcome_update(product_id: str, index: int) -> UpdateOne:
    """One image's outcome, written only if the image is not finished yet."""
    return UpdateOne(
        {"_id": product_id, f"images.{index}.status": {"$nin": ["done", "failed"]}},
        {
            "$set": {
                f"images.{index}.status": "done",
                f"images.{index}.output_url": f"/images/{product_id}-{index}.jpg",
                f"images.{index}.input_bytes": 412_345,
                f"images.{index}.output_bytes": 98_765,
                f"images.{index}.width": 1600,
                f"images.{index}.height": 1200,
                f"images.{index}.format": "JPEG",
            }
        },
    )


def measure(uri: str, *, count: int, bulks: int, singles: int) -> dict[str, Any]:
    """Time the three write patterns under every concern; figures by pattern and concern."""
    client: MongoClient[Doc] = MongoClient(uri, tz_aware=True)
    try:
        db = client["imgproc_durability_bench"]
        client.drop_database(db.name)
        names = list(CONCERNS)
        product_colls: dict[str, Collection[Doc]] = {}
        request_colls: dict[str, Collection[Doc]] = {}
        docs: dict[str, list[Doc]] = {}
        for n, name in enumerate(names):
            product_colls[name] = db.get_collection(f"products_{n}", write_concern=CONCERNS[name])
            request_colls[name] = db.get_collection(f"requests_{n}", write_concern=CONCERNS[name])
            docs[name] = products(f"request-{n}", count)
            request_colls[name].insert_one(
                new_request(
                    f"request-{n}",
                    datetime.now(UTC),
                    products_total=count,
                    images_total=2 * count,
                    quality=50,
                    output_format="JPEG",
                    webhook_url=None,
                    header=["S. No.", "Product Name", "Input Image Urls"],
                    roles={"serial": 0, "name": 1, "urls": 2},
                    base_url="http://127.0.0.1:8000",
                    owner=None,
                )
            )
            product_colls[name].insert_one({"_id": "warm-up"})  # creates the collection

        def turns(step: int) -> list[str]:
            return names[step % len(names) :] + names[: step % len(names)]

        inserts: dict[str, list[float]] = {name: [] for name in names}
        for step, start in enumerate(range(0, count, INSERT_BATCH)):
            for name in turns(step):
                batch = docs[name][start : start + INSERT_BATCH]
                began = time.perf_counter()
                product_colls[name].insert_many(batch, ordered=False)
                inserts[name].append(time.perf_counter() - began)

        flushes: dict[str, list[float]] = {name: [] for name in names}
        images = [(row, index) for index in (0, 1) for row in range(count)]
        for step in range(bulks):
            chunk = images[(step * BULK) % len(images) :][:BULK]
            for name in turns(step):
                ids = [docs[name][row]["_id"] for row, _ in chunk]
                operations = [
                    outcome_update(product_id, index)
                    for product_id, (_, index) in zip(ids, chunk, strict=True)
                ]
                began = time.perf_counter()
                product_colls[name].bulk_write(operations, ordered=True)
                flushes[name].append(time.perf_counter() - began)

        updates: dict[str, list[float]] = {name: [] for name in names}
        for step in range(singles):
            for name in turns(step):
                began = time.perf_counter()
                request_colls[name].update_one(
                    {"_id": f"request-{names.index(name)}"},
                    {"$inc": {"images_done": 1, "version": 1}, "$set": {"updated_at": 0}},
                )
                updates[name].append(time.perf_counter() - began)
        client.drop_database(db.name)
    finally:
        client.close()

    figures: dict[str, Any] = {"products": count, "bulks": bulks, "singles": singles}
    for name in names:
        total = sum(inserts[name])
        figures[name] = {
            "insert_s": round(total, 3),
            "insert_docs_per_s": round(count / total),
            "insert_batch": milliseconds(inserts[name]),
            "bulk_128": milliseconds(flushes[name]),
            "update_one": milliseconds(updates[name]),
        }
    return figures


def table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table, one column per write concern."""
    names = [name for name in CONCERNS if name in figures]

    def pair(figure: dict[str, float], decimals: int) -> str:
        return f"{figure['p50_ms']:.{decimals}f} / {figure['p99_ms']:.{decimals}f}"

    rows = [
        [
            f"insert {figures['products']:,} products, {INSERT_BATCH:,} a batch: s",
            *(f"{figures[n]['insert_s']:.2f}" for n in names),
        ],
        [
            f"bulk of {BULK} outcome updates: p50 / p99 ms",
            *(pair(figures[n]["bulk_128"], 0) for n in names),
        ],
        ["single update_one: p50 / p99 ms", *(pair(figures[n]["update_one"], 1) for n in names)],
    ]
    return "\n".join(markdown(["write concern", *names], rows))


def run(*, count: int, bulks: int, singles: int) -> dict[str, Any]:
    """Start a throw-away embedded database, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="imgproc-durability-") as tmp:
        database = embedded_db.start(str(Path(tmp) / "db"), log_path=str(Path(tmp) / "db.log"))
        try:
            return measure(database.uri, count=count, bulks=bulks, singles=singles)
        finally:
            database.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--bulks", type=int, default=20)
    parser.add_argument("--singles", type=int, default=200)
    args = parser.parse_args()
    figures = run(count=args.products, bulks=args.bulks, singles=args.singles)
    print(table(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
