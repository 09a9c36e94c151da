"""Checks a user runs on a deployment (``memplug bench store``, ``memplug bench load``); each writes JSON and a PNG.

The research benchmarks of the tiers live outside the package, in ``benchmarks/``.
"""
