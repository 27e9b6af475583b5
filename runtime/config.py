"""Configuration: package defaults, user files, environment variables and `set`.

State
-----
The process keeps one `ConfigStore`; the module-level functions act on it. It holds:

- the *packages* that registered defaults and a schema: runtime registers
  ``runtime.yaml`` and ``runtime-schema.yaml`` when this module is imported, other
  packages add theirs with `register_defaults`;
- the *layers* read by the last `refresh`: one per user YAML file and one per ``HPC_*``
  environment variable, kept as read so that they can be checked again when a package
  registers more keys later;
- the *overrides* made with `set`;
- `config`, the merged dict that `get` walks, and the source of every value in it.

Every change rebuilds the merged dict from those inputs and validates it completely
before installing anything, so a bad value leaves the configuration as it was. It is
installed by replacing whole top-level sections, one assignment each: a thread calling
`get` meanwhile sees each section either as it was or as it is now, never half-built.
`get` therefore takes no lock and copies nothing; it is called per compute and per
serialize.

Sources, lowest to highest priority::

    package defaults    runtime/runtime.yaml, then each register_defaults() in order
    /etc/hpc/*.yaml     (files in a directory apply in name order)
    ~/.config/hpc/*.yaml
    $HPC_CONFIG         a YAML file, or a directory of them
    HPC_A__B=value      sets key a.b; the value is read as a Python literal if it is
                        one (4, True, None, [1, 2]), otherwise kept as a string
    set()

Keys nest with ``.``; ``-`` and ``_`` in a name are the same (the canonical form, used
in `config`, has ``-``).

Sections no package has registered yet
--------------------------------------
runtime is imported before launchers, so a user file may hold a ``launchers:``
section before any loaded package knows its keys. A top-level *section* with an
unknown name is therefore held, unchecked, until a package registers it:
`register_defaults` checks it then. ``validate()`` (and ``hpc config validate``)
reports any still unclaimed. A top-level name close to a registered one
(``serialise:``) is taken for a typo and rejected at once, as is every unknown key
inside a registered section and every unknown top-level value.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import yaml

from runtime.errors import ConfigError
from runtime.units import parse_bytes, parse_timedelta

__all__ = [
    "ConfigStore",
    "collect",
    "config",
    "get",
    "refresh",
    "register_defaults",
    "set",
    "show",
    "sources",
    "validate",
]

#: Directories searched for ``*.yaml`` files when `refresh`/`collect` get no ``paths``,
#: lowest priority first.
_SEARCH_PATH = ("/etc/hpc", "~/.config/hpc")
#: Environment variables starting with this set config keys.
_ENV_PREFIX = "HPC_"
#: The variable naming an extra config file or directory; not itself a key.
_CONFIG_PATH_VAR = "HPC_CONFIG"

# Variables of ours that are not config keys: paths and switches for processes and tests.
_NOT_KEYS = frozenset(
    {
        _CONFIG_PATH_VAR,
        "HPC_SECRET_FILE",
        "HPC_SCHEDULER_FILE",
        "HPC_REQUIRE_SLURM",
        "HPC_REQUIRE_MPI",
        # A batch job's drain and restart instructions (runtime.jobenv).
        "HPC_JOB_DRAIN_AT",
        "HPC_JOB_DRAIN_SIGNAL",
        "HPC_JOB_RESTART",
        "HPC_JOB_SCRIPT",
        "HPC_JOB_MAX_RESTARTS",
        "HPC_JOB_RESTARTS",
        "HPC_JOB_RESTART_OF",
    }
)
# Cutoff above which an unknown top-level section is taken for a typo of a known name.
_TYPO_CUTOFF = 0.8

Key = tuple[str, ...]
PathArg = str | os.PathLike[str]
Paths = PathArg | Iterable[PathArg]


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT: Any = _NoDefault()
_MISSING: Any = object()


# --- schema -------------------------------------------------------------------------


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_null(value: Any) -> bool:
    return value is None


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_byte_size(value: Any) -> bool:
    if _is_number(value):
        return bool(value >= 0)
    if isinstance(value, str):
        try:
            parse_bytes(value)
        except ConfigError:
            return False
        return True
    return False


def _is_duration(value: Any) -> bool:
    if _is_number(value):
        return True
    if isinstance(value, str):
        try:
            parse_timedelta(value)
        except ConfigError:
            return False
        return True
    return False


# Type names a schema may use: the check, and how an error message describes the type.
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (_is_str, "str"),
    "int": (_is_int, "int"),
    "float": (_is_number, "float"),
    "bool": (_is_bool, "bool"),
    "null": (_is_null, "null"),
    "list": (_is_list, "list"),
    "byte-size": (_is_byte_size, "a byte size such as '10MB' or 1048576"),
    "duration": (_is_duration, "a duration such as '30s', '5 min' or 30"),
}
_SPEC_FIELDS = ("type", "choices", "min", "description")


@dataclass(frozen=True)
class _Spec:
    """What one key accepts, from a schema file."""

    types: tuple[str, ...]
    description: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


# A schema is a tree of dicts whose leaves are _Spec; mypy cannot spell the recursion.
Schema = dict[str, Any]


def _is_spec(node: Mapping[str, Any]) -> bool:
    # A key that is itself called "type" would hold a mapping, so this cannot misfire.
    return "type" in node and not isinstance(node["type"], Mapping)


def _parse_schema(raw: Any, origin: str, prefix: Key = ()) -> Schema:
    if not isinstance(raw, Mapping):
        where = f"section {_dotted(prefix)!r}" if prefix else "the top level"
        raise ConfigError(f"schema {origin}: {where} must be a mapping of keys")
    tree: Schema = {}
    for raw_key, node in raw.items():
        if not isinstance(raw_key, str) or not raw_key or "." in raw_key:
            raise ConfigError(f"schema {origin}: {raw_key!r} is not a key name")
        path = (*prefix, _canonical(raw_key))
        if not isinstance(node, Mapping):
            raise ConfigError(
                f"schema {origin}: {_dotted(path)!r} must map to 'type:' and "
                "'description:' (a key), or to more keys (a section)"
            )
        if _is_spec(node):
            tree[path[-1]] = _parse_spec(node, origin, path)
        else:
            tree[path[-1]] = _parse_schema(node, origin, path)
    return tree


def _parse_spec(node: Mapping[str, Any], origin: str, path: Key) -> _Spec:
    where = f"schema {origin}: key {_dotted(path)!r}"
    extra = sorted(str(field) for field in node if field not in _SPEC_FIELDS)
    if extra:
        raise ConfigError(f"{where} has unknown fields {extra}; use {', '.join(_SPEC_FIELDS)}")
    raw_types = node["type"]
    if not isinstance(raw_types, list):
        raw_types = [raw_types]
    # YAML reads a bare `null` as None.
    types = tuple("null" if t is None else t for t in raw_types)
    unknown = [t for t in types if t not in _TYPES]
    if not types or unknown:
        raise ConfigError(f"{where} has unknown types {unknown}; use {', '.join(_TYPES)}")
    description = node.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ConfigError(f"{where} needs a one-line 'description:'")
    if "\n" in description.strip():
        raise ConfigError(f"{where} has a description over several lines; make it one")
    choices = node.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where} needs 'choices:' to be a non-empty list")
        bad = [c for c in choices if not any(_TYPES[t][0](c) for t in types)]
        if bad:
            raise ConfigError(f"{where} has choices {bad} that are not {' or '.join(types)}")
        choices = tuple(choices)
    minimum = node.get("min")
    if minimum is not None and not _is_number(minimum):
        raise ConfigError(f"{where} needs 'min:' to be a number")
    return _Spec(types, description.strip(), choices, minimum)


def _leaves(schema: Schema, prefix: Key = ()) -> list[str]:
    keys = []
    for key, node in schema.items():
        path = (*prefix, key)
        keys.extend([_dotted(path)] if isinstance(node, _Spec) else _leaves(node, path))
    return keys


def _combine_schemas(packages: Iterable[_Package]) -> Schema:
    combined: Schema = {}
    owners: dict[str, str] = {}
    for package in packages:
        _graft(combined, package.schema, (), package.name, owners)
    return combined


def _graft(into: Schema, tree: Schema, prefix: Key, owner: str, owners: dict[str, str]) -> None:
    for key, node in tree.items():
        path = (*prefix, key)
        dotted = _dotted(path)
        existing = into.get(key)
        if isinstance(node, _Spec) or isinstance(existing, _Spec):
            if existing is not None:
                raise ConfigError(
                    f"config key {dotted!r} is defined by both {owners[dotted]} and {owner}; "
                    "each key belongs to one package: rename one of them"
                )
            into[key] = node
            owners[dotted] = owner
            continue
        if existing is None:
            existing = into[key] = {}
            owners[dotted] = owner
        _graft(existing, node, path, owner, owners)


# --- values and messages ------------------------------------------------------------


def _canonical(name: str) -> str:
    return name.replace("_", "-")


def _dotted(path: Key) -> str:
    return ".".join(path)


def _split_key(key: str) -> Key:
    if not isinstance(key, str):
        raise TypeError(f"config keys are strings such as 'serialize.compression', not {key!r}")
    path = tuple(_canonical(key).split("."))
    if not all(path):
        raise ConfigError(
            f"{key!r} is not a config key: write names joined by '.', e.g. 'serialize.compression'"
        )
    return path


def _nest(path: Key, value: Any) -> dict[str, Any]:
    for part in reversed(path[1:]):
        value = {part: value}
    return {path[0]: value}


def _copy_value(value: Any) -> Any:
    # Lists and dicts are copied so that the caller (or a later get()) mutating one
    # cannot change what the layers hold.
    if isinstance(value, (list, tuple)):
        return [_copy_value(item) for item in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but a config value of true is not the choice 1.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _render_value(value: Any) -> str:
    """Render one value as inline YAML, e.g. ``spawn``, ``null``, ``[a, b]``."""
    try:
        text = yaml.safe_dump(
            [value], default_flow_style=True, width=float("inf"), allow_unicode=True
        ).strip()
    except yaml.YAMLError:
        return repr(value)
    if "\n" in text:
        # Multi-line strings: YAML would fold them over lines; JSON is valid YAML.
        return json.dumps(value, ensure_ascii=False)
    return text[1:-1]


def _suggest(dotted: str, candidates: list[str]) -> list[str]:
    import difflib

    last = dotted.rsplit(".", 1)[-1]
    found = difflib.get_close_matches(dotted, candidates, n=3, cutoff=0.6)
    found += [c for c in candidates if c.rsplit(".", 1)[-1] == last and c != dotted]
    return [c for c in dict.fromkeys(found) if c != dotted][:3]


def _did_you_mean(suggestions: list[str]) -> str:
    if not suggestions:
        return ""
    return " Did you mean " + " or ".join(repr(s) for s in suggestions) + "?"


@dataclass(frozen=True)
class _Source:
    """Where a layer came from, as shown by `sources` and in error messages."""

    label: str
    from_env: bool = False


_SET = _Source("set()")


class _Layer(NamedTuple):
    source: _Source
    data: Mapping[str, Any]


@dataclass(frozen=True)
class _Package:
    name: str
    source: _Source
    defaults: Mapping[str, Any]
    schema: Schema


def _check_value(path: Key, value: Any, spec: _Spec, source: _Source) -> None:
    what = f"config key {_dotted(path)!r} (from {source.label})"
    if not any(_TYPES[t][0](value) for t in spec.types):
        expected = " or ".join(_TYPES[t][1] for t in spec.types)
        message = f"{what} is {_show_value(value)} ({_type_name(value)}); expected {expected}"
        if source.from_env and isinstance(value, str):
            message += (
                "; environment values are read as Python literals, "
                "so write e.g. True, False, None, 4 or 'text'"
            )
        raise ConfigError(message)
    if spec.choices is not None and not any(_same(value, c) for c in spec.choices):
        allowed = ", ".join(_render_value(c) for c in spec.choices)
        raise ConfigError(f"{what} is {_show_value(value)}; choose one of: {allowed}")
    if spec.minimum is not None and _is_number(value) and value < spec.minimum:
        raise ConfigError(f"{what} is {value!r}; it must be at least {spec.minimum!r}")


def _unknown_key(path: Key, section: Schema, schema: Schema, source: _Source) -> ConfigError:
    dotted = _dotted(path)
    parent = _dotted(path[:-1])
    where = f"in section {parent!r}" if parent else "at the top level"
    return ConfigError(
        f"unknown config key {dotted!r} (from {source.label})."
        f"{_did_you_mean(_suggest(dotted, _leaves(schema)))}"
        f" Valid keys {where}: {', '.join(sorted(section))}"
    )


# --- merging ------------------------------------------------------------------------


def _subdict(target: dict[str, Any], key: str) -> dict[str, Any]:
    sub = target.get(key)
    if not isinstance(sub, dict):
        sub = target[key] = {}
    return sub


class _Merger:
    """Merge layers, lowest priority first, into a new nested dict, checking each value.

    Records the source of every value, and which top-level sections no package has
    registered (``unclaimed``; refused unless ``allow_unclaimed``).
    """

    def __init__(self, schema: Schema, *, allow_unclaimed: bool) -> None:
        self.schema = schema
        self.allow_unclaimed = allow_unclaimed
        self.config: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.unclaimed: dict[str, str] = {}

    def merge(self, data: Mapping[str, Any], source: _Source) -> None:
        self._section(self.config, data, self.schema, source, ())

    def _key(self, raw_key: Any, value: Any, source: _Source, prefix: Key) -> tuple[str, Any]:
        if not isinstance(raw_key, str) or not raw_key:
            where = f"in section {_dotted(prefix)!r}" if prefix else "at the top level"
            raise ConfigError(
                f"config key {raw_key!r} {where} (from {source.label}) is not a name; "
                "keys are names such as 'num-workers'"
            )
        if "." in raw_key:  # {"a.b": v} means {"a": {"b": v}}
            raw_key, _, rest = raw_key.partition(".")
            return self._key(raw_key, {rest: value}, source, prefix)
        return _canonical(raw_key), value

    def _section(
        self,
        target: dict[str, Any],
        data: Mapping[str, Any],
        schema: Schema,
        source: _Source,
        prefix: Key,
    ) -> None:
        for raw_key, raw_value in data.items():
            key, value = self._key(raw_key, raw_value, source, prefix)
            path = (*prefix, key)
            node = schema.get(key)
            if isinstance(node, _Spec):
                _check_value(path, value, node, source)
                target[key] = _copy_value(value)
                self.sources[_dotted(path)] = source.label
            elif node is not None:
                if value is None:  # a section whose keys are all commented out
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"config key {_dotted(path)!r} (from {source.label}) is a section, "
                        f"not a value like {_show_value(value)}; set one of its keys: "
                        + ", ".join(_dotted((*path, k)) for k in sorted(node))
                    )
                self._section(_subdict(target, key), value, node, source, path)
            elif self._may_claim_later(prefix, key, value):
                self.unclaimed.setdefault(key, source.label)
                self._free(_subdict(target, key), value or {}, source, path)
            else:
                raise _unknown_key(path, schema, self.schema, source)

    def _may_claim_later(self, prefix: Key, key: str, value: Any) -> bool:
        import difflib

        return (
            self.allow_unclaimed
            and not prefix
            and (value is None or isinstance(value, Mapping))
            and not difflib.get_close_matches(key, list(self.schema), n=1, cutoff=_TYPO_CUTOFF)
        )

    def _free(
        self, target: dict[str, Any], data: Mapping[str, Any], source: _Source, prefix: Key
    ) -> None:
        """Merge into a section no package has registered: no schema to check against."""
        for raw_key, raw_value in data.items():
            key, value = self._key(raw_key, raw_value, source, prefix)
            dotted = _dotted((*prefix, key))
            if isinstance(value, Mapping) and value:
                self.sources.pop(dotted, None)
                self._free(_subdict(target, key), value, source, (*prefix, key))
                continue
            if isinstance(target.get(key), dict):  # a value replacing a whole section
                for stale in [s for s in self.sources if s.startswith(dotted + ".")]:
                    del self.sources[stale]
            target[key] = _copy_value(value)
            self.sources[dotted] = source.label


class _Built(NamedTuple):
    config: dict[str, Any]
    sources: dict[str, str]  # dotted key of every value -> label of its source
    unclaimed: dict[str, str]  # unregistered top-level section -> its first source


def _build(
    schema: Schema,
    packages: Iterable[_Package],
    layers: Iterable[_Layer],
    overrides: Mapping[Key, Any],
) -> _Built:
    merger = _Merger(schema, allow_unclaimed=True)
    for package in packages:
        merger.merge(package.defaults, package.source)
    for layer in layers:
        merger.merge(layer.data, layer.source)
    for path, value in overrides.items():
        merger.merge(_nest(path, value), _SET)
    return _Built(merger.config, merger.sources, merger.unclaimed)


def _install(target: dict[str, Any], new: dict[str, Any]) -> None:
    # One assignment per top-level key, so concurrent readers see whole sections.
    for key in [k for k in target if k not in new]:
        del target[key]
    for key, value in new.items():
        if key not in target or target[key] != value:
            target[key] = value


# --- reading files and the environment ----------------------------------------------


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping."""


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (first at line {first + 1})",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# The same with libyaml's parser, when PyYAML was built with it: about ten times faster
# on our files. Every process (each worker too) reads the packages' defaults and
# schemas at start-up, so those are parsed with it; user files keep the pure-Python
# parser, whose error messages (line, column, context) ours quote.
_FastLoader: type | None = None
if hasattr(yaml, "CSafeLoader"):

    class _CLoader(yaml.CSafeLoader):
        """A CSafeLoader that refuses a key given twice in one mapping."""

    _CLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _FastLoader = _CLoader


