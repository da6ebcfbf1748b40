"""Scrapy spiders (plain Scrapy classes, also runnable with ``scrapy crawl``); the ``spider`` kind lands later."""
