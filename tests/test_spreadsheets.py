"""Spreadsheets as users' tools write them: the five exports of the issue through the real
upload endpoint (names intact in the database), .xlsx workbooks written by openpyxl, and
hostile workbooks (zip bombs, XML bombs, lying sizes) refused with a clear message."""

from __future__ import annotations

import io
import struct
import time
import zipfile
from collections.abc import Callable
from typing import Any

import openpyxl
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pytest_httpserver import HTTPServer

from imgproc.csv_input import MAX_COLUMNS, parse_upload
from imgproc.errors import InvalidCsv
from imgproc.xlsx_input import MAX_MEMBERS, MAX_UNCOMPRESSED
from tests.conftest import make_image, serve, wait_terminal

NAME = "Café crème – 250 g®"
URL_1 = "https://img.example.com/cafe-1.jpg"
URL_2 = "https://img.example.com/cafe-2.jpg"
URL_3 = "https://img.example.com/the.jpg"
HEADER = ["S. No.", "Product Name", "Input Image Urls"]


def parse(data: bytes, max_rows: int = 100) -> Any:
    return parse_upload(data, max_rows=max_rows, max_urls_per_row=50)


def refusal(data: bytes, **kwargs: Any) -> InvalidCsv:
    with pytest.raises(InvalidCsv) as caught:
        parse(data, **kwargs)
    return caught.value


# ---- how the tools write the two products ----------------------------------------------------


def excel_text(delimiter: str, rows: list[list[str]]) -> str:
    """Cells the way Excel saves them: quoted when they hold the delimiter, a quote or a line
    break (quotes doubled), CRLF between rows, LF inside a cell (Alt+Enter)."""

    def cell(value: str) -> str:
        if any(c in value for c in (delimiter, '"', "\n", "\r")):
            return '"' + value.replace('"', '""') + '"'
        return value

    return "".join(delimiter.join(cell(v) for v in row) + "\r\n" for row in rows)


def products(urls_1: str = f"{URL_1},{URL_2}") -> list[list[str]]:
    return [HEADER, ["1", NAME, urls_1], ["2", "Thé vert", URL_3]]


def excel_eu_csv_utf8() -> bytes:
    """Excel "CSV UTF-8" in a European locale: BOM, semicolons."""
    return b"\xef\xbb\xbf" + excel_text(";", products()).encode("utf-8")


def excel_unicode_text() -> bytes:
    """Excel "Unicode Text": UTF-16 LE with BOM, tab-separated."""
    return b"\xff\xfe" + excel_text("\t", products()).encode("utf-16-le")


def excel_windows_csv() -> bytes:
    """Excel "CSV (Comma delimited)" on Windows: the ANSI code page, Windows-1252."""
    return excel_text(",", products()).encode("cp1252")


def excel_alt_enter_csv() -> bytes:
    """URLs one per line inside the cell (Alt+Enter) and space-separated, CSV UTF-8."""
    rows = products(f"{URL_1}\n{URL_2}")
    rows[2][2] = f"{URL_3} {URL_1}"
    return b"\xef\xbb\xbf" + excel_text(",", rows).encode("utf-8")


def workbook(rows: list[list[Any]], *, more_sheets: int = 0) -> bytes:
    """A real .xlsx written by openpyxl."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Products"
    for row in rows:
        sheet.append(row)
    for index in range(more_sheets):
        book.create_sheet(f"Other {index}").append(["not", "these"])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def excel_workbook() -> bytes:
    return workbook([HEADER, [1, NAME, f"{URL_1}\n{URL_2}"], [2, "Thé vert", URL_3]], more_sheets=1)


def rewrite(data: bytes, part: str, change: Callable[[bytes], bytes]) -> bytes:
    """The same ZIP with one member's content changed."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            target.writestr(info.filename, change(content) if info.filename == part else content)
    return out.getvalue()


SHEET = "xl/worksheets/sheet1.xml"

# ---- the five cases of the issue, through the real endpoint -----------------------------------


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(start_worker=False)