def _load_yaml(text: str, fast: bool) -> Any:
    if fast and _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)  # a CSafeLoader
        except yaml.YAMLError:
            pass  # parse again below, to report the error as for any other file
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def _read_yaml(path: Path, what: str = "config file", *, fast: bool = False) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {what} {path}: {reason}") from exc
    try:
        data = _load_yaml(text, fast)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = ""
        if exc.context:
            start = exc.context_mark
            context = f" ({exc.context}" + (f" from line {start.line + 1})" if start else ")")
        raise ConfigError(
            f"{what} {path} is not valid YAML{where}: {exc.problem}{context}"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {path} must map keys to values at its top level "
            f"(e.g. 'scheduler: threads'), but holds a {_type_name(data)}"
        )
    return data


def _read_path(path: Path, via: str | None) -> list[_Layer]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        return []
    suffix = f" (via ${via})" if via else ""
    return [_Layer(_Source(f"{file}{suffix}"), _read_yaml(file)) for file in files]


def _parse_env_value(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _env_layers(environ: Mapping[str, str]) -> list[_Layer]:
    layers = []
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX) or name in _NOT_KEYS:
            continue
        parts = name[len(_ENV_PREFIX) :].split("__")
        if not all(parts):
            raise ConfigError(
                f"environment variable {name} does not name a config key; write "
                f"{_ENV_PREFIX}KEY or {_ENV_PREFIX}SECTION__KEY, e.g. "
                f"{_ENV_PREFIX}SERIALIZE__COMPRESSION=lz4"
            )
        path = tuple(_canonical(part.lower()) for part in parts)
        value = _parse_env_value(environ[name])
        layers.append(_Layer(_Source(f"${name}", from_env=True), _nest(path, value)))
    return layers


