"""Bytes of an uploaded text file -> its text and the encoding it was read with.

Spreadsheet tools write CSVs in more encodings than UTF-8: Excel's "CSV UTF-8" adds a
byte-order mark, its "Unicode Text" is UTF-16 with one, its plain "CSV" is the computer's
ANSI code page (Windows-1252 in Western Europe and the Americas), Excel for Mac writes Mac
Roman. A byte-order mark or valid UTF-8 settles it; other 8-bit text goes to
charset-normalizer (the only user of it), and when its plausible readings disagree and
nothing tells them apart, the file is refused rather than read wrong.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

from charset_normalizer import from_bytes

from imgproc.errors import InvalidCsv

SAVE_AS_UTF8 = 'save it as "CSV UTF-8" in your spreadsheet app and upload it again'

# Code pages spreadsheet tools write: Excel's ANSI code pages, Mac Roman (Excel for Mac),
# KOI8-R and the East Asian multi-byte ones. The detector is held to these: on short,
# mostly-ASCII files it otherwise prefers DOS code pages nobody exports a CSV in.
CODE_PAGES = (
    "cp1252",
    "cp1250",
    "cp1251",
    "cp1253",
    "cp1254",
    "cp1255",
    "cp1256",
    "cp1257",
    "cp874",
    "mac_roman",
    "koi8_r",
    "cp932",
    "gb18030",
    "cp949",
    "big5",
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SAMPLE_LINES = 200
# Readings whose mess ratio is this close to the best one are equally plausible.
_PLAUSIBLE_MARGIN = 0.02
# Past this mess ratio even the best reading is not text.
_MAX_MESS = 0.25

# The accented letters of Latin-script languages. A reading of a file whose accented letters
# all belong to one language is likelier than one that needs letters from several (Turkish
# "ğış" read as Windows-1252 becomes Icelandic "ðýþ" next to a German "ü").
_LATIN_ALPHABETS = (
    "àâæçéèêëîïôœùûüÿ",  # French
    "äöüß",  # German
    "áéíñóúü¡¿",  # Spanish
    "áâãàçéêíóôõú",  # Portuguese
    "àèéìíîòóùú",  # Italian
    "àçèéíïòóúü·",  # Catalan
    "áéíóúàèëïöü",  # Dutch
    "æøåéóô",  # Danish, Norwegian
    "åäöé",  # Swedish, Finnish
    "áðéíóúýþæö",  # Icelandic
    "ąćęłńóśźż",  # Polish
    "áčďéěíňóřšťúůýž",  # Czech
    "áäčďéíĺľňóôŕšťúýž",  # Slovak
    "áéíóöőúüű",  # Hungarian
    "ăâîșțşţ",  # Romanian
    "čćđšž",  # Croatian, Slovene, Serbian
    "çğıöşüâîû",  # Turkish
    "ąčęėįšųūž",  # Lithuanian
    "āčēģīķļņšūž",  # Latvian
    "äöõüšž",  # Estonian
    "çë",  # Albanian
)

# Other scripts by the first word of their letters' Unicode names; Japanese mixes three.
_SCRIPTS = {
    "GREEK": "Greek",
    "CYRILLIC": "Cyrillic",
    "HEBREW": "Hebrew",
    "ARABIC": "Arabic",
    "THAI": "Thai",
    "CJK": "CJK",
    "HIRAGANA": "CJK",
    "KATAKANA": "CJK",
    "HALFWIDTH": "CJK",
    "FULLWIDTH": "CJK",
    "HANGUL": "Hangul",
}


@dataclass(frozen=True)
class Decoded:
    """A file's text and the name of the encoding it was read with."""

    text: str
    encoding: str


def decode_text(data: bytes) -> Decoded:
    """The text of ``data``: by its byte-order mark, as UTF-8, or by detection."""
    if not data.strip():
        raise InvalidCsv("the file is empty")
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16's
        raise InvalidCsv("the file is UTF-32 text; " + SAVE_AS_UTF8)
    if data.startswith(codecs.BOM_UTF8):
        return Decoded(_strict(data[3:], "utf-8"), "utf-8")
    for bom, name in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            text = _strict(data[2:], name)
            nul = text.find("\x00")
            if nul >= 0:
                raise InvalidCsv(f"the file contains a NUL character at position {nul}")
            return Decoded(text, name)
    nul = data.find(b"\x00")
    if nul >= 0:
        if _looks_like_utf16(data):
            raise InvalidCsv(
                "the file looks like UTF-16 text without a byte-order mark; " + SAVE_AS_UTF8
            )
        raise InvalidCsv(f"the file contains a NUL byte at offset {nul}; is it really a CSV?")
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        return _detect(data)


