"""docs/ kept in step with the code: every module has its role in the design, every metric
is listed on the operations page."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from imgproc import metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"
PACKAGE = Path(__file__).resolve().parent.parent / "imgproc"


def test_the_design_names_every_module() -> None:
    design = (DOCS / "design.md").read_text()
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")]
    missing = [
        str(module)
        for module in modules
        if module.name != "__init__.py"
        and f"`{module.name}`" not in design
        and f"`{module}`" not in design
    ]
    assert missing == []


def test_the_operations_page_lists_every_metric() -> None:
    page = (DOCS / "operations.md").read_text()
    scraped = {
        family.name + ("_total" if family.type == "counter" else "")
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    }
    assert len(scraped) >= 10
    scraped |= {"imgproc_requests", "imgproc_images_waiting", "imgproc_database_up"}
    missing = sorted(name for name in scraped if f"`{name}`" not in page)
    assert missing == []
