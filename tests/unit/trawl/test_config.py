"""Sources files: valid files load, every problem of a bad file is reported at once."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from trawl.config import (
    MAX_SOURCES_BYTES,
    ApiSource,
    BrowserSource,
    HtmlSource,
    SourcesFile,
    SpiderSource,
    load_sources,
    select_sources,
)
from trawl.errors import ConfigError, ConfigIssue

REPO = Path(__file__).resolve().parents[3]

HTML_OK = """\
  - name: shop
    kind: html
    start_urls: ["http://shop.test/catalogue"]
    key: sku
    fields:
      sku: {selector: span.sku, required: true}
"""


def write(tmp_path: Path, text: str, name: str = "sources.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_sources(path, env={} if env is None else env)
    assert info.value.issues, "a sources file error carries its issues"
    assert info.value.lines() == [str(i) for i in info.value.issues]
    return info.value.issues


def where(issues: list[ConfigIssue]) -> set[tuple[str, str]]:
    return {(i.entry, i.field) for i in issues}


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        sources:
          - name: shop
            kind: html
            urls: ["http://shop.test/a", "https://shop.test/b"]
            fields:
              title: {selector: h1}
              year: {selector: .meta, regex: '(\\d{4})', type: int}
          - name: feed
            kind: api
            url: "${BASE:-http://api.test}/v1/items"
            headers: {Authorization: "Bearer ${TOKEN}"}
            params: {limit: 50, active: true}
            pagination: {type: page, param: p, size_param: n, size: 50}
            key: [id, kind]
            enabled: false
        """,
    )
    spec = load_sources(path, env={"TOKEN": "s3cret"})
    shop, feed = spec.sources
    assert isinstance(shop, HtmlSource)
    assert shop.urls == ["http://shop.test/a", "https://shop.test/b"]
    assert shop.key_fields == ["url"]
    assert shop.follow.max_depth == 3
    assert shop.follow.same_host is True
    assert shop.fields["year"].regex == r"(\d{4})"
    assert shop.fields["year"].type == "int"
    assert shop.fields["title"].type == "text"
    assert isinstance(feed, ApiSource)
    assert feed.url == "http://api.test/v1/items"  # the default after `:-`
    assert feed.headers == {"Authorization": "Bearer s3cret"}
    assert feed.params == {"limit": 50, "active": True}
    assert feed.pagination.type == "page"
    assert feed.pagination.size == 50
    assert feed.key_fields == ["id", "kind"]
    assert feed.enabled is False


def test_env_value_wins_over_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - {name: feed, kind: api, url: "${BASE:-http://default.test}/items"}
        """,
    )
    spec = load_sources(path, env={"BASE": "https://real.test"})
    assert isinstance(spec.sources[0], ApiSource)
    assert spec.sources[0].url == "https://real.test/items"


def test_empty_default_is_allowed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - {name: feed, kind: api, url: "http://api.test/items", headers: {X-Extra: "${EXTRA:-}"}}
        """,
    )
    spec = load_sources(path, env={})
    assert isinstance(spec.sources[0], ApiSource)
    assert spec.sources[0].headers == {"X-Extra": ""}


def test_demo_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAWL_DEMO_URL", raising=False)
    spec = load_sources(REPO / "examples" / "demo.yaml")
    by_name = {s.name: s for s in spec.sources}
    assert set(by_name) == {"products", "items", "js_products", "orders"}
    orders = by_name["orders"]
    assert isinstance(orders, SpiderSource) and orders.spider == "spiders.orders:OrdersSpider"
    assert orders.args["base_url"] == "http://127.0.0.1:8080" and orders.key_fields == ["number"]
    assert orders.fields["placed"].type == "date"
    products, items = by_name["products"], by_name["items"]
    js = by_name["js_products"]
    assert isinstance(js, BrowserSource) and js.render == "auto" and js.wait_for.selector == "span.sku"
    assert isinstance(products, HtmlSource)
    assert products.start_urls == ["http://127.0.0.1:8080/catalogue/page/1"]
    assert products.key_fields == ["sku"]
    assert products.fields["tags"].all is True
    assert isinstance(items, ApiSource)
    assert items.pagination.type == "cursor"
    assert items.pagination.cursor_path == "next_cursor"
    assert items.fields["color"].path == "attrs.color"
    spec = load_sources(REPO / "examples" / "demo.yaml", env={"TRAWL_DEMO_URL": "http://10.1.2.3:9"})
    assert spec.sources[1].url == "http://10.1.2.3:9/api/items"  # type: ignore[union-attr]