def _strict(data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidCsv(
            f"the file starts with a {encoding.upper()} byte-order mark but is not "
            f"{encoding.upper()} text (bad bytes at offset {exc.start}); " + SAVE_AS_UTF8
        ) from None


def _looks_like_utf16(data: bytes) -> bool:
    """Mostly-ASCII UTF-16: a NUL in (nearly) every other byte."""
    sample = data[:4096]
    halves = (sample[0::2].count(0), sample[1::2].count(0))
    return max(halves) >= len(sample) // 2 * 0.9


def _detect(data: bytes) -> Decoded:
    """8-bit text read in the code page the detector finds plausible, or InvalidCsv."""
    matches = [m for m in from_bytes(data, cp_isolation=list(CODE_PAGES)) if m.encoding]
    best_mess = min((m.chaos for m in matches), default=1.0)
    if best_mess > _MAX_MESS:
        raise InvalidCsv(
            "the file is neither UTF-8 text nor text in a code page spreadsheets use; "
            + SAVE_AS_UTF8
        )
    readings: dict[str, str] = {}  # text -> the first (likeliest) code page giving it
    plausible = {
        name  # the detector folds code pages that read the file alike into one match
        for m in matches
        if m.chaos <= best_mess + _PLAUSIBLE_MARGIN
        for name in m.could_be_from_charset
        if name in CODE_PAGES
    }
    for name in sorted(plausible, key=CODE_PAGES.index):
        try:
            readings.setdefault(data.decode(name), name)
        except UnicodeDecodeError:  # the detector only sampled the part it could read
            continue
    if not readings:
        raise InvalidCsv("cannot tell the file's encoding; " + SAVE_AS_UTF8)
    scores = {text: _oddness(text) for text in readings}
    fewest = min(scores.values())
    likeliest = [text for text, score in scores.items() if score == fewest]
    if len(likeliest) > 1:
        # Windows-1252 is what Excel writes in Western locales; between readings that are
        # otherwise equally good, it is the likeliest by far.
        cp1252 = [text for text in likeliest if readings[text] == "cp1252"]
        if not cp1252:
            raise _ambiguous(likeliest[0], readings[likeliest[0]], likeliest[1], readings)
        likeliest = cp1252
    text = likeliest[0]
    return Decoded(text, codecs.lookup(readings[text]).name)


def _ambiguous(first: str, first_name: str, second: str, readings: dict[str, str]) -> InvalidCsv:
    """The refusal, showing the first line the two readings disagree on."""
    for line_number, (a, b) in enumerate(
        zip(first.splitlines(), second.splitlines(), strict=False), 1
    ):
        if a != b:
            return InvalidCsv(
                f"cannot tell the file's encoding: line {line_number} reads {a[:60]!r} as "
                f"{first_name} but {b[:60]!r} as {readings[second]}; " + SAVE_AS_UTF8
            )
    return InvalidCsv(
        f"cannot tell the file's encoding ({first_name} or {readings[second]}); " + SAVE_AS_UTF8
    )


def _oddness(text: str) -> tuple[int, int]:
    """How odd a reading looks, lower is likelier: first the letters and signs no language
    writes that way, then the number of alphabets it needs (on a sample of its lines)."""
    lines = [line for line in text.splitlines() if not line.isascii()][:_SAMPLE_LINES]
    sample = "\n".join(lines)
    return _misplaced(sample), _alphabets_needed(sample)


def _misplaced(text: str) -> int:
    """Non-ASCII characters out of place: a sign inside a word ("Grš§e") or beside another
    ("‡·‚„"), a capital after a small letter ("CafŽ"), a combining mark with nothing to
    combine with, a Greek final sigma before a letter."""
    count = 0
    for match in _NON_ASCII.finditer(text):
        at = match.start()
        char = match.group()
        before = text[at - 1] if at else " "
        after = text[at + 1] if at + 1 < len(text) else " "
        if unicodedata.category(char).startswith("M"):
            count += not (before.isalpha() or unicodedata.category(before).startswith("M"))
        elif not char.isalpha():
            count += (before.isalpha() and after.isalpha()) or _is_sign(before) or _is_sign(after)
        elif char.isupper():
            count += before.islower()
        elif char == "ς":
            count += after.isalpha()
    return count


def _is_sign(char: str) -> bool:
    return not char.isascii() and not char.isalnum() and not char.isspace()


def _alphabets_needed(text: str) -> int:
    """How many alphabets the text's non-ASCII letters need: one per non-Latin script, and
    for accented Latin letters the fewest languages that have them all (greedy)."""
    scripts: set[str] = set()
    latin: set[str] = set()
    for letter in set(text.lower()):
        if ord(letter) < 128 or not letter.isalpha():
            continue
        script = unicodedata.name(letter, "").split(" ", 1)[0]
        if script == "LATIN":
            latin.add(letter)
        elif script in _SCRIPTS:
            scripts.add(_SCRIPTS[script])
    needed = len(scripts)
    while latin:
        best = max(_LATIN_ALPHABETS, key=lambda alphabet: len(latin & set(alphabet)))
        covered = latin & set(best)
        if not covered:
            return needed + len(latin)  # letters of no language we know: one each
        latin -= covered
        needed += 1
    return needed
