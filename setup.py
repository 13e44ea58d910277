"""Packaging entry point. All metadata lives in pyproject.toml.

The native CPU kernel (top-level ``csrc/``) is not compiled here: pip builds in an isolated
environment without torch, and the library must match the torch it is loaded into. Its C++
source is copied into the package (``psft_kernels/csrc/``) when a wheel is built, and compiled on
first use, then cached (psft_kernels/_native_build.py, docs/native.md). An editable install reads
it from ``csrc/`` directly. So installing never needs a compiler, and a failed build only means
the chunked backend is used.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithNativeSource(build_py):
    """Ship ``csrc/*.cpp`` inside the package, where ``_native_build`` looks for it first."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "psft_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / "csrc").glob("*.cpp"):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithNativeSource})
