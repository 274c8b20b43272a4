"""The store's state changes against the real database: outcomes written once, a product
finished only when the database agrees, counters and products repaired from the truth,
claims that tell a crash take-over from a clean hand-back."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pymongo
import pytest

from imgproc.documents import (
    ImageOutcome,
    ProductWrite,
    new_product,
    product_id,
    upload_parts,
)
from imgproc.models import ImageStatus, ProductRow, ProductStatus
from imgproc.store import Store
from tests.conftest import stored_request

REQUEST = "0f8fad5b-d9cb-469f-a165-70867728950e"
DONE = ImageOutcome(ImageStatus.DONE, output_key="k", input_bytes=9, output_bytes=4).fields()
FAILED = ImageOutcome.failed("HTTP 404").fields()


@pytest.fixture
def store(mongo: Any) -> Store:
    store = Store(mongo)
    store.ensure_indexes()
    rows = [
        ProductRow(n + 2, n + 1, f"P{n}", ["http://a/1.jpg", "http://a/2.jpg"]) for n in range(2)
    ]
    products = [new_product(REQUEST, n, row) for n, row in enumerate(rows)]
    request = stored_request(REQUEST, store.clock(), products, parts=1)
    store.create_request(request, upload_parts(REQUEST, products))
    store.expand_upload(REQUEST, 1)
    return store


def product(store: Store, row: int) -> Any:
    return store.products.find_one({"_id": product_id(REQUEST, row)})


def test_outcomes_are_written_once_and_finish_the_product_with_them(store: Store) -> None:
    first = ProductWrite(product_id(REQUEST, 0), 2, {0: DONE})
    assert store.record_outcomes([first]) == 1
    again = ProductWrite(product_id(REQUEST, 0), 2, {0: FAILED})
    assert store.record_outcomes([again]) == 0  # already written: never overwritten
    last = ProductWrite(product_id(REQUEST, 0), 2, {1: FAILED}, ProductStatus.FAILED)
    assert store.record_outcomes([last]) == 1
    stored = product(store, 0)
    assert [i["status"] for i in stored["images"]] == ["done", "failed"]
    assert stored["status"] == "failed"


def test_a_product_is_finished_only_when_the_database_has_every_image(store: Store) -> None:
    """The job believes image 0 was written (say its write was lost with a database that
    broke its word): the finishing write does not apply, the product stays open, and the
    recount shows the open image for the next pass."""
    finishing = ProductWrite(product_id(REQUEST, 1), 2, {1: DONE}, ProductStatus.PROCESSED)
    assert store.record_outcomes([finishing]) == 0
    stored = product(store, 1)
    assert stored["status"] == "pending"
    assert [i["status"] for i in stored["images"]] == ["pending", "pending"]
    counts = store.count_outcomes(REQUEST, 2)
    assert (counts.images_done, counts.open_images, counts.misfinished) == (0, 4, ())


def test_a_product_marked_finished_with_an_open_image_is_reopened(store: Store) -> None:
    # The state an acknowledged-then-lost outcome left behind before writes were journaled.
    store.products.update_one(
        {"_id": product_id(REQUEST, 0)},
        {"$set": {"status": "processed", "images.0.status": "done"}},
    )
    counts = store.count_outcomes(REQUEST, 2)
    assert counts.misfinished == (product_id(REQUEST, 0),)
    assert counts.products_done == 0 and counts.images_done == 1 and counts.open_images == 3
    assert store.reopen_products(list(counts.misfinished)) == 1
    assert product(store, 0)["status"] == "processing"
    assert store.count_outcomes(REQUEST, 2).misfinished == ()


def test_a_claim_tells_a_take_over_from_a_clean_hand_back(store: Store) -> None:
    first = store.claim_request("a", 30)
    assert first is not None and not first.takeover  # never held before
    store.mark_fed(REQUEST, 2)
    store.release_lease(REQUEST, "a")  # clean: nothing of a's in flight
    second = store.claim_request("b", 30)
    assert second is not None and not second.takeover and second.suspect_rows == 0
    assert store.requests.find_one({"_id": REQUEST})["touched_rows"] == 2  # never lowered
    store.mark_fed(REQUEST, 1)
    store.requests.update_one(  # b dies: its lease runs out without a release
        {"_id": REQUEST}, {"$set": {"lease_until": store.clock() - timedelta(seconds=1)}}
    )
    third = store.claim_request("c", 30)
    assert third is not None and third.takeover and third.suspect_rows == 1
    assert store.claim_request("d", 30) is None  # c holds it now


def test_a_hand_back_after_a_pass_without_progress_waits_and_counts_the_stall(
    store: Store,
) -> None:
    assert store.claim_request("a", 30) is not None
    store.release_lease(REQUEST, "a", retry_at=store.clock() + timedelta(seconds=60))
    assert store.claim_request("b", 30) is None  # not before its retry time
    assert store.requests.find_one({"_id": REQUEST})["stalls"] == 1
    store.add_progress(REQUEST, done=1, failed=0, products=0)
    assert store.requests.find_one({"_id": REQUEST})["stalls"] == 0


def test_a_big_upload_is_stored_in_few_parts_and_expanded_once(mongo: Any) -> None:
    """Products are stored in parts of about 4 MB (two here), expanded into product documents
    by the worker: again after an expansion cut short, or by two processes, they are still
    there once each, and the parts are gone."""
    store = Store(mongo)
    request_id = "1f8fad5b-d9cb-469f-a165-70867728950e"
    long_urls = [f"http://images.example/{'x' * 1900}/{n}.jpg" for n in range(50)]
    rows = [ProductRow(n + 2, n + 1, f"P{n}", long_urls) for n in range(60)]  # ~6 MB of URLs
    products = [new_product(request_id, n, row) for n, row in enumerate(rows)]
    parts = upload_parts(request_id, products)
    assert len(parts) == 2 and sum(part["count"] for part in parts) == 60
    store.create_request({"_id": request_id, "parts": 2}, parts)
    ids = [product_id(request_id, n) for n in (0, 59)]
    assert [p["_id"] for p in store.products_from_parts(request_id, 2, ids)] == ids

    store.products.insert_many(parts[0]["products"][:7])  # an expansion cut short
    store.expand_upload(request_id, 2)
    store.expand_upload(request_id, 2)  # and another process doing it too
    assert store.products.count_documents({}) == 60
    assert store.upload_parts.count_documents({}) == 0
    assert store.requests.find_one({"_id": request_id})["parts"] == 0
    assert store.products_from_parts(request_id, 2, ids) == []


@pytest.mark.parametrize("claimed", [False, True])
def test_an_upload_whose_answer_was_lost_never_leaves_a_request_without_products(
    mongo: Any, claimed: bool
) -> None:
    """The server applied the request's insert but the answer was lost (here: the document
    is there before the insert, which then fails as a lost answer's retry would). The upload
    reports an error and takes the request back with its parts; a request a worker already
    holds keeps them, to be processed."""
    store = Store(mongo)
    store.ensure_indexes()
    request_id = "6a1c9d2e-1b7f-4a53-9d35-0c2f5e8b7a41"
    rows = [ProductRow(2, 1, "P", ["http://a/1.jpg"])]
    products = [new_product(request_id, 0, row) for row in rows]
    request = stored_request(request_id, store.clock(), products, parts=1)
    applied = {**request, "lease_owner": "a-worker" if claimed else None}
    store.requests.insert_one(applied)
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        store.create_request(request, upload_parts(request_id, products))
    kept = store.requests.find_one({"_id": request_id})
    parts = store.upload_parts.count_documents({})
    assert (kept is not None, parts) == ((True, 1) if claimed else (False, 0))
