"""Scrapy project settings for ``scrapy crawl NAME`` from the repo root (``scrapy.cfg`` points here).

Only for plain Scrapy runs: a `spider` source gets its settings from trawl
(``trawl.connectors.spider.scrapy_settings``), not from this module.
"""

BOT_NAME = "trawl"
SPIDER_MODULES = ["spiders"]
NEWSPIDER_MODULE = "spiders"
USER_AGENT = "trawl/0.1 (+https://github.com/trawl/trawl)"
ROBOTSTXT_OBEY = True
CONCURRENT_REQUESTS_PER_DOMAIN = 8
# The public suffix list from tldextract's bundled snapshot: Scrapy's cookie handling would download it otherwise.
DOWNLOADER_MIDDLEWARES = {
    "scrapy.downloadermiddlewares.cookies.CookiesMiddleware": None,
    "trawl.connectors.spider.OfflineCookiesMiddleware": 700,
}
FEED_EXPORT_ENCODING = "utf-8"