def upload_file(client: FlaskClient, data: bytes, filename: str) -> Any:
    form = {"file": (io.BytesIO(data), filename)}
    return client.post("/csv/upload", data=form, content_type="multipart/form-data")


@pytest.mark.parametrize(
    ("make", "filename", "encoding"),
    [
        (excel_eu_csv_utf8, "products.csv", "utf-8"),
        (excel_unicode_text, "products.txt", "utf-16-le"),
        (excel_windows_csv, "products.csv", "cp1252"),
        (excel_alt_enter_csv, "products.csv", "utf-8"),
        (excel_workbook, "products.xlsx", None),
    ],
    ids=[
        "excel-eu-semicolon-bom",
        "excel-unicode-text",
        "excel-windows-cp1252",
        "alt-enter",
        "xlsx",
    ],
)
def test_the_five_spreadsheet_exports_are_accepted_with_names_intact(
    client: FlaskClient, mongo: Any, make: Callable[[], bytes], filename: str, encoding: str | None
) -> None:
    response = upload_file(client, make(), filename)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["products"] == 2
    assert body.get("encoding") == encoding
    stored = client.get(f"/csv/status/{body['request_id']}").get_json()["products"]
    assert [p["product_name"] for p in stored] == [NAME, "Thé vert"]
    assert [p["serial_number"] for p in stored] == [1, 2]
    urls = [p["input_image_urls"] for p in stored]
    if make is excel_alt_enter_csv:
        assert urls == [[URL_1, URL_2], [URL_3, URL_1]] and body["images"] == 4
    else:
        assert urls == [[URL_1, URL_2], [URL_3]] and body["images"] == 3


def test_a_workbook_is_known_by_its_content_not_its_name(client: FlaskClient) -> None:
    response = upload_file(client, excel_workbook(), "products.csv")
    assert response.status_code == 202
    assert "encoding" not in response.get_json()


def test_a_bad_workbook_answers_in_the_one_error_shape_and_stores_nothing(
    client: FlaskClient, mongo: Any
) -> None:
    data = workbook([HEADER, [1, "A", "ftp://x.example/a.jpg"], [], [1, "", URL_1]])
    response = upload_file(client, data, "products.xlsx")
    assert response.status_code == 400
    assert response.get_json()["error"] == {
        "code": "invalid_csv",
        "message": "the CSV has 3 problems",
        "details": [
            {
                "row": 2,
                "column": "Input Image Urls",
                "message": "not an http(s) URL: 'ftp://x.example/a.jpg'",
            },
            {"row": 4, "column": "Product Name", "message": "must not be empty"},
            {"row": 4, "column": "S. No.", "message": "duplicate serial number 1 (first at row 2)"},
        ],
    }
    assert mongo.processing_requests.count_documents({}) == 0
    assert mongo.products.count_documents({}) == mongo.upload_parts.count_documents({}) == 0


@pytest.mark.slow
def test_a_workbook_upload_ends_with_a_csv_of_its_own_columns(
    make_app: Callable[..., Flask], image_host: HTTPServer
) -> None:
    client = make_app().test_client()
    url = serve(image_host, "/w/1.jpg", make_image(200, 100))
    data = workbook([["Notes", *HEADER], ["first", 1.0, NAME, url]])
    response = upload_file(client, data, "products.xlsx")
    assert response.status_code == 202
    request_id = response.get_json()["request_id"]
    assert wait_terminal(client, request_id)["status"] == "completed"
    output = client.get(f"/csv/output/{request_id}")
    assert output.mimetype == "text/csv"
    lines = output.get_data(as_text=True).splitlines()
    assert lines[0] == "Notes,S. No.,Product Name,Input Image Urls,Output Image Urls"
    assert lines[1].startswith(f"first,1,{NAME},{url},http://localhost/images/")


# ---- what a workbook's cells read as ----------------------------------------------------------


