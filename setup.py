"""Builds outside the checkout: every setting of the package is in pyproject.toml; this file only gives setuptools'
``build`` command a fresh temporary directory per build (removed when the build process exits) in place of
``./build``. So ``pip wheel .`` and ``pip install .`` leave no ``build/`` folder behind, and a build never ships
what an earlier one left there (setuptools copies all of ``build/lib`` into the wheel: a module deleted from
``sai_hf/`` since the last build would still be installed). ``--build-base DIR`` still chooses a directory.
"""

import tempfile

from setuptools import setup
from setuptools.command.build import build


class BuildInTemporaryDirectory(build):
    """setuptools' ``build`` whose default ``build_base`` is a new temporary directory instead of ``./build``."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self.build_base = None  # unset: finalize_options picks a temporary directory

    def finalize_options(self) -> None:
        if self.build_base is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="sai-hf-build-")  # removed at interpreter exit
            self.build_base = self._temporary.name
        super().finalize_options()


setup(cmdclass={"build": BuildInTemporaryDirectory})
