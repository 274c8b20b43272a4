"""An uploaded table -> validated rows; every problem reported with its row and column.

A CSV is read in whatever encoding and delimiter its spreadsheet tool wrote (see
text_decoding); an .xlsx workbook's first sheet (see xlsx_input) goes through the same rules.
Row numbers are spreadsheet row numbers: the header is row 1, the first product row 2.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterator
from typing import Any

from marshmallow import ValidationError

from imgproc import xlsx_input
from imgproc.errors import InvalidCsv
from imgproc.models import ParsedCsv, ProductRow
from imgproc.schemas import ROLE_COLUMNS, CsvRowSchema
from imgproc.text_decoding import decode_text

MAX_DETAILS = 100
MAX_COLUMNS = 100

# Header names are compared with case, spaces and punctuation removed, so "S. No.",
# "S.No.", "S No" and "sno" all match.
_HEADER_ALIASES = {
    "sno": "serial_number",
    "serialnumber": "serial_number",
    "serialno": "serial_number",
    "productname": "product_name",
    "inputimageurls": "input_urls",
}
OUTPUT_COLUMN = "Output Image Urls"


def _header_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class _Problems:
    """Collects validation details up to the cap."""

    def __init__(self) -> None:
        self.details: list[dict[str, Any]] = []
        self.total = 0

    def add(self, row: int | None, column: str | None, message: str) -> None:
        self.total += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append({"row": row, "column": column, "message": message})

    def raise_if_any(self) -> None:
        if not self.total:
            return
        more = self.total - len(self.details)
        suffix = f" (showing the first {len(self.details)})" if more > 0 else ""
        noun = "problem" if self.total == 1 else "problems"
        raise InvalidCsv(f"the CSV has {self.total} {noun}{suffix}", self.details)


def _claim_serial(
    serials: dict[int, int], serial: int | None, row_number: int, problems: _Problems
) -> bool:
    """Record the row of a serial number; False (and a problem) when an earlier row has it."""
    if serial is None:
        return True
    first = serials.setdefault(serial, row_number)
    if first != row_number:
        problems.add(
            row_number,
            ROLE_COLUMNS["serial_number"],
            f"duplicate serial number {serial} (first at row {first})",
        )
        return False
    return True


def _roles(header: list[str], header_row: int, problems: _Problems) -> dict[str, int]:
    roles: dict[str, int] = {}
    seen: dict[str, int] = {}
    for index, name in enumerate(header):
        key = _header_key(name)
        if key in seen and key:
            problems.add(
                header_row, name.strip(), f"duplicate column (also column {seen[key] + 1})"
            )
        seen.setdefault(key, index)
        role = _HEADER_ALIASES.get(key)
        if role and role not in roles:
            roles[role] = index
    for role, column in ROLE_COLUMNS.items():
        if role not in roles:
            problems.add(header_row, column, f"missing column '{column}'")
    return roles


DELIMITERS = (",", ";", "\t")


class _Unreadable(Exception):
    """A row that cannot be read at all; ends the reading with a problem on that row."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row
        self.message = message


Rows = Iterator[tuple[int, list[str]]]  # (spreadsheet row number, cells), header first


def parse_upload(data: bytes, *, max_rows: int, max_urls_per_row: int) -> ParsedCsv:
    """Validate an uploaded file, a CSV or an .xlsx workbook; InvalidCsv lists every problem."""
    if xlsx_input.is_office_file(data):
        rows = xlsx_input.first_sheet_rows(data, max_columns=MAX_COLUMNS)
        return _validate(rows, max_rows=max_rows, max_urls_per_row=max_urls_per_row)
    return parse_csv(data, max_rows=max_rows, max_urls_per_row=max_urls_per_row)


def parse_csv(data: bytes, *, max_rows: int, max_urls_per_row: int) -> ParsedCsv:
    """Validate a CSV in any of the encodings and delimiters API.md lists."""
    decoded = decode_text(data)
    rows = _csv_rows(decoded.text, _delimiter(decoded.text))
    parsed = _validate(rows, max_rows=max_rows, max_urls_per_row=max_urls_per_row)
    return dataclasses.replace(parsed, encoding=decoded.encoding)


