"""The CSV rules of API.md, each with the error details a user sees."""

from __future__ import annotations

from typing import Any

import pytest

from imgproc.csv_input import MAX_COLUMNS, MAX_DETAILS, parse_csv
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
        (bytes(range(128, 256)) * 4, "neither UTF-8 text nor text in a code page"),
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


# ---- files as spreadsheet tools write them -------------------------------------------------

NAME = "Café crème – 250 g®"


def table(
    delimiter: str = ",", names: tuple[str, str] = (NAME, "Thé vert"), eol: str = "\r\n"
) -> str:
    """Two products as a spreadsheet exports them (CRLF, the URL list quoted)."""
    quote = '"' if delimiter != "\t" else ""
    return eol.join(
        [
            delimiter.join(["S. No.", "Product Name", "Input Image Urls"]),
            delimiter.join(["1", names[0], "https://img.example.com/cafe.jpg"]),
            delimiter.join(
                [
                    "2",
                    names[1],
                    f"{quote}https://img.example.com/a.jpg,https://img.example.com/b.jpg{quote}",
                ]
            ),
            "",
        ]
    )


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (table().encode("utf-8"), "utf-8"),
        (b"\xef\xbb\xbf" + table(";").encode("utf-8"), "utf-8"),  # Excel "CSV UTF-8", EU locale
        (b"\xff\xfe" + table("\t").encode("utf-16-le"), "utf-16-le"),  # Excel "Unicode Text"
        (b"\xfe\xff" + table("\t").encode("utf-16-be"), "utf-16-be"),
        (table().encode("cp1252"), "cp1252"),  # Excel "CSV (Comma delimited)", Windows
        (table(";").encode("cp1252"), "cp1252"),
        (table().encode("mac_roman"), "mac-roman"),  # Excel for Mac "Comma Separated Values"
    ],
    ids=[
        "utf-8",
        "utf-8-bom-semicolon",
        "utf-16-le-tab",
        "utf-16-be-tab",
        "cp1252",
        "cp1252-semicolon",
        "mac-roman",
    ],
)
def test_spreadsheet_exports_keep_the_names(data: bytes, encoding: str) -> None:
    parsed = parse(data)
    assert parsed.encoding == encoding
    assert [(r.serial_number, r.product_name) for r in parsed.rows] == [(1, NAME), (2, "Thé vert")]
    assert parsed.rows[1].input_urls == [
        "https://img.example.com/a.jpg",
        "https://img.example.com/b.jpg",
    ]
    assert parsed.header == ["S. No.", "Product Name", "Input Image Urls"]


@pytest.mark.parametrize(
    ("names", "code_page"),
    [
        (("Zażółć gęślą jaźń", "Kawa"), "cp1250"),
        (("Káva zrnková č. 1", "Čaj zelený"), "cp1250"),
        (("Кофе молотый 250 г", "Чай зелёный"), "cp1251"),
        (("Ελληνικός καφές", "Τσάι"), "cp1253"),
        (("Türk kahvesi ğış", "Çay"), "cp1254"),
        (("Größe Weiß Übergröße", "Kaffee"), "mac_roman"),
        (("コーヒー豆 250g", "緑茶"), "cp932"),
    ],
)
def test_other_code_pages_are_detected(names: tuple[str, str], code_page: str) -> None:
    parsed = parse(table(";", names).encode(code_page))
    assert [r.product_name for r in parsed.rows] == list(names)


def test_a_file_whose_code_page_cannot_be_told_is_refused_with_what_to_do() -> None:
    # Three Cyrillic letters in Windows-1251 read just as well as Greek in Windows-1253.
    data = f"{HEADER}\n1,Заказ,http://x.example/a.jpg\n".encode("cp1251")
    with pytest.raises(InvalidCsv) as caught:
        parse(data)
    message = caught.value.message
    assert message.startswith("cannot tell the file's encoding: line 2 reads")
    assert "'1,Заказ,http://x.example/a.jpg' as cp1251" in message
    assert message.endswith('save it as "CSV UTF-8" in your spreadsheet app and upload it again')


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (table().encode("utf-16-le"), "looks like UTF-16 text without a byte-order mark"),
        (b"\xff\xfe" + table().encode("utf-16-le")[:-1], "is not UTF-16-LE text"),
        (b"\xef\xbb\xbf" + table().encode("cp1252"), "is not UTF-8 text (bad bytes at offset"),
        (b"\xff\xfe" + f"{HEADER}\n1,A\x00,http://x\n".encode("utf-16-le"), "NUL character"),
        (table().encode("utf-32"), 'the file is UTF-32 text; save it as "CSV UTF-8"'),
    ],
    ids=["utf-16-without-bom", "odd-utf-16", "bom-then-cp1252", "nul-in-utf-16", "utf-32"],
)
def test_broken_encodings_say_what_to_do(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCsv) as caught:
        parse(data)
    assert message in caught.value.message


