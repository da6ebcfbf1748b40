"""The bundled demo website: a deterministic shop and JSON API for the crawler to scrape, and its sources file."""

from importlib.resources import files
from importlib.resources.abc import Traversable

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
    "sources_file",
]


def sources_file() -> Traversable:
    """The demo's sources file, package data of ``trawl.demo``: found the same way in a wheel as in a checkout."""
    return files(__name__) / "sources.yaml"
