"""Field and link extraction from HTML, and dotted paths into JSON."""

from __future__ import annotations

from typing import Any

import pytest

from trawl.config import HtmlField
from trawl.extract import extract_fields, extract_items, extract_links, get_path, parse_html

PAGE = """<!DOCTYPE html>
<html><head><title>Shop</title></head><body>
<article class="product" data-id="7">
  <h1 class="name">  Bright
     Blender </h1>
  <p class="price" data-amount="4070.09">Price: <b>$4,070.09</b> incl. VAT</p>
  <p class="meta">Released 2021, revised 2023</p>
  <ul class="tags"><li class="tag">new</li><li class="tag">sale</li><li class="tag"></li></ul>
  <a class="pdf" href="/manual.pdf">Manual</a><a class="pdf">no href</a>
  <img class="main" src="/img/7.png">
</article>
</body></html>
"""


def field(**kwargs: Any) -> HtmlField:
    return HtmlField(**kwargs)


def test_text_is_stripped_and_whitespace_normalised() -> None:
    tree = parse_html(PAGE)
    got = extract_fields(tree, {"name": field(selector="h1.name"), "price": field(selector="p.price")})
    assert got == {"name": "Bright Blender", "price": "Price: $4,070.09 incl. VAT"}


def test_attribute() -> None:
    tree = parse_html(PAGE)
    got = extract_fields(
        tree,
        {
            "amount": field(selector="p.price", attr="data-amount"),
            "image": field(selector="img.main", attr="src"),
            "missing_attr": field(selector="img.main", attr="alt"),
            "id": field(selector="article", attr="data-id"),
        },
    )
    assert got == {"amount": "4070.09", "image": "/img/7.png", "missing_attr": None, "id": "7"}


def test_no_match_is_none_and_empty_list() -> None:
    tree = parse_html(PAGE)
    got = extract_fields(tree, {"one": field(selector="span.nope"), "many": field(selector="span.nope", all=True)})
    assert got == {"one": None, "many": []}


def test_all_collects_every_match_in_order() -> None:
    tree = parse_html(PAGE)
    got = extract_fields(
        tree,
        {
            "tags": field(selector="li.tag", all=True),
            "first_tag": field(selector="li.tag"),
            # A node without the attribute is left out, not a None in the list.
            "links": field(selector="a.pdf", attr="href", all=True),
        },
    )
    assert got == {"tags": ["new", "sale", ""], "first_tag": "new", "links": ["/manual.pdf"]}


def test_regex_group_one_when_present() -> None:
    tree = parse_html(PAGE)
    got = extract_fields(
        tree,
        {
            "year": field(selector="p.meta", regex=r"(\d{4}), revised"),
            "first_number": field(selector="p.meta", regex=r"\d{4}"),
            "two_groups": field(selector="p.meta", regex=r"(\d{4}).*?(\d{4})"),
            "cents": field(selector="p.price", attr="data-amount", regex=r"\.(\d+)$"),
            "no_match": field(selector="p.meta", regex=r"(\d{5})"),
            "tags_with_a": field(selector="li.tag", all=True, regex=r"(.*a.*)"),
        },
    )
    assert got == {
        "year": "2021",
        "first_number": "2021",
        "two_groups": "2021",
        "cents": "09",
        "no_match": None,
        "tags_with_a": ["sale"],
    }


def test_item_selector_one_dict_per_item() -> None:
    tree = parse_html(
        """<table>
        <tr class="row"><td class="n">1</td><td class="t">one</td><td><a href="/1">x</a></td></tr>
        <tr class="row"><td class="n">2</td><td class="t">two</td></tr>
        <tr class="row"><td class="n">3</td></tr>
        <tr class="other"><td class="n">9</td><td class="t">nine</td></tr>
        </table>"""
    )
    fields = {"n": field(selector="td.n"), "t": field(selector="td.t"), "href": field(selector="a", attr="href")}
    assert extract_items(tree, "tr.row", fields) == [
        {"n": "1", "t": "one", "href": "/1"},
        {"n": "2", "t": "two", "href": None},
        {"n": "3", "t": None, "href": None},
    ]
    assert extract_items(tree, "tr.none", fields) == []
    # Without an item selector the whole page is one item: first matches win.
    assert extract_items(tree, None, fields) == [{"n": "1", "t": "one", "href": "/1"}]