def _delimiter(text: str) -> str:
    """The delimiter that splits the header line into the most known column names (not the
    most frequent character: URL cells may well hold semicolons or commas)."""

    def known(delimiter: str) -> int:
        try:
            header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
        except (csv.Error, StopIteration):
            return 0
        return len({_HEADER_ALIASES.get(_header_key(name)) for name in header} - {None})

    return max(DELIMITERS, key=known)  # ties go to the first: comma


def _csv_rows(text: str, delimiter: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    row_number = 0
    while True:
        row_number += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _Unreadable(row_number, f"cannot be read as CSV: {exc}") from None
        yield row_number, cells


def _validate(rows: Rows, *, max_rows: int, max_urls_per_row: int) -> ParsedCsv:
    """The header and product rows of a table, validated all or nothing."""
    problems = _Problems()
    try:
        header_row, header = _header(rows)
    except _Unreadable as exc:
        raise InvalidCsv(f"row {exc.row} {exc.message}") from None
    if len(header) > MAX_COLUMNS:
        raise InvalidCsv(f"the header has more than {MAX_COLUMNS} columns")
    roles = _roles(header, header_row, problems)
    problems.raise_if_any()

    schema = CsvRowSchema(max_urls=max_urls_per_row)
    extra_columns = [
        (index, name)
        for index, name in enumerate(header)
        if index not in roles.values() and name != OUTPUT_COLUMN
    ]
    parsed_rows: list[ProductRow] = []
    serials: dict[int, int] = {}
    try:
        for row_number, cells in rows:
            if not any(c.strip() for c in cells):
                continue  # blank lines, common at the end of exported files
            if len(parsed_rows) >= max_rows:
                raise InvalidCsv(f"the file has more than {max_rows} product rows")
            row = _product(
                header, roles, extra_columns, schema, serials, row_number, cells, problems
            )
            if row is not None:
                parsed_rows.append(row)
    except _Unreadable as exc:
        problems.add(exc.row, None, exc.message)
    if not parsed_rows and not problems.total:
        raise InvalidCsv("the file has a header but no product rows")
    problems.raise_if_any()
    return ParsedCsv(header=header, roles=roles, rows=parsed_rows)


def _header(rows: Rows) -> tuple[int, list[str]]:
    """The first row that is not blank, its trailing empty cells dropped."""
    for number, cells in rows:
        if any(c.strip() for c in cells):
            header = [h.strip() for h in cells]
            while not header[-1]:
                header.pop()
            return number, header
    raise InvalidCsv("the file is empty")


def _product(
    header: list[str],
    roles: dict[str, int],
    extra_columns: list[tuple[int, str]],
    schema: CsvRowSchema,
    serials: dict[int, int],
    row_number: int,
    cells: list[str],
    problems: _Problems,
) -> ProductRow | None:
    """One validated product row, or None with its problems recorded."""
    if len(cells) != len(header):
        cells = list(cells)
        while len(cells) > len(header) and not cells[-1].strip():
            cells.pop()  # trailing empty cells, as spreadsheets often write
        if len(cells) > len(header):
            problems.add(
                row_number,
                None,
                f"has {len(cells)} cells but the header has {len(header)} columns",
            )
            return None
        cells += [""] * (len(header) - len(cells))
    raw = {role: cells[index] for role, index in roles.items()}
    try:
        loaded = schema.load_row(raw)
    except ValidationError as exc:
        for role, messages in sorted(
            _flatten(exc.messages).items(), key=lambda item: roles.get(item[0], 0)
        ):
            for message in messages:
                problems.add(row_number, ROLE_COLUMNS.get(role, role), message)
        # A row with other problems still claims its serial number: a later duplicate of
        # it is a problem of its own, reported now rather than after the first fix.
        valid = exc.valid_data if isinstance(exc.valid_data, dict) else {}
        _claim_serial(serials, valid.get("serial_number"), row_number, problems)
        return None
    if not _claim_serial(serials, loaded["serial_number"], row_number, problems):
        return None
    extra = {name: cells[index] for index, name in extra_columns}
    return ProductRow(row=row_number, extra=extra, **loaded)


def _flatten(messages: Any) -> dict[str, list[str]]:
    """marshmallow's error dict -> {field: [message, ...]} with list items collapsed."""
    out: dict[str, list[str]] = {}
    for field, value in messages.items():
        if isinstance(value, dict):  # per-item errors of a list field
            out[field] = [m for item in value.values() for m in item]
        else:
            out[field] = list(value)
    return out
