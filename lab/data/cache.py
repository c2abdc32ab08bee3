"""The default corpus: the running interpreter's standard library, prepared once into a cache."""

from __future__ import annotations

import hashlib
import sys
import sysconfig

from lab.data.format import FORMAT_VERSION, METADATA_FILE, open_dataset
from lab.data.prep import DEFAULT_VAL_FRACTION, prepare
from lab.paths import cache_dir, makedirs


def default_data_path() -> str:
    """The stdlib corpus with the byte tokenizer, prepared on first use; returns its path.

    Safe when several processes start at once: each prepares into its own temporary directory
    and the first atomic rename wins; the others find the finished data and use it.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    key = f"{stdlib}|{sys.version}|v{FORMAT_VERSION}|{DEFAULT_VAL_FRACTION}"
    name = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-byte-"
    path = cache_dir() / "data" / (name + hashlib.sha256(key.encode()).hexdigest()[:10])
    if (path / METADATA_FILE).is_file():
        open_dataset(str(path))  # raises a UserError naming the problem if it is damaged
        return str(path)
    makedirs(path.parent, fix="set LAB_CACHE_DIR to a directory you can write to, or give "
                              "data.path")
    print(f"preparing the default corpus (Python stdlib, byte tokens) in {path} once",
          file=sys.stderr)
    prepare("stdlib", str(path))
    return str(path)