def _read_layers(paths: Paths | None, env: Mapping[str, str] | None) -> list[_Layer]:
    environ: Mapping[str, str] = os.environ if env is None else env
    if paths is None:
        search: Iterable[PathArg] = [Path(p).expanduser() for p in _SEARCH_PATH]
    elif isinstance(paths, (str, os.PathLike)):
        search = [paths]  # one path, not an iterable of characters
    else:
        search = paths
    layers: list[_Layer] = []
    for path in search:
        layers.extend(_read_path(Path(path), via=None))
    named = environ.get(_CONFIG_PATH_VAR)
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise ConfigError(
                f"${_CONFIG_PATH_VAR} is {named!r}, which does not exist; point it at a "
                "YAML file or a directory of them, or unset it"
            )
        layers.extend(_read_path(path, via=_CONFIG_PATH_VAR))
    layers.extend(_env_layers(environ))
    return layers


def _load_defaults(
    defaults: PathArg | Mapping[str, Any], name: str | None
) -> tuple[str, _Source, Mapping[str, Any]]:
    if isinstance(defaults, Mapping):
        if name is None:
            raise TypeError("register_defaults() needs name= when the defaults are a mapping")
        return name, _Source(f"default ({name})"), copy.deepcopy(dict(defaults))
    path = Path(defaults)
    return (
        name or str(path),
        _Source(f"default {path}"),
        _read_yaml(path, "defaults file", fast=True),
    )