def test_every_problem_in_one_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        sources:
          - name: shop
            kind: html
            start_urls: ["http://shop.test/"]
            record_urls: "(unclosed"
            key: [sku, missing]
            fields:
              sku: {selector: span.sku}
              Bad-Name: {selector: p}
          - name: feed
            kind: api
            url: "${FEED_URL}/items"
            pagination: {type: cursor}
          - name: shop
            kind: html
            urls: ["ftp://nope"]
            fields:
              a: {selector: p, regex: "["}
              b: {selector: p, colour: red}
        """,
    )
    issues = problems(path)
    file = str(path)
    assert all(i.file == file for i in issues)
    assert where(issues) == {
        ("sources[0] (shop)", "record_urls"),
        ("sources[0] (shop)", "fields"),
        ("sources[0] (shop)", "key"),
        ("sources[1] (feed)", "url"),
        ("sources[1] (feed)", "pagination"),
        ("sources[2] (shop)", "name"),
        ("sources[2] (shop)", "urls.0"),
        ("sources[2] (shop)", "fields.a.regex"),
        ("sources[2] (shop)", "fields.b.colour"),
    }
    assert len(issues) == 9, [str(i) for i in issues]
    lines = [str(i) for i in issues]
    assert f"{file}: sources[1] (feed): url: environment variable FEED_URL is not set" in lines
    assert f"{file}: sources[2] (shop): urls.0: not an http(s) URL: 'ftp://nope'" in lines
    assert f"{file}: sources[0] (shop): key: key field 'missing' is not a declared field" in lines
    assert f"{file}: sources[1] (feed): pagination: cursor pagination needs `cursor_path`" in lines
    assert any("'Bad-Name' must match [a-z][a-z0-9_]{0,62}" in line for line in lines)


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        sources:
          - name: a
            kind: html
            urls: [http://x.test/]
             fields: {}
        """,
    )
    [issue] = problems(path)
    assert issue.entry == "line 6, column 6"
    assert issue.message.startswith("invalid YAML: ")
    assert str(issue).startswith(f"{path}: line 6, column 6: invalid YAML")


@pytest.mark.parametrize("text", ["- just\n- a list\n", "", "plain string\n"])
def test_not_a_mapping(tmp_path: Path, text: str) -> None:
    [issue] = problems(write(tmp_path, text))
    assert (issue.entry, issue.field) == ("(file)", "")
    assert "sources" in issue.message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read sources file"):
        load_sources(tmp_path / "missing.yaml", env={})


def test_file_level_problems(tmp_path: Path) -> None:
    issues = problems(write(tmp_path, "version: 2\nsources: []\nextra: 1\n"))
    assert where(issues) == {("(file)", "version"), ("(file)", "sources"), ("(file)", "extra")}


def test_missing_env_var_reported_once_per_reference(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: feed
            kind: api
            url: "${API}/items"
            headers: {Authorization: "Bearer ${TOKEN}", X-Ok: "${OK}"}
        """,
    )
    issues = problems(path, env={"OK": "yes"})
    assert [(i.entry, i.field, i.message) for i in issues] == [
        ("sources[0] (feed)", "url", "environment variable API is not set"),
        ("sources[0] (feed)", "headers.Authorization", "environment variable TOKEN is not set"),
    ]


@pytest.mark.parametrize(
    ("fragment", "field"),
    [
        ("record_urls: '[a-'", "record_urls"),
        ("follow: {allow: ['ok', '(bad']}", "follow.allow"),
        ("follow: {deny: ['*x']}", "follow.deny"),
    ],
)
def test_bad_regex(tmp_path: Path, fragment: str, field: str) -> None:
    path = write(tmp_path, f"sources:\n{HTML_OK}    {fragment}\n")
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (shop)", field)
    assert "invalid regular expression" in issue.message


@pytest.mark.parametrize("bad", ["Price", "1st", "_key", "with-dash", "a" * 64, "été"])
def test_bad_field_names(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, f'sources:\n{HTML_OK}      "{bad}": {{selector: p}}\n')
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (shop)", "fields")
    assert repr(bad) in issue.message


@pytest.mark.parametrize("good", ["a", "price_2", "x" * 63])
def test_good_field_names(tmp_path: Path, good: str) -> None:
    spec = load_sources(write(tmp_path, f"sources:\n{HTML_OK}      {good}: {{selector: p}}\n"), env={})
    assert good in spec.sources[0].fields


def test_bad_api_field_name_and_source_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - {name: Feed, kind: api, url: "http://api.test/", fields: {Id: {type: int}}}
        """,
    )
    assert where(problems(path)) == {("sources[0] (Feed)", "name"), ("sources[0] (Feed)", "fields")}


