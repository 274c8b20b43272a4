"""The CSV rules of API.md, each with the error details a user sees."""

from __future__ import annotations

from typing import Any

import pytest

from imgproc.csv_input import MAX_DETAILS, parse_csv
from imgproc.errors import InvalidCsv

HEADER = "S. No.,Product Name,Input Image Urls"


def parse(text: str | bytes, max_rows: int = 100, max_urls: int = 50) -> Any:
    data = text.encode() if isinstance(text, str) else text
    return parse_csv(data, max_rows=max_rows, max_urls_per_row=max_urls)


def details(text: str | bytes, **kwargs: Any) -> list[dict[str, Any]]:
    with pytest.raises(InvalidCsv) as caught:
        parse(text, **kwargs)
    return caught.value.details


def test_example_from_the_contract() -> None:
    parsed = parse(
        f'{HEADER}\n1,SKU1,"https://a.example/1.jpg,https://a.example/2.jpg"\n'
        "2,SKU2,https://b.example/3.png\n"
    )
    assert [(r.row, r.serial_number, r.product_name, r.input_urls) for r in parsed.rows] == [
        (2, 1, "SKU1", ["https://a.example/1.jpg", "https://a.example/2.jpg"]),
        (3, 2, "SKU2", ["https://b.example/3.png"]),
    ]
    assert parsed.image_count == 3


@pytest.mark.parametrize("serial", ["S. No.", "S.No.", "S No", "Serial Number", " s. no. "])
def test_serial_header_spellings(serial: str) -> None:
    parsed = parse(f"{serial},PRODUCT NAME, input image urls \n7,A,http://x.example/a.jpg\n")
    assert parsed.rows[0].serial_number == 7


def test_column_order_extra_columns_bom_and_crlf() -> None:
    text = (
        "\ufeffInput Image Urls,Notes,Product Name,S. No.\r\nhttp://x.example/a.jpg,keep me,A,1\r\n"
    )
    parsed = parse(text.encode("utf-8"))
    assert parsed.header == ["Input Image Urls", "Notes", "Product Name", "S. No."]
    assert parsed.rows[0].extra == {"Notes": "keep me"}
    assert parsed.rows[0].input_urls == ["http://x.example/a.jpg"]


def test_multi_url_cell_with_spaces_and_newlines() -> None:
    parsed = parse(f'{HEADER}\n1,A," http://x.example/1.jpg ,\n http://x.example/2.jpg,"\n')
    assert parsed.rows[0].input_urls == ["http://x.example/1.jpg", "http://x.example/2.jpg"]


def test_missing_columns_are_named() -> None:
    assert details("S. No.,Name\n1,A\n") == [
        {"row": 1, "column": "Product Name", "message": "missing column 'Product Name'"},
        {"row": 1, "column": "Input Image Urls", "message": "missing column 'Input Image Urls'"},
    ]


@pytest.mark.parametrize(
    ("serial", "message"),
    [
        ("0", "must be a positive whole number"),
        ("-3", "not a whole number: '-3'"),
        ("1.5", "not a whole number: '1.5'"),
        ("abc", "not a whole number: 'abc'"),
        ("", "missing"),
    ],
)
def test_serial_must_be_positive_integer(serial: str, message: str) -> None:
    assert details(f"{HEADER}\n{serial},A,http://x.example/a.jpg\n") == [
        {"row": 2, "column": "S. No.", "message": message}
    ]


def test_serial_numbers_unique() -> None:
    text = f"{HEADER}\n1,A,http://x.example/a.jpg\n2,B,http://x.example/b.jpg\n1,C,http://x.example/c.jpg\n"
    assert details(text) == [
        {"row": 4, "column": "S. No.", "message": "duplicate serial number 1 (first at row 2)"}
    ]


def test_a_duplicate_of_a_row_with_other_problems_is_reported_too() -> None:
    text = f"{HEADER}\n7,,http://x.example/a.jpg\n7,B,http://x.example/b.jpg\n"
    assert details(text) == [
        {"row": 2, "column": "Product Name", "message": "must not be empty"},
        {"row": 3, "column": "S. No.", "message": "duplicate serial number 7 (first at row 2)"},
    ]


