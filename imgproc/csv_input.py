"""CSV bytes -> validated rows; every problem reported with its row and column.

Row numbers are spreadsheet row numbers: the header is row 1, the first product row 2.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from marshmallow import ValidationError

from imgproc.errors import InvalidCsv
from imgproc.models import ParsedCsv, ProductRow
from imgproc.schemas import ROLE_COLUMNS, CsvRowSchema

MAX_DETAILS = 100

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


def decode(data: bytes) -> str:
    """UTF-8 text without a byte-order mark, or InvalidCsv saying where it is not."""
    if not data.strip():
        raise InvalidCsv("the file is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InvalidCsv(f"the file contains a NUL byte at offset {nul}; is it really a CSV?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidCsv(
            f"the file is not UTF-8 text (bad byte at line {line}, "
            f"offset {exc.start}); save it as CSV UTF-8"
        ) from None


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


def _roles(header: list[str], problems: _Problems) -> dict[str, int]:
    roles: dict[str, int] = {}
    seen: dict[str, int] = {}
    for index, name in enumerate(header):
        key = _header_key(name)
        if key in seen and key:
            problems.add(1, name.strip(), f"duplicate column (also column {seen[key] + 1})")
        seen.setdefault(key, index)
        role = _HEADER_ALIASES.get(key)
        if role and role not in roles:
            roles[role] = index
    for role, column in ROLE_COLUMNS.items():
        if role not in roles:
            problems.add(1, column, f"missing column '{column}'")
    return roles


def parse_csv(data: bytes, *, max_rows: int, max_urls_per_row: int) -> ParsedCsv:
    """Validate a whole CSV file; raise InvalidCsv listing every problem found."""
    text = decode(data)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems = _Problems()
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InvalidCsv("the file is empty") from None
    except csv.Error as exc:
        raise InvalidCsv(f"row 1 cannot be read as CSV: {exc}") from None
    roles = _roles(header, problems)
    problems.raise_if_any()

    schema = CsvRowSchema(max_urls=max_urls_per_row)
    rows: list[ProductRow] = []
    serials: dict[int, int] = {}
    row_number = 1
    while True:
        row_number += 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.add(row_number, None, f"cannot be read as CSV: {exc}")
            break
        if not any(c.strip() for c in cells):
            continue  # blank lines, common at the end of exported files
        if len(rows) >= max_rows:
            raise InvalidCsv(f"the file has more than {max_rows} product rows")
        while len(cells) > len(header) and not cells[-1].strip():
            cells.pop()  # trailing empty cells, as spreadsheets often write
        if len(cells) > len(header):
            problems.add(
                row_number, None, f"has {len(cells)} cells but the header has {len(header)} columns"
            )
            continue
        cells += [""] * (len(header) - len(cells))
        raw = {role: cells[index] for role, index in roles.items()}
        try:
            loaded = schema.load(raw)
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
            continue
        if not _claim_serial(serials, loaded["serial_number"], row_number, problems):
            continue
        extra = {
            name: cells[i]
            for i, name in enumerate(header)
            if i not in roles.values() and name != OUTPUT_COLUMN
        }
        rows.append(ProductRow(row=row_number, extra=extra, **loaded))
    if not rows and not problems.total:
        raise InvalidCsv("the file has a header but no product rows")
    problems.raise_if_any()
    return ParsedCsv(header=header, roles=roles, rows=rows)


def _flatten(messages: Any) -> dict[str, list[str]]:
    """marshmallow's error dict -> {field: [message, ...]} with list items collapsed."""
    out: dict[str, list[str]] = {}
    for field, value in messages.items():
        if isinstance(value, dict):  # per-item errors of a list field
            out[field] = [m for item in value.values() for m in item]
        else:
            out[field] = list(value)
    return out
