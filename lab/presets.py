"""Preset configs by name: `lab train tiny`, `lab sweep isoflop-tiny`, `lab demo --study demo`.

The presets are the YAML files of the repository's configs/ folder. A wheel carries a copy of
that folder as `lab/configs` (setup.py copies it at build time); a checkout, or an editable
install of one, reads configs/ itself. A name is a file's path under that folder without
`.yaml` (`tiny`, `gpu/debug`, `sweeps/isoflop-tiny`); `configs/tiny.yaml`, as the docs write
it, names the same preset when no such file is under the working directory, so every command
in the docs runs from any folder.
"""

from __future__ import annotations

from pathlib import Path

from lab import paths
from lab.errors import UserError

PACKAGED = Path(__file__).resolve().parent / "configs"  # in an installed wheel
CHECKOUT = Path(__file__).resolve().parents[1] / "configs"  # in the repository


def root() -> Path:
    """The folder the presets are read from."""
    return PACKAGED if PACKAGED.is_dir() else CHECKOUT


def names(folder: str = "") -> list[str]:
    """Every preset's name (those under `folder` only, if given)."""
    base = root()
    found = sorted(p.relative_to(base).with_suffix("").as_posix() for p in base.rglob("*.yaml"))
    return [n for n in found if not folder or n.startswith(f"{folder}/")]


def _candidates(name: str, folder: str) -> list[str]:
    stem = name.removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    return ([f"{folder}/{stem}"] if folder and not stem.startswith(f"{folder}/") else []) + [stem]


def find(name: str, folder: str = "") -> Path | None:
    """The preset file a name stands for, or None. `folder` is tried first: `lab sweep
    isoflop-tiny` means sweeps/isoflop-tiny."""
    base = root()
    for stem in _candidates(name, folder):
        path = base / f"{stem}.yaml"
        if ".." not in Path(stem).parts and path.is_file():
            return path
    return None


def resolve(name: str | Path, folder: str = "", what: str = "config file") -> str:
    """A file the user named, or else the preset of that name; a UserError names both kinds
    when it is neither."""
    text = str(name)
    if paths.is_remote(text) or Path(text).is_file():
        return text
    if Path(text).is_dir():
        raise UserError(f"{what} {text} is a directory; give a YAML file")
    preset = find(text, folder)
    if preset is not None:
        return str(preset)
    choices = ", ".join(n.removeprefix(f"{folder}/") if folder else n for n in names(folder))
    raise UserError(f"{what} {text} does not exist and is no preset; give a YAML file or a "
                    f"preset: {choices}")
