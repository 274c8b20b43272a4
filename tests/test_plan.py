"""Planning the writes of a batch of results: a pure function, checked without a database."""

from __future__ import annotations

import pytest

from imgproc.documents import ImageOutcome
from imgproc.models import ImageStatus, ProductStatus
from imgproc.worker.plan import OpenProduct, Result, plan_flush

DONE = ImageOutcome(ImageStatus.DONE, output_key="k", input_bytes=10, output_bytes=5)
FAILED = ImageOutcome.failed("HTTP 404")


def product(count: int, *open_: int, failed: bool = False) -> OpenProduct:
    return OpenProduct(count, frozenset(open_), failed)


@pytest.mark.parametrize(
    ("known", "results", "expected"),
    [
        pytest.param(
            {"a": product(2, 0, 1)},
            [Result("a", 0, DONE)],
            {"writes": {"a": ([0], None)}, "counts": (1, 0, 0), "after": {"a": [1]}},
            id="one of two images: outcome written, product stays open",
        ),
        pytest.param(
            {"a": product(2, 0, 1)},
            [Result("a", 0, DONE), Result("a", 1, DONE)],
            {"writes": {"a": ([0, 1], "processed")}, "counts": (2, 0, 1), "after": {}},
            id="last image in: the product is finished in the same write",
        ),
        pytest.param(
            {"a": product(2, 1)},
            [Result("a", 1, FAILED)],
            {"writes": {"a": ([1], "failed")}, "counts": (0, 1, 1), "after": {}},
            id="a failed image fails its product",
        ),
        pytest.param(
            {"a": product(2, 1, failed=True)},
            [Result("a", 1, DONE)],
            {"writes": {"a": ([1], "failed")}, "counts": (1, 0, 1), "after": {}},
            id="an image that failed in an earlier batch still fails the product",
        ),
        pytest.param(
            {"a": product(2, 0, 1)},
            [Result("a", 0, None), Result("a", 1, DONE)],
            {"writes": {"a": ([1], None)}, "counts": (1, 0, 0), "after": {"a": [0]}},
            id="an unfinished image stays open and writes nothing",
        ),
        pytest.param(
            {"a": product(1, 0)},
            [Result("a", 0, None)],
            {"writes": {}, "counts": (0, 0, 0), "after": {"a": [0]}},
            id="nothing finished: no write at all",
        ),
        pytest.param(
            {"a": product(3)},
            [Result("a", None, None)],
            {"writes": {"a": ([], "processed")}, "counts": (0, 0, 1), "after": {}},
            id="all images written before a crash: only the product's status",
        ),
        pytest.param(
            {"a": product(1, 0)},
            [Result("a", 0, DONE), Result("a", 0, FAILED)],
            {"writes": {"a": ([0], "processed")}, "counts": (1, 0, 1), "after": {}},
            id="a duplicate result for an image counts once",
        ),
        pytest.param(
            {"a": product(1, 0)},
            [Result("gone", 0, DONE)],
            {"writes": {}, "counts": (0, 0, 0), "after": {}},
            id="a result for a product the job no longer tracks is ignored",
        ),
        pytest.param(
            {"a": product(1, 0), "b": product(2, 0, 1)},
            [Result("b", 1, FAILED), Result("a", 0, DONE)],
            {
                "writes": {"a": ([0], "processed"), "b": ([1], None)},
                "counts": (1, 1, 1),
                "after": {"b": [0]},
            },
            id="several products in one batch",
        ),
    ],
)
def test_plan_flush(
    known: dict[str, OpenProduct], results: list[Result], expected: dict[str, object]
) -> None:
    plan = plan_flush(known, results)

    writes = {
        w.product_id: (sorted(w.outcomes), w.finished.value if w.finished else None)
        for w in plan.writes
    }
    assert writes == expected["writes"]
    assert (plan.done, plan.failed, plan.finished) == expected["counts"]
    assert {pid: sorted(p.open) for pid, p in plan.after.items()} == expected["after"]
    assert plan.closed == {w.product_id for w in plan.writes if w.finished}
    assert all(w.useful for w in plan.writes)


def test_the_plan_leaves_the_jobs_view_alone_so_a_retry_plans_the_same() -> None:
    known = {"a": product(2, 0, 1)}
    results = [Result("a", 0, DONE), Result("a", 1, FAILED)]
    first = plan_flush(known, results)
    again = plan_flush(known, results)
    assert known == {"a": product(2, 0, 1)}
    assert first == again


def test_outcome_fields_are_what_the_status_shows() -> None:
    (write,) = plan_flush({"a": product(2, 0, 1)}, [Result("a", 0, DONE)]).writes
    assert write.outcomes[0] == {
        "status": "done",
        "error": None,
        "output_key": "k",
        "input_bytes": 10,
        "output_bytes": 5,
        "width": None,
        "height": None,
        "format": None,
        "kept_original": False,
    }
    (failed,) = plan_flush({"a": product(1, 0)}, [Result("a", 0, FAILED)]).writes
    assert failed.outcomes[0] == {"status": "failed", "error": "HTTP 404"}
    assert failed.finished is ProductStatus.FAILED
