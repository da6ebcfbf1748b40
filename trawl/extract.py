"""Field and link extraction from HTML with selectolax (Lexbor)."""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
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


# A field's text is its whitespace collapsed over the whole subtree (`_value`); `text(strip=True)` strips each
# text node and glues them, so `Price: <b>$5</b> each` would read `Price:$5each`.


_Plan = tuple[tuple[str, str, str | None, "re.Pattern[str] | None", bool], ...]
"""A fields mapping as the extraction reads it: (name, selector, attr, compiled regex, all) per field."""

_plans: dict[int, tuple[Mapping[str, HtmlField], _Plan]] = {}


def _plan(fields: Mapping[str, HtmlField]) -> _Plan:
    """The fields' specs read once per mapping (a source's), not once per page (model attributes, regex cache)."""
    cached = _plans.get(id(fields))
    if cached is not None and cached[0] is fields:
        return cached[1]
    plan = tuple(
        (name, spec.selector, spec.attr, _regex(spec.regex) if spec.regex else None, spec.all)
        for name, spec in fields.items()
    )
    if len(_plans) > 1024:  # sources come and go in a long-lived process (tests, `trawl try`): stay bounded
        _plans.clear()
    _plans[id(fields)] = (fields, plan)  # the mapping is kept alive with it, so its id is not reused meanwhile
    return plan


def _value(node: LexborNode, attr: str | None, regex: re.Pattern[str] | None) -> str | None:
    raw = node.attributes.get(attr) if attr else " ".join(node.text().split())
    if raw is None:
        return None
    if regex is not None:
        m = regex.search(raw)
        if not m:
            return None
        return m.group(1) if m.groups() else m.group(0)
    return raw


def extract_fields(root: LexborHTMLParser | LexborNode, fields: Mapping[str, HtmlField]) -> dict[str, Any]:
    """Each declared field's value: a string, a list of strings (``all``), or None."""
    out: dict[str, Any] = {}
    for name, selector, attr, regex, every in _plan(fields):
        if every:
            values = [_value(n, attr, regex) for n in root.css(selector)]
            out[name] = [v for v in values if v is not None]
        else:
            node = root.css_first(selector)
            out[name] = _value(node, attr, regex) if node is not None else None
    return out


def extract_items(
    tree: LexborHTMLParser, item_selector: str | None, fields: Mapping[str, HtmlField]
) -> list[dict[str, Any]]:
    """One dict per item node, or one for the whole page when there is no item selector."""
    if item_selector is None:
        return [extract_fields(tree, fields)]
    return [extract_fields(node, fields) for node in tree.css(item_selector)]


def extract_links(tree: LexborHTMLParser, base_url: str, seen: Container[int] = ()) -> list[str]:
    """Absolute http(s) links of the page, fragments removed, in document order; without those whose ``hash()``
    is in ``seen`` (a crawl's seen set: most of a page's links, dropped here before anything else is done)."""
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
        if url.startswith(("http://", "https://")) and hash(url) not in seen:
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
