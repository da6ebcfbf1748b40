"""Prefect flows: ``crawl`` (sources → staging), ``load`` (staging → PostgreSQL), ``pipeline`` (both)."""
