""".xlsx bytes -> the rows of the workbook's first sheet as text; the only user of openpyxl.

A workbook is a ZIP of XML parts, so a hostile one is a zip bomb or an XML bomb before it is
a spreadsheet: the archive's member count, sizes and compression ratios are checked before
openpyxl opens it, openpyxl parses through defusedxml (entities and DTDs refused), reads
cached values of formulas without evaluating anything and ignores external links.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Any

import openpyxl
from openpyxl.reader.excel import load_workbook

from imgproc.errors import InvalidCsv

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
OLE_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls, and any encrypted workbook
MAX_MEMBERS = 1000
MAX_UNCOMPRESSED = 100 * 1024 * 1024
MAX_RATIO = 100  # uncompressed / compressed, for members over RATIO_FLOOR
RATIO_FLOOR = 1024 * 1024
MAX_SHEET_ROW = 1_048_576  # Excel's own last row

SAVE_AS = 'save it as .xlsx or as "CSV UTF-8" and upload it again'


def is_office_file(data: bytes) -> bool:
    """True for a ZIP archive (an .xlsx workbook or a file posing as one) or an OLE file."""
    return data.startswith(ZIP_SIGNATURES) or data.startswith(OLE_SIGNATURE)


def first_sheet_rows(data: bytes, *, max_columns: int) -> Iterator[tuple[int, list[str]]]:
    """(sheet row number, cell texts) of the first worksheet, at most ``max_columns + 1``
    cells a row (one more than allowed, so a too-wide table shows); InvalidCsv when the
    file is not a workbook that can be read safely."""
    if data.startswith(OLE_SIGNATURE):
        raise InvalidCsv(
            "the file is a legacy .xls workbook or a password-protected one; "
            "remove the password and " + SAVE_AS
        )
    _check_archive(data)
    # openpyxl warns about formatting it drops (extensions, missing default style): nothing
    # this reader uses. Set per call: a test's warning filters are reset between tests.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"openpyxl\.")
    if not openpyxl.DEFUSEDXML:  # pragma: no cover - a broken install, not an input
        raise RuntimeError("openpyxl must parse workbooks through defusedxml")
    try:
        workbook = load_workbook(
            io.BytesIO(data), read_only=True, data_only=True, keep_links=False, keep_vba=False
        )
    except Exception as exc:  # openpyxl's errors on a malformed workbook have no common type
        raise _unreadable(exc) from None
    try:
        if not workbook.worksheets:
            raise InvalidCsv("the workbook has no worksheet")
        sheet = workbook.worksheets[0]
        sheet.reset_dimensions()  # the stored dimension may be stale or a lie: read every row
        rows = sheet.iter_rows(max_col=max_columns + 1, values_only=True)
        number = 0
        while True:
            try:
                values = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # a malformed sheet part, found while streaming it
                raise _unreadable(exc) from None
            number += 1
            if number > MAX_SHEET_ROW:
                raise InvalidCsv(f"the worksheet has rows past row {MAX_SHEET_ROW:,}")
            if values.count(None) == len(values):
                yield number, []  # the common case in sparse sheets: no conversion
            else:
                yield number, [cell_text(value) for value in values]
    finally:
        workbook.close()


def _check_archive(data: bytes) -> None:
    """Refuse archives that are not workbooks, or that would unpack to far too much."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidCsv(
            f"the file is a damaged ZIP archive, not a readable workbook ({exc})"
        ) from None
    names = {member.filename for member in members}
    if "xl/workbook.bin" in names:
        raise InvalidCsv("the file is a binary .xlsb workbook; " + SAVE_AS)
    if "mimetype" in names and "content.xml" in names:
        raise InvalidCsv("the file is an OpenDocument spreadsheet; " + SAVE_AS)
    if "[Content_Types].xml" not in names or not any(n.startswith("xl/") for n in names):
        raise InvalidCsv("the file is a ZIP archive, not an .xlsx workbook; " + SAVE_AS)
    if len(members) > MAX_MEMBERS:
        raise InvalidCsv(f"the workbook has more than {MAX_MEMBERS} parts")
    total = 0
    for member in members:
        if member.flag_bits & 0x1:
            raise InvalidCsv("the workbook is encrypted; remove the password and " + SAVE_AS)
        total += member.file_size
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
            raise InvalidCsv(
                f"the workbook part {member.filename!r} is compressed {ratio:,.0f} to 1 "
                f"(over {MAX_RATIO} to 1: a ZIP bomb?)"
            )
    if total > MAX_UNCOMPRESSED:
        raise InvalidCsv(
            f"the workbook unpacks to {total / 2**20:,.0f} MiB, over the limit of "
            f"{MAX_UNCOMPRESSED // 2**20} MiB"
        )


def _unreadable(exc: Exception) -> InvalidCsv:
    detail = str(exc) or type(exc).__name__
    return InvalidCsv(f"the workbook cannot be read ({detail[:120]}); " + SAVE_AS)


def cell_text(value: Any) -> str:
    """A cell's value as the text a spreadsheet shows for it (1.0 as 1, dates as ISO 8601)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.15g}"  # Excel shows 15 significant digits
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == time() else value.isoformat(" ")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    return str(value)