def test_cells_read_as_the_spreadsheet_shows_them() -> None:
    from datetime import date, datetime

    data = workbook(
        [
            ["S. No.", "Product Name", "Input Image Urls", "Launched", "Price", "Stock", "Live"],
            [1, NAME, f"{URL_1}\n{URL_2}", date(2024, 5, 1), 12.5, 3, True],
            [],
            [2.0, 2024, URL_3, datetime(2024, 5, 1, 9, 30), 0.1 + 0.2, None, False],
        ]
    )
    parsed = parse(data)
    assert parsed.encoding is None
    assert [(r.row, r.serial_number, r.product_name) for r in parsed.rows] == [
        (2, 1, NAME),
        (4, 2, "2024"),
    ]
    assert parsed.rows[0].input_urls == [URL_1, URL_2]
    assert parsed.rows[0].extra == {
        "Launched": "2024-05-01",
        "Price": "12.5",
        "Stock": "3",
        "Live": "TRUE",
    }
    assert parsed.rows[1].extra == {
        "Launched": "2024-05-01 09:30:00",
        "Price": "0.3",
        "Stock": "",
        "Live": "FALSE",
    }


def test_a_float_serial_reads_as_a_whole_number() -> None:
    data = workbook([HEADER, [1, "A", URL_1], [2.0, "B", URL_2]])
    data = rewrite(data, SHEET, lambda xml: xml.replace(b"<v>1</v>", b"<v>1.0</v>"))
    assert b"<v>1.0</v>" in zipfile.ZipFile(io.BytesIO(data)).read(SHEET)
    assert [r.serial_number for r in parse(data).rows] == [1, 2]


def test_dates_and_fractions_as_serials_are_errors_on_their_cells() -> None:
    from datetime import date

    data = workbook([HEADER, [date(2024, 1, 2), "A", URL_1], [1.5, "B", URL_2], [3, "C", 7]])
    assert refusal(data).details == [
        {"row": 2, "column": "S. No.", "message": "not a whole number: '2024-01-02'"},
        {"row": 3, "column": "S. No.", "message": "not a whole number: '1.5'"},
        {"row": 4, "column": "Input Image Urls", "message": "not an http(s) URL: '7'"},
    ]


def test_formulas_are_read_as_their_cached_values_never_evaluated() -> None:
    data = workbook([HEADER, ["=1", "=B9", URL_1]])

    def cached(xml: bytes) -> bytes:
        start = xml.index(b'<row r="2"')
        end = xml.index(b"</row>", start)
        row = (
            b'<row r="2"><c r="A2"><f>ROW()-1</f><v>1</v></c>'
            b'<c r="B2" t="str"><f>CONCAT("Caf","\xc3\xa9")</f><v>Caf\xc3\xa9</v></c>'
            b'<c r="C2" t="str"><f>WEBSERVICE("http://127.0.0.1:9/x")</f>'
            b"<v>" + URL_1.encode() + b"</v></c>"
        )
        return xml[:start] + row + xml[end:]

    parsed = parse(rewrite(data, SHEET, cached))
    assert [(r.serial_number, r.product_name, r.input_urls) for r in parsed.rows] == [
        (1, "Café", [URL_1])
    ]


def test_only_the_first_worksheet_is_read() -> None:
    parsed = parse(workbook([HEADER, [1, "A", URL_1]], more_sheets=2))
    assert [r.product_name for r in parsed.rows] == ["A"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "the file is empty"),
        ([HEADER], "the file has a header but no product rows"),
        (
            [[*HEADER, *(f"x{i}" for i in range(MAX_COLUMNS))], [1, "A", URL_1]],
            f"more than {MAX_COLUMNS} columns",
        ),
        ([HEADER, *([i, "A", URL_1] for i in range(1, 7))], "more than 5 product rows"),
        ([["Name", "Urls"], ["A", URL_1]], "the CSV has 3 problems"),
    ],
    ids=["empty", "header-only", "too-wide", "too-many-rows", "wrong-header"],
)
def test_workbook_tables_follow_the_csv_rules(rows: list[list[Any]], message: str) -> None:
    assert message in refusal(workbook(rows), max_rows=5).message


# ---- hostile and foreign files ----------------------------------------------------------------


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out.getvalue()


