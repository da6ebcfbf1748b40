"""Field and link extraction from HTML with selectolax (Lexbor)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from trawl.config import HtmlField

__all__ = ["extract_fields", "extract_items", "extract_links", "get_path", "parse_html"]


def parse_html(markup: str | bytes) -> LexborHTMLParser:
    """Parse a page (text, or UTF-8 bytes); Lexbor never raises on malformed markup."""
    return LexborHTMLParser(markup)


_SKIP_SCHEMES = ("#", "mailto:", "javascript:", "tel:", "data:")


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _text(node: LexborNode) -> str:
    # Whitespace collapsed over the whole subtree; `text(strip=True)` strips each text node
    # and glues them, so `Price: <b>$5</b> each` would read `Price:$5each`.
    return " ".join(node.text().split())


def _value(node: LexborNode, spec: HtmlField) -> str | None:
    raw = node.attributes.get(spec.attr) if spec.attr else _text(node)
    if raw is None:
        return None
    if spec.regex:
        m = _regex(spec.regex).search(raw)
        if not m:
            return None
        return m.group(1) if m.groups() else m.group(0)
    return raw


def extract_fields(root: LexborHTMLParser | LexborNode, fields: Mapping[str, HtmlField]) -> dict[str, Any]:
    """Each declared field's value: a string, a list of strings (``all``), or None."""
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        if spec.all:
            values = [_value(n, spec) for n in root.css(spec.selector)]
            out[name] = [v for v in values if v is not None]
        else:
            node = root.css_first(spec.selector)
            out[name] = _value(node, spec) if node is not None else None
    return out


def extract_items(
    tree: LexborHTMLParser, item_selector: str | None, fields: Mapping[str, HtmlField]
) -> list[dict[str, Any]]:
    """One dict per item node, or one for the whole page when there is no item selector."""
    if item_selector is None:
        return [extract_fields(tree, fields)]
    return [extract_fields(node, fields) for node in tree.css(item_selector)]


def extract_links(tree: LexborHTMLParser, base_url: str) -> list[str]:
    """Absolute http(s) links of the page, fragments removed, in document order."""
    base = base_url
    base_node = tree.css_first("base[href]")
    if base_node is not None and base_node.attributes.get("href"):
        base = urljoin(base_url, base_node.attributes["href"] or "")
    parts = urlsplit(base)
    origin = f"{parts.scheme}://{parts.netloc}"
    links: list[str] = []
    for node in tree.css("a[href]"):
        href = (node.attributes.get("href") or "").strip()
        if not href or href.startswith(_SKIP_SCHEMES):
            continue
        # The common cases need no urljoin (~18 us a link): root-relative and absolute, without dot segments.
        if "/." in href or "\\" in href:
            url = urljoin(base, href)
        elif href[0] == "/" and href[1:2] != "/":
            url = origin + href
        elif href.startswith(("http://", "https://")):
            url = href
        else:
            url = urljoin(base, href)
        url = url.partition("#")[0]
        if url.startswith(("http://", "https://")):
            links.append(url)
    return links


def get_path(obj: Any, path: str | None) -> Any:
    """Follow a dotted path (``a.b.0.c``) into JSON; None when any step is missing."""
    if not path:
        return obj
    for step in path.split("."):
        if isinstance(obj, Mapping):
            obj = obj.get(step)
        elif isinstance(obj, list) and step.lstrip("-").isdigit():
            i = int(step)
            obj = obj[i] if -len(obj) <= i < len(obj) else None
        else:
            return None
        if obj is None:
            return None
    return obj