def _load_schema(schema: PathArg | Mapping[str, Any], name: str) -> Schema:
    if isinstance(schema, Mapping):
        return _parse_schema(schema, f"({name})")
    path = Path(schema)
    return _parse_schema(_read_yaml(path, "schema file", fast=True), str(path))


# --- the store ----------------------------------------------------------------------


class ConfigStore:
    """One configuration: registered packages, loaded layers, overrides, merged dict.

    The process-wide store is what the module-level functions use; make another to
    work on a configuration in isolation (tests do). See the module docstring.

    Attributes
    ----------
    config : dict
        The merged configuration. Read it (or better, use `get`); do not change it:
        use `set`, which validates.
    """

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._packages: dict[str, _Package] = {}
        self._schema: Schema = {}
        self._layers: tuple[_Layer, ...] = ()
        self._overrides: dict[Key, Any] = {}
        self._built = _Built({}, {}, {})
        self._paths: dict[str, Key] = {}

    # Changing state. Every change goes through _rebuild, under the lock.

    def _rebuild(
        self,
        *,
        packages: dict[str, _Package] | None = None,
        layers: tuple[_Layer, ...] | None = None,
        overrides: dict[Key, Any] | None = None,
    ) -> None:
        with self._lock:
            if packages is None:
                packages, schema = self._packages, self._schema
            else:
                schema = _combine_schemas(packages.values())
            layers = self._layers if layers is None else layers
            overrides = self._overrides if overrides is None else overrides
            built = _build(schema, packages.values(), layers, overrides)
            # Nothing above changed self: an error leaves the configuration as it was.
            self._packages, self._schema = packages, schema
            self._layers, self._overrides = layers, overrides
            _install(self.config, built.config)
            self._built = built

    def register_defaults(
        self,
        defaults: PathArg | Mapping[str, Any],
        schema: PathArg | Mapping[str, Any],
        *,
        name: str | None = None,
    ) -> None:
        """Add a package's defaults and schema, and rebuild keeping every user value.

        See the module-level `register_defaults`.
        """
        name, source, data = _load_defaults(defaults, name)
        tree = _load_schema(schema, name)
        own = _Merger(tree, allow_unclaimed=False)
        own.merge(data, source)
        missing = [key for key in _leaves(tree) if key not in own.sources]
        if missing:
            raise ConfigError(
                f"the schema of {name} lists {', '.join(map(repr, missing))} but "
                f"{source.label} gives no value; add them to the defaults (null if none)"
            )
        with self._lock:
            packages = dict(self._packages)
            packages[name] = _Package(name, source, data, tree)
            self._rebuild(packages=packages)

    def refresh(self, paths: Paths | None = None, env: Mapping[str, str] | None = None) -> None:
        """Read the files and environment again, dropping `set` overrides.

        See the module-level `refresh`.
        """
        layers = tuple(_read_layers(paths, env))
        self._rebuild(layers=layers, overrides={})

    def collect(
        self, paths: Paths | None = None, env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Return the configuration the sources give, without installing it.

        See the module-level `collect`.
        """
        layers = _read_layers(paths, env)
        with self._lock:
            return _build(self._schema, self._packages.values(), layers, {}).config

    def set(self, arg: Mapping[str, Any] | None = None, /, **kwargs: Any) -> _Setter:
        """Override values now; as a context manager, undo that on exit.

        See the module-level `set`.
        """
        return _Setter(self, arg, kwargs)

    def _apply(self, updates: list[tuple[Key, Any]]) -> dict[Key, Any]:
        with self._lock:
            overrides = dict(self._overrides)
            previous: dict[Key, Any] = {}
            for path, value in updates:
                previous.setdefault(path, overrides.get(path, _MISSING))
                # Re-insert so the newest override of overlapping keys applies last.
                overrides.pop(path, None)
                overrides[path] = _copy_value(value)
            self._rebuild(overrides=overrides)
            return previous

    def _undo(self, previous: dict[Key, Any]) -> None:
        with self._lock:
            overrides = dict(self._overrides)
            for path, value in previous.items():
                if value is _MISSING:
                    overrides.pop(path, None)
                else:
                    overrides[path] = value
            self._rebuild(overrides=overrides)

    # Reading.

    def get(self, key: str, default: Any = _NO_DEFAULT, override_with: Any = None) -> Any:
        """Return the value at a dotted key. See the module-level `get`."""
        if override_with is not None:
            return override_with
        path = self._paths.get(key)
        if path is None:
            path = self._key_path(key)
        node: Any = self.config
        try:
            for part in path:
                node = node[part]
        except (KeyError, TypeError, IndexError):
            if default is not _NO_DEFAULT:
                return default
            raise self._missing(key) from None
        return node

    def _key_path(self, key: str) -> Key:
        path = _split_key(key)
        if len(self._paths) >= 4096:  # keys come from code, so this is only a backstop
            self._paths.clear()
        self._paths[key] = path
        return path

    def _missing(self, key: str) -> ConfigError:
        path = self._key_path(key)
        suggestions = _suggest(_dotted(path), list(self._built.sources))
        # List the keys of the deepest section the key does reach.
        section: dict[str, Any] = self.config
        depth = 0
        while depth < len(path) - 1 and isinstance(section.get(path[depth]), dict):
            section = section[path[depth]]
            depth += 1
        where = f"in section {_dotted(path[:depth])!r}" if depth else "at the top level"
        return ConfigError(
            f"no config key {key!r}.{_did_you_mean(suggestions)}"
            f" Valid keys {where}: {', '.join(sorted(section))}"
        )

    def sources(self, key: str) -> str:
        """Return where the value at ``key`` came from. See the module-level `sources`."""
        dotted = _dotted(self._key_path(key))
        label = self._built.sources.get(dotted)
        if label is not None:
            return label
        node = self.get(key)
        if isinstance(node, dict) and node:
            inside = [k for k in self._built.sources if k.startswith(dotted + ".")]
            raise ConfigError(
                f"{dotted!r} is a section; ask for the source of one of its keys: "
                + ", ".join(inside)
            )
        return "unknown: changed in the config dict directly, not with set()"

    def show(self, key: str | None = None) -> str:
        """Render the configuration as YAML with sources. See the module-level `show`."""
        built = self._built
        lines: list[str] = []
        if key is None:
            lines.append("# Each value is followed by the source it came from.")
            tree: dict[str, Any] = dict(self.config)  # a snapshot: install may run meanwhile
        else:
            path = self._key_path(key)
            tree = _nest(path, self.get(key))
        self._render(tree, (), lines, built)
        return "\n".join(lines) + "\n"

    def _render(self, node: dict[str, Any], prefix: Key, lines: list[str], built: _Built) -> None:
        pad = "  " * len(prefix)
        for key, value in node.items():
            path = (*prefix, key)
            if isinstance(value, dict) and value:
                note = ""
                if not prefix and key in built.unclaimed:
                    note = "  # not checked: no loaded package registers this section"
                lines.append(f"{pad}{_render_value(key)}:{note}")
                self._render(value, path, lines, built)
            else:
                label = built.sources.get(_dotted(path), "source unknown")
                lines.append(f"{pad}{_render_value(key)}: {_render_value(value)}  # {label}")

    def validate(
        self,
        cfg: Mapping[str, Any] | None = None,
        *,
        source: str = "validate()",
        allow_unclaimed: bool = False,
    ) -> None:
        """Check a mapping, or the whole configuration. See the module-level `validate`."""
        if cfg is not None:
            merger = _Merger(self._schema, allow_unclaimed=allow_unclaimed)
            merger.merge(cfg, _Source(source))
            return
        unclaimed = self._built.unclaimed
        if unclaimed and not allow_unclaimed:
            sections = ", ".join(f"{name!r} (from {label})" for name, label in unclaimed.items())
            raise ConfigError(
                f"config sections that no loaded package registers: {sections}. "
                f"Valid top-level keys: {', '.join(sorted(self._schema))}"
            )


class _Setter:
    """Overrides applied on creation and undone when a ``with`` block ends."""

    def __init__(
        self, store: ConfigStore, arg: Mapping[str, Any] | None, kwargs: Mapping[str, Any]
    ) -> None:
        updates: list[tuple[Key, Any]] = []
        if arg is not None:
            if not isinstance(arg, Mapping):
                raise TypeError(
                    f"set() takes a mapping of dotted keys to values, not {_type_name(arg)}"
                )
            updates += [(_split_key(key), value) for key, value in arg.items()]
        updates += [(_split_key(key.replace("__", ".")), value) for key, value in kwargs.items()]
        self._store = store
        self._previous = store._apply(updates)
        self._undone = False

    def __enter__(self) -> _Setter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._undone:
            self._undone = True
            self._store._undo(self._previous)


# --- the process-wide store ---------------------------------------------------------

_STORE = ConfigStore()

#: The merged configuration of this process (read-only: change it with `set`).
config: dict[str, Any] = _STORE.config


def register_defaults(
    defaults: PathArg | Mapping[str, Any],
    schema: PathArg | Mapping[str, Any],
    *,
    name: str | None = None,
) -> None:
    """Add a package's default values and their schema to the configuration.

    The configuration is rebuilt keeping every user file, environment variable and
    `set` override, which are now checked against the new keys too (a user section
    held until now as unclaimed is validated here). Registering the same ``name``
    again replaces the earlier registration.

    Parameters
    ----------
    defaults
        A YAML file (or a mapping) giving every key of ``schema`` a value. A package
        should put its keys under top-level sections of its own, e.g. ``launchers:``.
    schema
        A YAML file (or a mapping) giving each key ``type:``, ``description:`` and
        optionally ``choices:`` and ``min:``; see ``runtime/runtime-schema.yaml``.
    name
        Identifies the registration; defaults to the path of ``defaults``, and is
        required when ``defaults`` is a mapping.

    Raises
    ------
    ConfigError
        The defaults and schema disagree, a key is already defined by another
        package, or a user's value for the new keys is invalid.

    Examples
    --------
    >>> register_defaults(here / "launchers.yaml", here / "launchers-schema.yaml")  # doctest: +SKIP
    """
    _STORE.register_defaults(defaults, schema, name=name)


def refresh(paths: Paths | None = None, env: Mapping[str, str] | None = None) -> None:
    """Read the config files and environment variables again and install the result.

    Values made with `set` are dropped; package defaults stay.

    Parameters
    ----------
    paths
        A file or directory of ``*.yaml`` files, or several, lowest priority first;
        by default ``/etc/hpc`` then ``~/.config/hpc``. Missing ones are skipped.
    env
        The environment to read ``HPC_CONFIG`` and ``HPC_*`` variables from; by
        default ``os.environ``.

    Raises
    ------
    ConfigError
        A file is unreadable or malformed, or a key or value is invalid. The
        configuration is left as it was.
    """
    _STORE.refresh(paths, env)


def collect(paths: Paths | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return the configuration that package defaults, files and environment give.

    Nothing is installed: `config` and `get` are unchanged. Arguments are as for
    `refresh`.

    Raises
    ------
    ConfigError
        As `refresh`.
    """
    return _STORE.collect(paths, env)


def get(key: str, default: Any = _NO_DEFAULT, override_with: Any = None) -> Any:
    """Return the configuration value at a dotted key.

    Cheap enough for hot paths: a walk down nested dicts, nothing copied. A section
    comes back as the dict itself: read it, do not change it.

    Parameters
    ----------
    key
        Names joined by ``.``, e.g. ``"serialize.compression"``; ``_`` and ``-`` are
        interchangeable.
    default
        Returned when the key does not exist. Without it, a missing key is an error.
    override_with
        If not None, returned as is: lets callers write
        ``get("num-workers", override_with=num_workers)`` for an optional argument.

    Raises
    ------
    ConfigError
        The key does not exist and there is no ``default``; the message names the
        closest valid keys.

    Examples
    --------
    >>> get("multiprocessing.context") in ("spawn", "fork", "forkserver")
    True
    >>> get("no.such.key", default=3)
    3
    """
    return _STORE.get(key, default, override_with)


def sources(key: str) -> str:
    """Return where the current value at ``key`` came from.

    Returns
    -------
    str
        ``default <path>`` for a package default, the path of a user file (with
        ``(via $HPC_CONFIG)`` when found through it), ``$HPC_...`` for an environment
        variable, or ``set()``.

    Raises
    ------
    ConfigError
        The key does not exist, or is a section (ask for one of its keys).
    """
    return _STORE.sources(key)


def show(key: str | None = None) -> str:
    """Render the configuration as YAML, each value followed by its source as a comment.

    Parameters
    ----------
    key
        Render only this section or value.

    Examples
    --------
    >>> print(show("multiprocessing"))  # doctest: +SKIP
    multiprocessing:
      context: spawn  # default /.../runtime/runtime.yaml
    """
    return _STORE.show(key)


def validate(
    cfg: Mapping[str, Any] | None = None,
    *,
    source: str = "validate()",
    allow_unclaimed: bool = False,
) -> None:
    """Check configuration against the registered schema.

    Parameters
    ----------
    cfg
        A nested mapping as a config file would hold; by default, check that the
        installed configuration has no section that no loaded package registers (call
        this once every package is imported).
    source
        Names ``cfg`` in error messages.
    allow_unclaimed
        Accept top-level sections that no package has registered.

    Raises
    ------
    ConfigError
        Naming the key, the source, the value and what is allowed.
    """
    _STORE.validate(cfg, source=source, allow_unclaimed=allow_unclaimed)


class set(_Setter):  # shadows the builtin on purpose: the name dask users know
    """Override configuration values, for good or for a ``with`` block.

    Called plainly, the values stay until changed again (or `refresh`). Used as a
    context manager, every key it set is put back on exit to what it was before,
    including removing keys that did not exist. Overrides are process-wide, not
    per-thread.

    Parameters
    ----------
    arg
        A mapping of dotted keys to values: ``{"serialize.compression": "zlib"}``.
    **kwargs
        Keys with ``__`` for nesting: ``multiprocessing__context="fork"``.

    Raises
    ------
    ConfigError
        A key is unknown or a value invalid; nothing is changed.

    Examples
    --------
    >>> with set(scheduler="sync"):
    ...     get("scheduler")
    'sync'
    >>> with set({"serialize.compression": "zlib"}, multiprocessing__context="fork"):
    ...     get("serialize.compression"), get("multiprocessing.context")
    ('zlib', 'fork')
    """

    def __init__(self, arg: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        super().__init__(_STORE, arg, kwargs)


_HERE = Path(__file__).parent
register_defaults(_HERE / "runtime.yaml", _HERE / "runtime-schema.yaml", name="runtime")
refresh()