def test_duplicate_source_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - {name: feed, kind: api, url: "http://api.test/a"}
          - {name: feed, kind: api, url: "http://api.test/b"}
        """,
    )
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[1] (feed)", "name")
    assert "'feed' is used twice" in issue.message


def test_duplicate_names_reported_beside_other_problems(tmp_path: Path) -> None:
    # pydantic skips a model's own checks once a field fails; the file must still get one pass.
    path = write(
        tmp_path,
        """\
        sources:
          - {name: feed, kind: api, url: "http://api.test/a"}
          - {name: feed, kind: api, url: "not a url"}
          - {name: shop, kind: html, key: sku, fields: {title: {selector: h1, type: blob}}}
        """,
    )
    assert where(problems(path)) == {
        ("sources[1] (feed)", "name"),
        ("sources[1] (feed)", "url"),
        ("sources[2] (shop)", "fields.title.type"),
        ("sources[2] (shop)", "key"),
        ("sources[2] (shop)", "urls"),
    }


@pytest.mark.parametrize(("key", "missing"), [("sku", "sku"), ("[url, title, nope]", "nope")])
def test_key_field_must_be_declared(tmp_path: Path, key: str, missing: str) -> None:
    path = write(
        tmp_path,
        f"""\
        sources:
          - {{name: shop, kind: html, urls: ["http://shop.test/"], key: {key}, fields: {{title: {{selector: h1}}}}}}
        """,
    )
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (shop)", "key")
    assert issue.message == f"key field {missing!r} is not a declared field"


def test_html_needs_urls_or_start_urls(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  - {name: shop, kind: html, fields: {t: {selector: h1}}}\n")
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (shop)", "urls")
    assert "start_urls" in issue.message


@pytest.mark.parametrize(
    ("pagination", "field", "message"),
    [
        ("{type: cursor}", "pagination", "cursor pagination needs `cursor_path`"),
        ("{type: next_url}", "pagination", "next_url pagination needs `next_path`"),
        ("{type: offset}", "pagination", "offset pagination needs `size`"),
        ("{type: scroll}", "pagination.type", "Input should be"),
        ("{type: page, size: 0}", "pagination.size", "greater than or equal to 1"),
        ("{type: page, start: -1}", "pagination.start", "greater than or equal to 0"),
        ("{type: page, max_pages: 0}", "pagination.max_pages", "greater than or equal to 1"),
        ("{type: page, per_page: 5}", "pagination.per_page", "Extra inputs are not permitted"),
    ],
)
def test_pagination_shape(tmp_path: Path, pagination: str, field: str, message: str) -> None:
    path = write(
        tmp_path, f'sources:\n  - {{name: feed, kind: api, url: "http://api.test/", pagination: {pagination}}}\n'
    )
    [issue] = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (feed)", field)
    assert message in issue.message


def test_unknown_kind_names_the_entry(tmp_path: Path) -> None:
    [issue] = problems(write(tmp_path, "sources:\n  - {name: x, kind: ftp}\n"))
    assert issue.entry == "sources[0] (x)"
    assert "'ftp'" in issue.message


def spec_of(*names_enabled: tuple[str, bool]) -> SourcesFile:
    return SourcesFile.model_validate(
        {
            "sources": [
                {"name": n, "kind": "api", "url": f"http://api.test/{n}", "enabled": on} for n, on in names_enabled
            ]
        }
    )


def test_select_sources() -> None:
    spec = spec_of(("a", True), ("b", False), ("c", True))
    assert [s.name for s in select_sources(spec, None)] == ["a", "c"]
    assert [s.name for s in select_sources(spec, [])] == ["a", "c"]
    # Naming a disabled source runs it anyway; order follows the request.
    assert [s.name for s in select_sources(spec, ["c", "b"])] == ["c", "b"]


def test_select_unknown_source() -> None:
    spec = spec_of(("a", True), ("b", True))
    with pytest.raises(ConfigError) as info:
        select_sources(spec, ["a", "zz", "yy"])
    assert str(info.value) == "unknown source(s): zz, yy (known: a, b)"


def test_spider_source_loads_with_its_arguments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: books
            kind: spider
            spider: spiders.books:BooksSpider
            args: {base_url: "http://shop.test", pages: 3}
            settings: {DEPTH_LIMIT: 2}
            key: sku
            fields:
              sku: {type: text, required: true}
              price: {type: float, path: offer.price}
        """,
    )
    (books,) = load_sources(path, env={}).sources
    assert isinstance(books, SpiderSource)
    assert books.args == {"base_url": "http://shop.test", "pages": 3}
    assert books.settings == {"DEPTH_LIMIT": 2}
    assert books.key_fields == ["sku"] and books.fields["price"].path == "offer.price"
    assert books.robots is True


