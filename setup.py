"""Build hook: a wheel carries the repository's configs/ as lab/configs, so preset names
(`lab train tiny`, lab/presets.py) work wherever the package is installed. The rest of the
project's metadata is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPresets(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        target = Path(self.build_lib) / "lab" / "configs"
        for path in source.rglob("*.yaml"):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)


setup(cmdclass={"build_py": BuildWithPresets})