def test_a_comma_file_with_semicolons_in_its_urls_stays_comma_separated() -> None:
    parsed = parse(
        f'{HEADER}\n1,A,"https://x.example/a.jpg;https://x.example/b.jpg"\n2,B,https://x.example/c;v=2.jpg\n'
    )
    assert parsed.rows[0].input_urls == ["https://x.example/a.jpg", "https://x.example/b.jpg"]
    assert parsed.rows[1].input_urls == ["https://x.example/c;v=2.jpg"]


def test_a_semicolon_file_with_commas_in_its_urls_stays_semicolon_separated() -> None:
    parsed = parse(
        "S. No.;Product Name;Input Image Urls\n1;A, the big one;https://x.example/a.jpg,https://x.example/b.jpg\n"
    )
    assert parsed.rows[0].product_name == "A, the big one"
    assert parsed.rows[0].input_urls == ["https://x.example/a.jpg", "https://x.example/b.jpg"]


def test_quoted_tab_separated_header_and_unknown_delimiter() -> None:
    parsed = parse('"S. No."\t"Product Name"\t"Input Image Urls"\n1\tA\thttps://x.example/a.jpg\n')
    assert parsed.rows[0].input_urls == ["https://x.example/a.jpg"]
    assert details("S. No.:Product Name:Input Image Urls\n1:A:https://x.example/a.jpg\n")[0] == {
        "row": 1,
        "column": "S. No.",
        "message": "missing column 'S. No.'",
    }


A, B, C = "https://a.example/1.jpg", "http://b.example/2.png", "https://c.example/3.webp"


@pytest.mark.parametrize(
    "cell",
    [
        f"{A},{B},{C}",
        f"{A};{B};{C}",
        f"{A}|{B}|{C}",
        f"{A} {B}\t{C}",
        f"{A}\n{B}\n{C}",  # Alt+Enter in Excel
        f"{A}\r\n{B}\r\n{C}\r\n",
        f" {A} , {B} ;\n {C} ,",
        f"{A},,{B} | {C}",
        f"{A},{B.upper().replace('HTTP', 'Http')},{C}",
    ],
    ids=["comma", "semicolon", "pipe", "spaces-tab", "lines", "crlf", "mixed", "doubled", "case"],
)
def test_urls_in_a_cell_are_split_on_every_separator(cell: str) -> None:
    urls = parse(f'{HEADER}\n1,A,"{cell}"\n').rows[0].input_urls
    assert len(urls) == 3
    assert [u.lower() for u in urls] == [A, B, C]


def test_a_comma_or_semicolon_inside_a_url_stays_in_it() -> None:
    transformed = "https://res.example.com/image/upload/w_300,h_200,c_fill/sku.jpg"
    matrix = "https://x.example/img;w=300;h=200/a.jpg?crop=1,2,3,4"
    parsed = parse(f'{HEADER}\n1,A,"{transformed},{matrix}"\n')
    assert parsed.rows[0].input_urls == [transformed, matrix]


def test_a_piece_that_is_not_a_url_is_an_error_not_a_silent_change() -> None:
    assert details(f'{HEADER}\n1,A,"https://x.example/a.jpg, b.jpg; www.example.com/c.jpg"\n') == [
        {"row": 2, "column": "Input Image Urls", "message": "not an http(s) URL: 'b.jpg'"},
        {
            "row": 2,
            "column": "Input Image Urls",
            "message": "not an http(s) URL: 'www.example.com/c.jpg'",
        },
    ]


def test_blank_lines_before_the_header_and_a_too_wide_header() -> None:
    parsed = parse(f"\n\n{HEADER}\n1,A,http://x.example/a.jpg\n")
    assert [r.row for r in parsed.rows] == [4]
    wide = HEADER + "".join(f",extra {i}" for i in range(MAX_COLUMNS))
    with pytest.raises(InvalidCsv, match=f"more than {MAX_COLUMNS} columns"):
        parse(f"{wide}\n1,A,http://x.example/a.jpg\n")
