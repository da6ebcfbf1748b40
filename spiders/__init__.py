"""Scrapy spiders: plain Scrapy classes, run by `spider` sources or with ``scrapy crawl NAME`` from the repo root."""