def declared_sizes(data: bytes, size: int) -> bytes:
    """The same ZIP whose central directory claims every member unpacks to ``size`` bytes."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        out[at + 24 : at + 28] = struct.pack("<I", size)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


BASE = {"[Content_Types].xml": b"<Types/>", "xl/workbook.xml": b"<workbook/>"}
LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="1" '
    b'uniqueCount="1"><si><t>&lol9;</t></si></sst>'
)
XXE = (
    b'<?xml version="1.0"?><!DOCTYPE sst [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
    b"<si><t>&xxe;</t></si></sst>"
)


def with_shared_strings(xml: bytes) -> bytes:
    data = workbook([HEADER, [1, "A", URL_1]])
    data = rewrite(
        data,
        "[Content_Types].xml",
        lambda types: types.replace(
            b"</Types>",
            b'<Override PartName="/xl/sharedStrings.xml" ContentType="application/'
            b'vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>',
        ),
    )
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = {info.filename: archive.read(info) for info in archive.infolist()}
    members["xl/sharedStrings.xml"] = xml
    members["xl/_rels/workbook.xml.rels"] = members["xl/_rels/workbook.xml.rels"].replace(
        b"</Relationships>",
        b'<Relationship Id="rIdS" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        b'relationships/sharedStrings" Target="sharedStrings.xml"/></Relationships>',
    )
    return zip_of(members)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: zip_of({**BASE, SHEET: b" " * (2 * 1024 * 1024)}),
            f"the workbook part '{SHEET}' is compressed",
        ),
        (
            lambda: declared_sizes(
                zip_of({**BASE, **{f"xl/p{i}.xml": b"<a/>" for i in range(110)}}), 1024 * 1024 - 1
            ),
            f"over the limit of {MAX_UNCOMPRESSED // 2**20} MiB",
        ),
        (
            lambda: zip_of({**BASE, **{f"xl/p{i}.xml": b"" for i in range(MAX_MEMBERS)}}),
            f"more than {MAX_MEMBERS} parts",
        ),
        (lambda: with_shared_strings(LAUGHS), "the workbook cannot be read"),
        (lambda: with_shared_strings(XXE), "the workbook cannot be read"),
        (
            lambda: rewrite(
                excel_workbook(), SHEET, lambda xml: xml.replace(b'<row r="3"', b'<row r="2000000"')
            ),
            "the worksheet has rows past row 1,048,576",
        ),
        (
            lambda: rewrite(excel_workbook(), SHEET, lambda xml: xml[:200]),
            "the workbook cannot be read",
        ),
        (lambda: excel_workbook()[:-200], "the file is a damaged ZIP archive"),
        (lambda: b"PK\x03\x04" + b"\x00" * 100, "the file is a damaged ZIP archive"),
        (lambda: zip_of({"photo.jpg": b"\xff\xd8"}), "a ZIP archive, not an .xlsx workbook"),
        (
            lambda: zip_of({"xl/workbook.bin": b"", "[Content_Types].xml": b""}),
            "a binary .xlsb workbook",
        ),
        (
            lambda: zip_of(
                {"mimetype": b"application/vnd.oasis.opendocument.spreadsheet", "content.xml": b""}
            ),
            "an OpenDocument spreadsheet",
        ),
        (
            lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504,
            "a legacy .xls workbook or a password-protected one",
        ),
    ],
    ids=[
        "zip-bomb",
        "lying-sizes",
        "too-many-parts",
        "billion-laughs",
        "xxe",
        "row-past-excel",
        "truncated-sheet",
        "truncated-zip",
        "zip-signature-only",
        "other-zip",
        "xlsb",
        "ods",
        "xls-or-encrypted",
    ],
)
def test_hostile_and_foreign_files_are_refused_quickly_and_clearly(
    make: Callable[[], bytes], message: str
) -> None:
    data = make()
    started = time.perf_counter()
    error = refusal(data)
    assert time.perf_counter() - started < 5
    assert message in error.message
    assert "root:" not in error.message  # nothing of /etc/passwd
