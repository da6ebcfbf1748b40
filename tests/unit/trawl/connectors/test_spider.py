"""The spider connector's Scrapy settings and spider loading (no network)."""

from __future__ import annotations

import pytest

from trawl.config import SpiderSource
from trawl.connectors.spider import load_spider, scrapy_settings
from trawl.errors import ConfigError
from trawl.retry import TRANSIENT_STATUS
from trawl.settings import Settings


def _source(**extra: object) -> SpiderSource:
    return SpiderSource.model_validate({"kind": "spider", "name": "s", "spider": "spiders.books:BooksSpider", **extra})


def test_trawls_fetch_rules_win_over_the_sources_scrapy_settings() -> None:
    settings = Settings(per_host_concurrency=3, total_concurrency=40, max_retries=1, total_timeout=7, max_redirects=4)
    source = _source(
        settings={"ROBOTSTXT_OBEY": True, "DOWNLOAD_DELAY": 5, "DEPTH_LIMIT": 2, "USER_AGENT": "other"},
        politeness={"concurrency": 2},
    )
    s = scrapy_settings(source, settings)
    assert s.getbool("TWISTED_REACTOR_ENABLED") is False
    assert s.getbool("ROBOTSTXT_OBEY") is False  # trawl's robots cache does it, in GateMiddleware
    assert s.getfloat("DOWNLOAD_DELAY") == 0  # the host's gate spaces requests
    assert s.getint("CONCURRENT_REQUESTS_PER_DOMAIN") == 2
    assert s.getint("CONCURRENT_REQUESTS") == 40
    assert s.getint("RETRY_TIMES") == 1 and set(s.getlist("RETRY_HTTP_CODES")) == set(TRANSIENT_STATUS)
    assert s.getfloat("DOWNLOAD_TIMEOUT") == 7 and s.getint("REDIRECT_MAX_TIMES") == 4
    assert s["USER_AGENT"] == settings.user_agent
    assert s.getint("DEPTH_LIMIT") == 2  # the source's own settings otherwise stand
    mws = s.getdict("DOWNLOADER_MIDDLEWARES_BASE")
    assert mws["trawl.connectors.spider.OutcomeMiddleware"] < mws["scrapy.downloadermiddlewares.retry.RetryMiddleware"]
    assert mws["trawl.connectors.spider.GateMiddleware"] > max(v for k, v in mws.items() if "GateMiddleware" not in k)
    assert "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware" not in mws


def test_spider_settings_cannot_take_trawls_rules_back() -> None:
    """A spider's ``custom_settings`` sit at ``spider`` priority, below trawl's ``cmdline``."""
    s = scrapy_settings(_source(), Settings())
    s.setdict({"ROBOTSTXT_OBEY": True, "DOWNLOAD_DELAY": 3, "TWISTED_REACTOR_ENABLED": True}, priority="spider")
    assert s.getbool("ROBOTSTXT_OBEY") is False
    assert s.getfloat("DOWNLOAD_DELAY") == 0
    assert s.getbool("TWISTED_REACTOR_ENABLED") is False


def test_load_spider() -> None:
    from spiders.books import BooksSpider

    assert load_spider("spiders.books:BooksSpider") is BooksSpider
    with pytest.raises(ConfigError, match="cannot import"):
        load_spider("spiders.nope:Spider")
    with pytest.raises(ConfigError, match="no Scrapy spider class"):
        load_spider("spiders.books:Missing")
    with pytest.raises(ConfigError, match="no Scrapy spider class"):
        load_spider("spiders.books:__all__")