def test_product_name_rules() -> None:
    long = "x" * 513
    text = f"{HEADER}\n1,   ,http://x.example/a.jpg\n2,{long},http://x.example/b.jpg\n3,{'y' * 512},http://x.example/c.jpg\n"
    assert details(text) == [
        {"row": 2, "column": "Product Name", "message": "must not be empty"},
        {"row": 3, "column": "Product Name", "message": "longer than 512 characters"},
    ]


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("ftp://x", "not an http(s) URL: 'ftp://x'"),
        ("www.example.com/a.jpg", "not an http(s) URL: 'www.example.com/a.jpg'"),
        ("http://", "not an http(s) URL: 'http://'"),
        ("http://x.example:99999/a.jpg", "not a valid URL: 'http://x.example:99999/a.jpg'"),
        ("javascript:alert(1)", "not an http(s) URL: 'javascript:alert(1)'"),
        ("", "no image URL"),
        (" , ", "no image URL"),
    ],
)
def test_urls_must_be_absolute_http(cell: str, message: str) -> None:
    assert details(f'{HEADER}\n1,A,"{cell}"\n') == [
        {"row": 2, "column": "Input Image Urls", "message": message}
    ]


def test_at_most_n_urls_per_row() -> None:
    urls = ",".join(f"http://x.example/{i}.jpg" for i in range(4))
    assert details(f'{HEADER}\n1,A,"{urls}"\n', max_urls=3) == [
        {"row": 2, "column": "Input Image Urls", "message": "4 URLs; at most 3 per row"}
    ]


def test_every_problem_reported_not_only_the_first() -> None:
    text = f"{HEADER}\n0,,ftp://x\n2,B,http://ok.example/a.jpg\nx,C,http://ok.example/b.jpg\n"
    assert details(text) == [
        {"row": 2, "column": "S. No.", "message": "must be a positive whole number"},
        {"row": 2, "column": "Product Name", "message": "must not be empty"},
        {"row": 2, "column": "Input Image Urls", "message": "not an http(s) URL: 'ftp://x'"},
        {"row": 4, "column": "S. No.", "message": "not a whole number: 'x'"},
    ]


def test_problem_list_is_capped() -> None:
    rows = "".join(f"{i},,http://x.example/a.jpg\n" for i in range(1, 151))
    with pytest.raises(InvalidCsv) as caught:
        parse(f"{HEADER}\n{rows}", max_rows=1000)
    assert len(caught.value.details) == MAX_DETAILS
    assert caught.value.message == "the CSV has 150 problems (showing the first 100)"


def test_row_cap() -> None:
    rows = "".join(f"{i},A,http://x.example/a.jpg\n" for i in range(1, 6))
    with pytest.raises(InvalidCsv, match="more than 4 product rows"):
        parse(f"{HEADER}\n{rows}", max_rows=4)
    assert len(parse(f"{HEADER}\n{rows}", max_rows=5).rows) == 5


def test_too_many_cells_and_short_rows() -> None:
    text = f"{HEADER}\n1,A,http://x.example/a.jpg,extra\n2,B\n3,C,http://x.example/c.jpg,,\n"
    assert details(text) == [
        {"row": 2, "column": None, "message": "has 4 cells but the header has 3 columns"},
        {"row": 3, "column": "Input Image Urls", "message": "no image URL"},
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (b"\n\n", "the file is empty"),
        (HEADER.encode() + b"\n", "the file has a header but no product rows"),
        (HEADER.encode() + b"\n1,A\x00,http://x\n", "NUL byte at offset 40"),
        (HEADER.encode() + b"\n1,Caf\xe9,http://x.example/a.jpg\n", "not UTF-8 text"),
    ],
)
def test_unreadable_files(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCsv, match=message):
        parse(data)


def test_duplicate_columns_rejected() -> None:
    assert details(f"{HEADER},Product Name\n1,A,http://x.example/a.jpg,B\n") == [
        {"row": 1, "column": "Product Name", "message": "duplicate column (also column 2)"}
    ]


def test_unterminated_quote_is_reported_with_its_row() -> None:
    text = f'{HEADER}\n1,A,http://x.example/a.jpg\n2,B,"http://x.example/b.jpg\n'
    assert details(text) == [
        {"row": 3, "column": None, "message": "cannot be read as CSV: unexpected end of data"}
    ]


def test_blank_lines_are_ignored() -> None:
    parsed = parse(f"{HEADER}\n\n1,A,http://x.example/a.jpg\n,,\n\n")
    assert [r.serial_number for r in parsed.rows] == [1]
