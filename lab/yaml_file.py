"""YAML files as users write them (run configs, sweep and study files): plain values only,
each key once in its mapping, and any mistake as one line that names the file and the line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lab import paths
from lab.errors import UserError, shown

MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _PlainLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no Python tags), which also refuses a key given twice in one
    mapping: PyYAML keeps the last silently, so a typo'd copy would win unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key_node.value, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in `path` (local or a URL), `what` naming it in errors ("config
    file"); an empty file is None."""
    if paths.is_dir(path):
        raise UserError(f"{what} {path} is a directory; give a YAML file")
    if not paths.is_file(path):
        raise UserError(f"{what} {path} does not exist; give a YAML file")
    try:
        return yaml.load(paths.read_text(path), Loader=_PlainLoader)  # noqa: S506 (safe loader)
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start} cannot be decoded); "
                        "save it as UTF-8") from None
    except _DuplicateKey as e:
        raise UserError(f"{what} {path} gives the key {shown(e.key)} twice in one mapping "
                        f"(lines {e.first} and {e.again}); keep one") from None
    except yaml.constructor.ConstructorError as e:
        line = _line(e)
        tag = re.search(r"constructor for the tag '([^']*)'", getattr(e, "problem", "") or "")
        if tag:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise UserError(f"{what} {path}{line} uses the tag {shown(name)}, which the lab does "
                            "not read (only plain YAML values); remove the tag") from None
        raise UserError(f"{what} {path} is not valid YAML{line}; fix its syntax") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML{_line(e)}; fix its syntax") from None


def _line(error: yaml.YAMLError) -> str:
    line = getattr(getattr(error, "problem_mark", None), "line", None)
    return f" (line {line + 1})" if line is not None else ""
