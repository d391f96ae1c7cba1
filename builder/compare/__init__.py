"""Comparing images: which layer, which file, which config field differs, and why (``pybuild diff``/``verify``)."""
