"""Reading a model report (training/report.py) as a browser would: what it fetches, runs and shows."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser


class ReportPage(HTMLParser):
    """What a browser would fetch or run for the page, and each section's images (by the section's id)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.fetched: list[str] = []  # every src, href and srcset
        self.images: dict[str, list[str]] = {}
        self.absent: dict[str, str] = {}
        self._section: str | None = None
        self._in_absent = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append(tag)
        self.fetched += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "action")]
        if tag == "section":
            self._section = attributes["id"]
            self.images[self._section] = []
        elif tag == "img" and self._section:
            self.images[self._section].append(attributes["src"] or "")
        self._in_absent = tag == "p" and attributes.get("class") == "absent"

    def handle_data(self, data: str) -> None:
        if self._in_absent and self._section:
            self.absent[self._section] = self.absent.get(self._section, "") + data


def decoded(url: str) -> bytes:
    header, _, payload = url.partition(",")
    assert header.endswith(";base64")
    return base64.b64decode(payload)


def svg_text(url: str) -> str:
    """The text drawn in an inline SVG figure (the report keeps text as text)."""
    assert url.startswith("data:image/svg+xml;base64,")
    root = ElementTree.fromstring(decoded(url))
    return " ".join(text for text in root.itertext() if text.strip())
