"""Deciding what to write for a batch of image results: a pure function, no database.

A job knows, for every product it works on, which images are still open. Results arrive
from the pipeline; every half second (or every so many) the job writes them: one
conditional update per touched product, the product's final status when its last image is
in, and one counter update. :func:`plan_flush` works out those writes and the job's view
after them; the job adopts that view only once the writes have succeeded, so a flush retried
after a database error plans the same writes again (and the conditional updates make the
repeat harmless).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imgproc.documents import ImageOutcome, ProductWrite
from imgproc.models import ProductStatus


@dataclass(frozen=True)
class OpenProduct:
    """What a job knows of a product it works on."""

    image_count: int
    open: frozenset[int]
    failed: bool = False


@dataclass(frozen=True)
class Result:
    """What became of one image, from the pipeline to its job.

    ``outcome`` None: not finished (a transient error, or the process is stopping); the image
    stays open for another pass. ``index`` None: no image at all, only a look at a product
    whose images were all written before its status was (a crash in between).
    """

    product_id: str
    index: int | None
    outcome: ImageOutcome | None


@dataclass(frozen=True)
class FlushPlan:
    """The writes of one flush and what the job knows once they are done."""

    writes: list[ProductWrite]
    done: int
    failed: int
    finished: int
    after: dict[str, OpenProduct]  # touched products still open after the writes
    closed: frozenset[str]  # touched products finished by the writes


def plan_flush(products: Mapping[str, OpenProduct], results: Sequence[Result]) -> FlushPlan:
    """The writes for ``results`` given the job's view ``products`` (not modified)."""
    writes: dict[str, ProductWrite] = {}
    state: dict[str, OpenProduct] = {}
    done = failed = 0
    for result in results:
        known = products.get(result.product_id)
        if known is None:
            continue  # not the job's (a result that arrived after the product was closed)
        current = state.setdefault(result.product_id, known)
        write = writes.setdefault(
            result.product_id, ProductWrite(result.product_id, known.image_count)
        )
        if result.index is None or result.outcome is None:
            continue
        if result.index not in current.open:
            continue  # already recorded (a duplicate result)
        write.outcomes[result.index] = result.outcome.fields()
        if result.outcome.ok:
            done += 1
        else:
            failed += 1
        state[result.product_id] = OpenProduct(
            current.image_count,
            current.open - {result.index},
            current.failed or not result.outcome.ok,
        )
    after: dict[str, OpenProduct] = {}
    closed: set[str] = set()
    for pid, product in state.items():
        if product.open:
            after[pid] = product
            continue
        writes[pid].finished = ProductStatus.FAILED if product.failed else ProductStatus.PROCESSED
        closed.add(pid)
    useful = [write for write in writes.values() if write.useful]
    return FlushPlan(useful, done, failed, len(closed), after, frozenset(closed))
