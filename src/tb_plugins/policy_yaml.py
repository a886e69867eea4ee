"""Reading a policy file's YAML safely: bounded size, depth and alias expansion, no repeated
keys, and a :class:`~tb_plugins.errors.ConfigError` (never a traceback) for anything else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tb_plugins.core.quantities import short_repr
from tb_plugins.errors import ConfigError

if TYPE_CHECKING:
    import yaml

__all__ = ["MAX_POLICY_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "read_policy_yaml"]

MAX_POLICY_BYTES = 1 << 20
"""Largest policy file :func:`load_policy` reads: 1 MiB. A larger file is refused unread."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of lists and mappings a policy file may have (a sane one needs 5)."""
MAX_YAML_NODES = 1_000_000
"""Most values a policy file may hold once its aliases are expanded. A file under
:data:`MAX_POLICY_BYTES` without aliases cannot reach it; an alias bomb ("billion laughs")
does, and is refused before anything walks it."""


def read_policy_yaml(p: Path) -> Any:
    """The data of the YAML file ``p`` (not yet validated as a policy).

    Raises:
        ConfigError: the file is missing, too large, not UTF-8, not YAML, empty, repeats a
            key, nests too deeply or expands too far through aliases.
    """
    import yaml

    try:
        with p.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)  # bounded: a FIFO or /dev/zero cannot hang us
    except OSError as exc:
        raise ConfigError(
            f"{p}: cannot read the policy file: {exc.strerror}", source=str(p)
        ) from exc
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(
            f"{p}: the policy file is larger than {MAX_POLICY_BYTES:,} bytes (1 MiB); "
            f"a policy is a few kilobytes",
            source=str(p),
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: the policy file is not UTF-8 text (byte {exc.start})", source=str(p)
        ) from None
    try:
        data = yaml.load(text, Loader=_policy_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}", source=str(p)) from None
    except RecursionError:  # the depth limit should make this unreachable; never a traceback
        raise ConfigError(
            f"{p}: not valid YAML: nested too deeply (at most {MAX_YAML_DEPTH} levels)",
            source=str(p),
        ) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 5,000 digits, a bad date
        problem = str(exc) if len(str(exc)) <= 200 else str(exc)[:200] + "..."
        raise ConfigError(f"{p}: not valid YAML: {problem}", source=str(p)) from None
    if data is None:
        raise ConfigError(f"{p}: the policy file is empty", source=str(p))
    return data


_MERGE_TAG = "tag:yaml.org,2002:merge"


@lru_cache(maxsize=1)
def _policy_loader() -> type[yaml.SafeLoader]:
    """A :class:`yaml.SafeLoader` that refuses repeated keys, deep nesting and alias bombs."""
    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError
    from yaml.nodes import CollectionNode, MappingNode, Node, SequenceNode

    class PolicyLoader(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0
            # id(node) -> (values once aliases are expanded, depth once expanded)
            self._extent: dict[int, tuple[int, int]] = {}
            self._unique: set[int] = set()

        def compose_node(self, parent: Node | None, index: int) -> Node | None:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                node = super().compose_node(parent, index)
                if node is not None and id(node) not in self._extent:
                    raise ComposerError(
                        None, None, "an alias refers to a node that contains it", mark
                    )
                return node
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise ComposerError(
                        None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark
                    )
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            if node is None:  # pragma: no cover - only at the end of the stream
                return node
            size, depth = 1, 1
            if isinstance(node, CollectionNode):
                children: list[Node] = (
                    [n for pair in node.value for n in pair]
                    if isinstance(node, MappingNode)
                    else list(node.value)
                )
                for child in children:
                    child_size, child_depth = self._extent[id(child)]
                    size += child_size
                    depth = max(depth, child_depth + 1)
            if size > MAX_YAML_NODES:
                raise ComposerError(
                    None,
                    None,
                    f"aliases expand this to more than {MAX_YAML_NODES:,} values",
                    mark,
                )
            if depth > MAX_YAML_DEPTH:
                raise ComposerError(
                    None,
                    None,
                    f"aliases nest this deeper than {MAX_YAML_DEPTH} levels",
                    mark,
                )
            self._extent[id(node)] = (size, depth)
            return node

        def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
            self._check_unique(node)
            return super().construct_mapping(node, deep=deep)

        def _check_unique(self, node: MappingNode) -> None:
            # Before SafeConstructor flattens ``<<`` merges into the node: a key a merge
            # brings in may be overridden, a key written twice may not.
            if id(node) in self._unique:
                return
            self._unique.add(id(node))
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    sources = (
                        value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                    )
                    for source in sources:
                        if isinstance(source, MappingNode):
                            self._check_unique(source)
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # unhashable: SafeConstructor refuses it with its own error
                    continue
                line = key_node.start_mark.line + 1
                if seen is not None:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key {short_repr(key)}: first at line {seen}, again at line "
                        f"{line} (a repeated key would silently replace the first)",
                        key_node.start_mark,
                    )
                first[key] = line

    return PolicyLoader
