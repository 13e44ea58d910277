"""Packaging entry point. All metadata lives in pyproject.toml.

The optional native CPU extension (csrc/) is built here when a compiler is available; a missing
compiler or a failed build never fails the install (the package falls back to pure PyTorch).
"""

from setuptools import setup

setup()
