"""Benchmarks shipped with memplug (``memplug bench ...``); results go to JSON files."""
