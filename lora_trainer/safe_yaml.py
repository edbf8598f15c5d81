"""Read a YAML file that may come from anyone: bounded size, UTF-8 only, no alias bombs, plain data only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_trainer.errors import UserError
from lora_trainer.fsutil import TextEncodingError, read_utf8

MAX_YAML_BYTES = 1 << 20  # a config is a few kilobytes
MAX_YAML_VALUES = 100_000  # values after alias expansion (a nested alias "bomb" expands to billions)


class _ExpansionTooLarge(yaml.YAMLError):
    pass


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_VALUES) -> int:
    """How many values the node graph holds once every alias is expanded; stops past ``limit``.

    Aliases share nodes, so each node's size is computed once (linear in the document, however deep the
    expansion would go). A recursive alias raises too.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise _ExpansionTooLarge(f"its aliases expand to more than {limit} values (an alias bomb?); "
                                         "write the values out instead of repeating anchors")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _ExpansionTooLarge("it has a recursive alias (an anchor used inside itself)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand past :data:`MAX_YAML_VALUES`."""

    def construct_document(self, node: yaml.Node) -> Any:
        expanded_size(node)
        return super().construct_document(node)


def parse_yaml(text: str, source: str, error: type[UserError] = UserError) -> Any:
    """The data of one YAML document (safe types only); ``error`` names ``source`` when it cannot be read."""
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _ExpansionTooLarge as err:
        raise error(f"{source} is refused: {err}") from None
    except yaml.YAMLError as err:
        raise error(f"{source} is not valid YAML: {_first_lines(str(err))}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of thousands of digits, or nesting too deep
        raise error(f"{source} is not valid YAML: {_first_lines(str(err))}") from None


def _first_lines(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def read_yaml_text(path: str | Path, what: str = "YAML file", error: type[UserError] = UserError) -> str:
    """The text of ``path``: at most :data:`MAX_YAML_BYTES`, UTF-8 (with or without BOM)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{what} {path} is {size} bytes; a config is at most {MAX_YAML_BYTES} bytes")
        data = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        return read_utf8(path, data)
    except TextEncodingError as err:
        raise error(f"{what} {err}") from None


def read_yaml_mapping(path: str | Path, what: str = "YAML file", error: type[UserError] = UserError) -> dict:
    """A YAML file's top-level mapping ({} for an empty file), read with every bound above."""
    path = Path(path)
    data = parse_yaml(read_yaml_text(path, what, error), str(path), error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the config must be a mapping of key: value, got {type(data).__name__}")
    return data