def test_spider_source_problems_name_their_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          - name: books
            kind: spider
            spider: "spiders/books.py"
            key: isbn
            fields:
              sku: {type: number}
        """,
    )
    found = where(problems(path))
    assert ("sources[0] (books)", "spider") in found
    assert ("sources[0] (books)", "key") in found
    assert ("sources[0] (books)", "fields.sku.type") in found


def test_frontier_and_shards_are_html_options_with_bounds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sources:
          - name: big
            kind: html
            start_urls: ["https://a.example/"]
            shards: 4
            fields: {t: {selector: h1}}
          - name: durable
            kind: html
            frontier: postgres
            start_urls: ["https://a.example/"]
            fields: {t: {selector: h1}}
        """,
    )
    big, durable = load_sources(path, env={}).sources
    assert isinstance(big, HtmlSource) and big.shards == 4 and big.frontier is None
    assert isinstance(durable, HtmlSource) and durable.frontier == "postgres" and durable.shards == 1
    bad = write(
        tmp_path,
        """
        sources:
          - name: big
            kind: html
            start_urls: ["https://a.example/"]
            shards: 0
            frontier: disk
            fields: {t: {selector: h1}}
        """,
    )
    assert {field for _, field in where(problems(bad))} >= {"shards", "frontier"}


def test_names_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    # `re.match("^...$")` lets "price\n" through (`$` matches before a final newline); names become columns.
    path = write(
        tmp_path,
        """\
        sources:
          - name: "shop\\n"
            kind: html
            urls: ["http://shop.test/"]
            fields:
              "price\\n": {selector: .price}
        """,
    )
    lines = [str(i) for i in problems(path)]
    assert any("name 'shop\\n' must match" in line for line in lines), lines
    assert any("field name(s) 'price\\n' must match" in line for line in lines), lines


def test_a_yaml_alias_bomb_fails_fast_naming_the_file(tmp_path: Path) -> None:
    # The "billion laughs" in 436 bytes: nine levels of nine aliases, ~387 million strings if expanded.
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(levels) + "\nsources: *i\n"
    assert len(bomb.encode()) < 500
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb, encoding="utf-8")
    started = time.monotonic()
    issues = problems(path)
    assert time.monotonic() - started < 1.0
    assert [str(i) for i in issues] == [
        f"{path}: line 2, column 8: invalid YAML: YAML aliases (*a) are not allowed in a sources file"
    ]


def test_a_sources_file_over_the_size_cap_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("sources: []\n" + "#" * MAX_SOURCES_BYTES, encoding="utf-8")
    assert [str(i) for i in problems(path)] == [f"{path}: (file): larger than {MAX_SOURCES_BYTES} bytes: not read"]


def test_max_failed_ratio_out_of_range_names_entry_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sources:
          - name: shop
            kind: html
            urls: ["https://shop.example.com/"]
            max_failed_ratio: 1.5
            fields:
              title: {selector: h1}
        """,
    )
    (issue,) = problems(path)
    assert (issue.entry, issue.field) == ("sources[0] (shop)", "max_failed_ratio")
    assert "1" in issue.message
