"""The bundled demo website: a deterministic shop and JSON API for the crawler to scrape."""

from trawl.demo.site import (
    ITEM_COUNT,
    PRODUCT_COUNT,
    DemoSite,
    DemoSiteThread,
    item,
    item_json,
    make_app,
    product,
)

__all__ = [
    "ITEM_COUNT",
    "PRODUCT_COUNT",
    "DemoSite",
    "DemoSiteThread",
    "item",
    "item_json",
    "make_app",
    "product",
]
