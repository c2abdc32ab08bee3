"""The study report's page read as a browser reads it (html.parser), and what a reader needs of
it: the figures first, every table an HTML <table> with its own caption, each shown once, every
image a whole PNG of a figure the analysis wrote, and no monospace dump of a fit."""

from __future__ import annotations

import base64
import html
import struct
from html.parser import HTMLParser
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # written here again, so the check does not trust the code


class PageParts(HTMLParser):
    """The page's tables (caption, header cells, rows of cells, attributes), images (their
    attributes: alt, src, ...), <pre> blocks (class, text) and the order in which they come
    (a list of ("table" | "img" | "pre", index))."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.pres: list[dict] = []
        self.order: list[tuple[str, int]] = []
        self._text: list[str] | None = None
        self._row: list[str] | None = None
        self._where: str | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": None, "head": [], "rows": [], "attrs": attrs})
            self.order.append(("table", len(self.tables) - 1))
        elif tag == "img":
            self.images.append(attrs)
            self.order.append(("img", len(self.images) - 1))
        elif tag == "pre":
            self.pres.append({"class": attrs.get("class"), "text": ""})
            self.order.append(("pre", len(self.pres) - 1))
            self._where, self._text = "pre", []
        elif tag == "caption":
            self._where, self._text = "caption", []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._where, self._text = tag, []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag != self._where and tag != "tr":
            return
        text = "".join(self._text or [])
        if tag == "pre":
            self.pres[-1]["text"] = text
        elif tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag in ("td", "th"):
            self._row.append(text)
        elif tag == "tr" and self._row is not None and self.tables:
            table = self.tables[-1]
            if table["head"]:
                table["rows"].append(self._row)
            else:
                table["head"] = self._row
            self._row = None
        if tag != "tr":
            self._where, self._text = None, None


def png_size(data: bytes) -> tuple[int, int]:
    """A whole PNG's width and height: the signature, the IHDR chunk, and IEND last."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def check_report_page(page: str, figures: list[str], lead: tuple[str, ...]) -> PageParts:
    """The report's layout as the issue asks it: the `lead` figures (file names) come before
    the first table; every table has a caption, and no caption or table repeats; every
    image is one of `figures` (paths the analysis wrote), embedded byte for byte, each shown
    once; the only <pre> is the list of commands, every line a `lab` command."""
    parts = PageParts(page)
    assert parts.tables, "the report has no HTML table"
    captions = [t["caption"] for t in parts.tables]
    assert all(captions) and len(set(captions)) == len(captions), captions
    for caption in captions:
        assert page.count(html.escape(caption)) == 1, f"{caption!r} is shown more than once"
    contents = [repr((t["head"], t["rows"])) for t in parts.tables]
    assert len(set(contents)) == len(contents), "a table is shown twice"
    assert all(t["rows"] for t in parts.tables), "an empty table"

    unshown = [(Path(f).name, Path(f).read_bytes()) for f in figures]
    shown = [img["alt"] for img in parts.images]
    for img in parts.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["src"][:60]
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert (img["alt"], data) in unshown, f"{img['alt']} is not a figure on disk"
        unshown.remove((img["alt"], data))
        width, height = png_size(data)
        assert 200 <= width <= 4000 and 200 <= height <= 4000, (img["alt"], width, height)

    assert not unshown, f"figures left out: {[name for name, _ in unshown]}"
    first_table = parts.order.index(("table", 0))
    for name in lead:
        assert parts.order.index(("img", shown.index(name))) < first_table, \
            f"{name} comes after the first table"
    for pre in parts.pres:
        lines = pre["text"].splitlines()
        assert pre["class"] == "commands" and all(x.startswith("lab ") for x in lines), \
            pre["text"][:300]
    assert "-------" not in page, "a text table's rule line: a command-line dump"
    return parts
