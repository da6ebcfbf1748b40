"""trawl: a Prefect-orchestrated async scraping crawler that stages raw data and loads PostgreSQL."""

__version__ = "0.1.0"
