"""Reproducible benchmarks (``make bench``); never run as tests."""
