"""trawl's tests; a package so that ``tests.helpers`` imports the same way from tests and from ``benchmarks/``."""
