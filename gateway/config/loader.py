"""Read gateway.yaml: parse with line numbers, substitute ${VAR}, validate, and report every problem.

Problems come back as `FILE:LINE: dotted.path: problem` lines, sorted by line. YAML anchors, aliases
and merge keys are refused (each use is reported): a config is read by people, so copies are explicit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.problems import Loc, validation_problems
from gateway.config.schema import GatewayConfig

_TAG = "tag:yaml.org,2002:"
_TYPED_TAGS = {_TAG + t for t in ("null", "bool", "int", "float")}
# `$${` is a literal `${`; `${NAME}` or `${NAME:-default}`; any other `${` is malformed.
_REF = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
_REFS_ONLY = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})+")
_RESOLVER: Any = yaml.resolver.Resolver()


class ConfigError(Exception):
    """The config cannot be used; `.errors` holds one `FILE:LINE: path: problem` line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Alias(yaml.ScalarNode):
    """Stands in for an alias (`*name`), which is reported rather than resolved."""


class _Composer(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.plain: set[int] = set()  # ids of untagged, unquoted scalar nodes
        self.anchored: dict[int, str] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        this: Any = self  # the stubs leave the event API untyped
        event = this.peek_event()
        if isinstance(event, yaml.AliasEvent):
            this.get_event()
            marks: Any = (event.start_mark, event.end_mark)
            return _Alias("", event.anchor or "", *marks)
        self.anchors.clear()  # every anchor is reported, so a repeated name is no extra problem
        node = super().compose_node(parent, index)
        if node is not None and getattr(event, "anchor", None):
            self.anchored[id(node)] = event.anchor
        if node is not None and isinstance(event, yaml.ScalarEvent) and event.tag is None and event.style is None:
            self.plain.add(id(node))
        return node


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _interpolate(value: str, env: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """Return the substituted text, whether it was made of references only, and any problems."""
    problems: list[str] = []

    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if m.group(0) == "$${":
            return "${"
        if name is None:
            shown = re.match(r"\$\{[^}]*\}?", value[m.start() :])
            problems.append(f"bad reference {shown.group(0) if shown else '${'!r} "
                            "(use ${VAR} or ${VAR:-default}; $${ for a literal ${)")
        elif env.get(name) or (default is None and name in env):
            return env[name]
        elif default is not None:  # like the shell: unset or empty takes the default
            return default
        else:
            problems.append(f"environment variable {name} is not set")
        return ""

    return _REF.sub(substitute, value), bool(_REFS_ONLY.fullmatch(value)), problems


class _Builder:
    """Turns the node tree into plain data, remembering a line for every path."""

    def __init__(self, composer: _Composer, env: Mapping[str, str]) -> None:
        self.composer, self.env = composer, env
        self.problems: list[tuple[int, Loc, str]] = []
        self.lines: dict[Loc, int] = {}
        self.bad: set[Loc] = set()  # values already reported: validation errors there are noise
        self.incomplete: set[Loc] = set()  # mappings with a refused merge key: "missing" is noise

    def refused(self, node: yaml.Node, loc: Loc) -> bool:
        """Report an anchor on the node; True when the node is an alias."""
        if id(node) in self.composer.anchored:
            anchor = self.composer.anchored[id(node)]
            self.problems.append((_line(node), loc, f"YAML anchors (&{anchor}) are not supported"))
        if isinstance(node, _Alias):
            self.problems.append((_line(node), loc, f"YAML aliases (*{node.value}) are not supported"))
        return isinstance(node, _Alias)

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        if self.refused(node, loc):
            self.bad.add(loc)
            return None
        if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
            return self.mapping(node, loc)
        if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
            self.lines.update(((*loc, i), _line(item)) for i, item in enumerate(node.value))
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode) and node.tag in (_TAG + "str", _TAG + "timestamp"):
            return self.string(node, loc)  # no field holds a date: a timestamp stays text
        if isinstance(node, yaml.ScalarNode) and node.tag in _TYPED_TAGS:
            return self.composer.construct_object(node)
        self.bad.add(loc)
        tag = node.tag.replace(_TAG, "!!", 1) if node.tag.startswith(_TAG) else node.tag
        self.problems.append((_line(node), loc, f"unsupported YAML tag {tag!r}"))
        return None

    def mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line, is_scalar = _line(key_node), isinstance(key_node, yaml.ScalarNode)
            if is_scalar and key_node.tag == _TAG + "merge":
                self.incomplete.add(loc)
                self.problems.append((line, loc, "YAML merge keys ('<<') are not supported"))
            elif self.refused(key_node, loc):
                continue
            elif not is_scalar or key_node.tag != _TAG + "str":
                bad = f"mapping key {key_node.value!r} is not a string (quote it)" if is_scalar else ""
                self.problems.append((line, loc, bad or "mapping keys must be strings"))
            elif key_node.value in out:
                self.problems.append((line, loc, f"duplicate key {key_node.value!r}"))
            else:
                self.lines[(*loc, key_node.value)] = line
                out[key_node.value] = self.build(value_node, (*loc, key_node.value))
        return out

    def string(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        text, only_refs, problems = _interpolate(node.value, self.env)
        if problems:
            self.bad.add(loc)
            self.problems.extend((_line(node), loc, p) for p in problems)
            return node.value
        if only_refs and text and id(node) in self.composer.plain:
            tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
            if tag in _TYPED_TAGS:  # scalars only: the text is never parsed as YAML
                return self.composer.construct_object(yaml.ScalarNode(tag, text))
        return text


def _line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of the nearest node that exists: a missing field points at the mapping lacking it."""
    return next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), 1)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int, str]:
    if not isinstance(exc, yaml.MarkedYAMLError):  # a ReaderError knows its position
        return text.count("\n", 0, getattr(exc, "position", 0)) + 1, str(exc).splitlines()[0]
    mark = exc.problem_mark or exc.context_mark
    line, problem = (mark.line + 1 if mark else 1), exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        where = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        problem += f" ({exc.context}{where})"
    return line, problem


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load and check a gateway.yaml; raise ConfigError listing every problem found.

    `${VAR}` and `${VAR:-default}` in string values are read from `env` (default: os.environ).
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{name}:{line}: (root): not UTF-8 text (byte 0x{e.object[e.start]:02x})"]) from None
    except OSError as e:
        raise ConfigError([f"{name}:0: (root): cannot read file ({e.strerror or e})"]) from None
    try:
        composer = _Composer(text)  # the reader refuses control characters right away
        root = composer.get_single_node()
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e, text)
        raise ConfigError([f"{name}:{line}: (root): {problem}"]) from None
    b = _Builder(composer, os.environ if env is None else env)
    data: Any = {}
    if root is not None and root.tag != _TAG + "null":  # an empty document: all defaults
        b.lines[()] = _line(root)
        data = b.build(root, ())
    problems = b.problems
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems += [(_line_of(b.lines, loc), loc, p) for loc, p in validation_problems(e, b.bad, b.incomplete)]
    if problems:
        shown = [f"{name}:{line}: {'.'.join(map(str, loc)) or '(root)'}: {p}"
                 for line, loc, p in sorted(problems, key=lambda p: p[0])]
        raise ConfigError(list(dict.fromkeys(shown)))
    return config
