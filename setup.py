"""Packaging entry point. All metadata lives in pyproject.toml.

The native CPU kernel is not compiled here: pip builds in an isolated environment without torch,
and the library must match the torch it is loaded into. Its C++ source ships as package data and
is compiled on first use, then cached (psft_kernels/_native_build.py, docs/native.md). So the
install never needs a compiler, and a failed build only means the chunked backend is used.
"""

from setuptools import setup

setup(package_data={"psft_kernels": ["csrc/*.cpp"]})
