"""Fuzzing: hypothesis properties of the CSV reader, and schemathesis against /openapi.json
(every operation: no 5xx, responses match the document). Bounded, so they run in make test."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from schemathesis.specs.openapi.checks import positive_data_acceptance

from imgproc.csv_input import parse_csv
from imgproc.errors import InvalidCsv
from imgproc.schemas import (
    _PLAIN_HTTP_URL,
    MAX_URL_LENGTH,
    CsvRowSchema,
    _checked_http_url,
    check_http_url,
)

HEADER = "S. No.,Product Name,Input Image Urls\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_csv_reader_on_any_bytes_returns_rows_or_the_validation_error(data: bytes) -> None:
    try:
        parsed = parse_csv(data, max_rows=50, max_urls_per_row=5)
    except InvalidCsv as exc:
        assert exc.details is not None and exc.message
        return
    assert parsed.rows and all(r.serial_number >= 1 and r.input_urls for r in parsed.rows)


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(cells, cells, cells), max_size=8))
def test_csv_reader_on_any_table_returns_rows_or_errors_with_row_and_column(
    table: list[tuple[str, str, str]],
) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    for row in table:
        writer.writerow(row)
    try:
        parsed = parse_csv((HEADER + out.getvalue()).encode(), max_rows=50, max_urls_per_row=5)
    except InvalidCsv as exc:
        for detail in exc.details:
            assert set(detail) == {"row", "column", "message"}
            assert detail["row"] is None or detail["row"] >= 1
        return
    serials = [r.serial_number for r in parsed.rows]
    assert len(serials) == len(set(serials))
    for row in parsed.rows:
        assert row.product_name.strip() == row.product_name and 0 < len(row.product_name) <= 512
        assert all(u.lower().startswith(("http://", "https://")) for u in row.input_urls)


# ---- the fast paths agree with the full checks ----------------------------------------------

# URLs made of parts that are mostly fine, with the edges of the rules mixed in: schemes,
# userinfo, brackets, bad ports, non-ASCII look-alikes (the Kelvin sign, fullwidth and
# Arabic-Indic digits), spaces and control characters.
url_text = st.builds(
    lambda *parts: "".join(parts),
    st.sampled_from(["", " "]),
    st.sampled_from(["http://"] * 4 + ["https://", "HTTP://", "hTtPs://", "ftp://", "http:/", ""]),
    st.one_of(
        st.from_regex(r"[a-z0-9.-]{1,12}", fullmatch=True),
        st.sampled_from(["u:p@h", "[::1]", "[::1", "\u212aelvin", "ex\u00e9.com", "", "a b"]),
    ),
    st.one_of(
        st.just(""),
        st.from_regex(r":[0-9]{0,6}", fullmatch=True),
        st.sampled_from([":\u0663", ":\uff11", ":x"]),
    ),
    st.one_of(
        st.just(""),
        st.from_regex(r"[/?#][!-~]{0,12}", fullmatch=True),
        st.text(max_size=6).map(lambda text: "/" + text),
    ),
    st.sampled_from(["", " ", "\t"]),
)


@settings(max_examples=1000, deadline=None)
@given(st.from_regex(_PLAIN_HTTP_URL, fullmatch=True).filter(lambda u: len(u) <= MAX_URL_LENGTH))
def test_a_plain_url_passes_every_check_of_a_url(url: str) -> None:
    assert _checked_http_url(url) == url


@settings(max_examples=1000, deadline=None)
@given(url_text)
def test_the_url_check_answers_as_its_full_checks_do(text: str) -> None:
    def outcome(check: Callable[[str], str], value: str) -> Any:
        try:
            return check(value)
        except ValidationError as exc:
            return exc.messages

    assert outcome(check_http_url, text) == outcome(_checked_http_url, text.strip())


serial_text = st.one_of(
    st.from_regex(r" ?\+?[1-9][0-9]{0,5} ?", fullmatch=True),
    st.from_regex(r"\s*[+-]?[0-9\u0663]{0,20}\s*", fullmatch=True),
    st.text(max_size=5),
)
name_text = st.one_of(
    st.text(min_size=1, max_size=8),
    st.text(max_size=3),
    st.builds(lambda n, pad: " " * pad + "x" * n, st.integers(505, 515), st.integers(0, 2)),
)
cells_text = st.builds(
    "".join,
    st.lists(
        st.one_of(url_text, st.sampled_from([",", ";", "|", " ", "\n", ", ", ",,"])),
        min_size=1,
        max_size=9,
    ),
)


@settings(max_examples=1000, deadline=None)
@given(serial_text, name_text, cells_text, st.integers(1, 4))
def test_a_row_loads_as_the_schema_loads_it(
    serial: str, name: str, urls: str, max_urls: int
) -> None:
    schema = CsvRowSchema(max_urls=max_urls)
    cells = {"serial_number": serial, "product_name": name, "input_urls": urls}

    def outcome(load: Callable[[dict[str, str]], Any]) -> Any:
        try:
            return load(cells)
        except ValidationError as exc:
            return exc.messages, exc.valid_data

    assert outcome(schema.load_row) == outcome(schema.load)


@pytest.mark.parametrize("line_mib", [10])
def test_a_ten_mib_line_is_a_clear_error(line_mib: int) -> None:
    data = (HEADER + "1,A," + "x" * (line_mib * 1024 * 1024) + "\n").encode()
    with pytest.raises(InvalidCsv) as caught:
        parse_csv(data, max_rows=10, max_urls_per_row=5)
    assert caught.value.details[0]["row"] == 2
    assert "field larger than field limit" in caught.value.details[0]["message"]


def test_every_operation_answers_within_the_document(make_app: Callable[..., Flask]) -> None:
    """schemathesis cases for every operation of /openapi.json against the real app (its
    pytest plugin does not run under this pytest, so the strategies are driven directly)."""
    app = make_app(start_worker=False)
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    documented = app.test_client().get("/openapi.json").get_json()["paths"]
    expected = {
        f"{method.upper()} {path}"
        for path, methods in documented.items()
        for method in methods
        if path != "/openapi.json"
    }  # schemathesis skips its own
    assert {operation.label for operation in operations} == expected
    checked: list[str] = []
    for operation in operations:

        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            # No 5xx; status code, content type, headers and body as documented. (Not
            # "schema-valid data is accepted": a file's content is not in the schema.)
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500

        run()
        checked.append(operation.label)
    assert any("POST /csv/upload" in label for label in checked)