def test_links_resolved_filtered_and_defragmented() -> None:
    tree = parse_html(
        """<body>
        <a href="/catalogue/page/2">abs path</a>
        <a href="item?id=3#reviews">relative with fragment</a>
        <a href="../up">parent</a>
        <a href="  spaced  ">spaced</a>
        <a href="//cdn.test/x">scheme-relative</a>
        <a href="https://other.test/y#z">other host</a>
        <a href="#top">fragment only</a>
        <a href="mailto:shop@example.com">mail</a>
        <a href="javascript:void(0)">js</a>
        <a href="tel:+123">tel</a>
        <a href="ftp://files.test/f">ftp</a>
        <a href="">empty</a>
        <a>no href</a>
        <link href="/style.css">
        </body>"""
    )
    assert extract_links(tree, "http://shop.test/dir/page.html") == [
        "http://shop.test/catalogue/page/2",
        "http://shop.test/dir/item?id=3",
        "http://shop.test/up",
        "http://shop.test/dir/spaced",
        "http://cdn.test/x",
        "https://other.test/y",
    ]


def test_links_already_seen_are_left_out() -> None:
    tree = parse_html('<a href="/a">a</a><a href="/b#x">b</a><a href="/c">c</a><a href="/a">again</a>')
    seen = {hash("http://shop.test/b"), hash("http://shop.test/c")}
    assert extract_links(tree, "http://shop.test/", seen) == ["http://shop.test/a", "http://shop.test/a"]


def test_utf8_pages_parse_from_their_bytes_and_others_from_their_text() -> None:
    from trawl.fetch import Response

    body = "<h1>café \u2014 Nº 5</h1>"
    utf8 = Response("http://x.test/", 200, {"content-type": "text/html; charset=UTF-8"}, body.encode(), 1, 0)
    bare = Response("http://x.test/", 200, {"content-type": "text/html"}, b"<h1>caf\xc3\xa9 \xff</h1>", 1, 0)
    latin = Response(
        "http://x.test/", 200, {"content-type": "text/html; charset=iso-8859-1"}, b"<h1>caf\xe9</h1>", 1, 0
    )
    assert isinstance(utf8.markup(), bytes) and isinstance(bare.markup(), bytes)
    assert isinstance(latin.markup(), str)
    for resp, want in ((utf8, "café \u2014 Nº 5"), (bare, "café \ufffd"), (latin, "café")):
        fields = {"t": HtmlField(selector="h1")}
        assert extract_fields(parse_html(resp.markup()), fields) == {"t": want}
        assert extract_fields(parse_html(resp.text()), fields) == {"t": want}  # the same as from the text


def test_links_honour_base_href() -> None:
    tree = parse_html('<head><base href="/sub/"></head><body><a href="a">a</a><a href="/b">b</a></body>')
    assert extract_links(tree, "http://shop.test/x/y") == ["http://shop.test/sub/a", "http://shop.test/b"]


DOC: dict[str, Any] = {
    "data": {"items": [{"id": 1, "tags": ["a", "b"]}, {"id": 2, "tags": []}], "next": None},
    "meta": {"count": 0, "ok": False, "empty": ""},
    "list": [[10, 11], [20]],
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (None, DOC),
        ("", DOC),
        ("data.items.0.id", 1),
        ("data.items.1.id", 2),
        ("data.items.-1.id", 2),
        ("data.items.0.tags.1", "b"),
        ("list.0.1", 11),
        ("list.1.0", 20),
        ("meta.count", 0),
        ("meta.ok", False),
        ("meta.empty", ""),
        ("data.items.2.id", None),
        ("data.items.-3", None),
        ("data.items.x", None),
        ("data.missing.deeper", None),
        ("data.next.url", None),
        ("meta.count.value", None),
        ("data.items.0.tags.5", None),
    ],
)
def test_get_path(path: str | None, expected: Any) -> None:
    assert get_path(DOC, path) == expected


def test_get_path_on_a_bare_list() -> None:
    assert get_path([{"a": {"b": 3}}], "0.a.b") == 3
    assert get_path([1, 2], "a") is None
    assert get_path("scalar", "a") is None
