"""Typed settings: one dataclass per stage is at once its recipe section, its CLI flags and its input.

`from_mapping(cls, data, key)` builds a dataclass from a recipe mapping and checks every key and value; errors name
the dotted key (`distill.learning_rate: expected a number, got 'fast'`). `add_flags(parser, cls, section)` makes one
flag per field (help from `metadata["help"]`, choices from `Literal[...]`) whose value goes through the very same
checks (`given(args, section)` collects them), so `--tokens 100M` and `tokens: 100M` mean one thing, with one default.
Counts accept suffixes (`100M`, `94B`, `8T`) or scientific notation (`2e12`); lists accept `1,2,3` or `[1, 2, 3]`;
counts that cannot be zero (`AT_LEAST`: batch sizes, sequence lengths, ...) are refused below their bound. Every YAML
a recipe, an override or a flag holds is read by `load_yaml`, which refuses aliases (no alias bomb) and huge input.
"""

from __future__ import annotations

import argparse
import enum
import functools
import re
import types
import typing
from dataclasses import MISSING, Field, fields, is_dataclass


class SettingError(ValueError):
    """A bad setting, named by its dotted recipe key or its flag."""


MAX_YAML_CHARS = 1 << 20  # a recipe is a few kB; anything near this is not one


YAML11_BOOLS = {"yes": True, "no": False, "on": True, "off": False}


@functools.lru_cache(maxsize=1)
def _yaml12_resolvers() -> dict:
    """SafeLoader's implicit resolvers with YAML 1.2's numbers and booleans instead of 1.1's: `1:1` (an is_layers
    pair) stays the string it is, not the base-60 integer 61, and `off` (is_layers' word for none) stays a word, not
    False; bool settings still take yes/no/on/off (`coerce`)."""
    import yaml

    int_tag, float_tag, bool_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
    resolvers = {first: [(tag, rx) for tag, rx in entries if tag not in (int_tag, float_tag, bool_tag)]
                 for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "tTfF":
        resolvers.setdefault(first, []).append((bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")))
    numbers = ((int_tag, r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
               (float_tag, r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"))
    for tag, pattern in numbers:
        for first in "-+0123456789.":
            resolvers.setdefault(first, []).append((tag, re.compile(pattern)))
    return resolvers


def load_yaml(text: str, what: str):
    """YAML of a recipe, an override or a flag value, bounded: no aliases (`*name`, which an alias bomb nests to
    billions of nodes that later hang whatever walks the result) and at most MAX_YAML_CHARS characters."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise SettingError(f"{what}: YAML aliases (*name) are not accepted (line {mark.line + 1})")
            return super().compose_node(parent, index)

    NoAliases.yaml_implicit_resolvers = _yaml12_resolvers()
    if len(text) > MAX_YAML_CHARS:
        raise SettingError(f"{what}: {len(text):,} characters of YAML, more than the {MAX_YAML_CHARS:,} accepted")
    try:
        return yaml.load(text, Loader=NoAliases)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SettingError(f"{what} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None


# integer settings that count things, wherever a config has them (ours, TRL's, the Trainer's): 0 or less fails
# late, deep in a loop ("range() arg 3 must not be zero", a division by zero); a field's metadata "min" overrides
AT_LEAST = {name: 1 for name in ("samples", "seq_len", "eval_seq_len", "max_length", "batch_size", "eval_windows",
                                 "per_device_train_batch_size", "per_device_eval_batch_size", "kd_chunk_tokens",
                                 "gradient_accumulation_steps", "lora_r", "limit", "global_batch_tokens",
                                 "distill_tokens", "scratch_tokens")}
AT_LEAST.update({name: 0 for name in ("windows", "depth_ppl_samples", "head_ablation_samples")})


def check_bounds(f: Field, value, key: str):
    """`value` (already coerced) against the field's lower bound, when it has one; None always passes."""
    low = f.metadata.get("min", AT_LEAST.get(f.name))
    if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
        raise SettingError(f"{key}: must be at least {low}, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type of a TCP port: 1..65535, or an error naming the value."""
    import argparse

    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number in 1..65535")
    return int(text)


def writable_folder(text: str) -> str:
    """argparse type of an output folder: `utils.check_writable` at parse time, before any work."""
    return _writable(text, True)


def writable_file(text: str) -> str:
    """argparse type of an output file (see `writable_folder`)."""
    return _writable(text, False)


def _writable(text: str, folder: bool) -> str:
    import argparse

    from .utils import check_writable

    try:
        check_writable(text, folder)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def folder_name(value: str, key: str) -> str:
    """A name that is used as one folder: letters, digits, . _ - (no separator, not hidden, not empty, not '..')."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise SettingError(f"{key}: {value!r} must be a folder name (letters, digits, . _ -, not starting with . - _)")
    return value


_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value, key: str = "value") -> int:
    """100M, 1.5B, 8T, 2e12, 1_000 -> int; a one-line error naming `key` otherwise."""
    if isinstance(value, bool):
        raise SettingError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?[0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", value)
        if m:
            number = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)
            if number.is_integer():
                return int(number)
    raise SettingError(f"{key}: expected an integer (e.g. 512, 100M, 94B, 2e12), got {value!r}")


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _without_none(tp) -> list:
    """The kinds an annotation accepts besides None (`int | None` -> [int])."""
    return [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]


def coerce(tp, value, key: str):
    """`value` checked (and converted where unambiguous) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and _is_optional(tp):
            return None
        errors = []
        for arg in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return coerce(arg, value, key)
            except SettingError as e:
                errors.append(str(e))
        raise SettingError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is none of the accepted kinds")
    if value is None:
        raise SettingError(f"{key}: a value is required")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise SettingError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list or tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SettingError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [coerce(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SettingError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        text_field = getattr(tp, "from_string", None)
        if isinstance(value, str) and text_field:
            return text_field(value)
        return from_mapping(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed and not isinstance(value, tp):
            raise SettingError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:  # YAML 1.1's words, which load_yaml keeps
            return YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise SettingError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        return parse_count(value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SettingError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise SettingError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise SettingError(f"{key}: expected a string, got {value!r}")
        return value
    return value  # a library type we do not model (e.g. a trainer's callable): the library checks it


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def settable(cls, exclude=()) -> dict[str, Field]:
    """The fields of `cls` a recipe or a flag may set (init fields, not private, not excluded)."""
    return {f.name: f for f in fields(cls) if f.init and not f.name.startswith("_") and f.name not in exclude}


def check_mapping(cls, data, key: str = "", exclude=()) -> dict:
    """The given keys of `data`, each checked against `cls`'s field of that name; nothing else filled in."""
    where = key or "recipe"
    if not isinstance(data, dict):
        raise SettingError(f"{where}: expected a mapping, got {data!r}")
    known, hints = settable(cls, exclude), _hints(cls)
    unknown = [k for k in data if k not in known]
    if unknown:
        listed = ", ".join(list(known)[:40]) + (", ..." if len(known) > 40 else "")
        raise SettingError(f"unknown key {(key + '.' if key else '') + str(unknown[0])!r}; {where} accepts: {listed}")
    return {name: check_bounds(known[name], coerce(hints[name], value, f"{key}.{name}" if key else name),
                               f"{key}.{name}" if key else name) for name, value in data.items()}


def from_mapping(cls, data, key: str = "", exclude=()):
    """A dataclass instance from a mapping, checking every key and value type; errors name the dotted key."""
    values = check_mapping(cls, data, key, exclude)
    for name, f in settable(cls, exclude).items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise SettingError(f"{key + '.' if key else ''}{name}: missing (required)")
    return cls(**values)


# ---- command-line flags generated from the same fields -------------------------------------------------------


def default_of(f: Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _flag(name: str, prefix: str) -> str:
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def _takes_text(tp) -> bool:
    """Fields whose flag value is kept as typed (a string), not read as YAML."""
    args = _without_none(tp)
    return len(args) == 1 and (args[0] is str or typing.get_origin(args[0]) is typing.Literal)


def _show(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_flags(parser, cls, section: str, *, prefix: str = "", rename: dict | None = None, exclude=(),
              required=(), title: str | None = None) -> None:
    """One flag per settable field of `cls` (`--prefix-field-name`, or the full flag `rename` gives); parsed
    values land in `args` under `section.field` (see `given`). Fields marked `build_only` have no flag."""
    group = parser.add_argument_group(title) if title else parser
    hints, rename = _hints(cls), rename or {}
    for name, f in settable(cls, exclude).items():
        if f.metadata.get("build_only"):
            continue
        tp = hints[name]
        flag = rename[name] if name in rename else _flag(name, prefix)
        help_text = str(f.metadata.get("help", "")).replace("%", "%%").strip()
        kwargs = {"dest": f"{section}.{name}", "default": argparse.SUPPRESS}
        parser.set_defaults(**{f"_flag.{section}.{name}": flag})  # for errors that name the flag
        if name in required:
            kwargs["required"] = True
        else:
            help_text += f" (default: {f.metadata.get('default_text') or _show(default_of(f))})"
        base = _without_none(tp)
        if base == [bool]:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, **kwargs)
            continue
        choices = f.metadata.get("choices")
        if typing.get_origin(base[0]) is typing.Literal and len(base) == 1:
            choices = list(typing.get_args(base[0]))
        meta = "N" if base[0] in (int, float) else name.split("_")[-1].upper()
        group.add_argument(flag, help=help_text, choices=choices, metavar=None if choices else meta, **kwargs)


def given(args: argparse.Namespace, section: str, cls=None) -> dict:
    """The flags of `section` that were given on the command line, as a recipe-style mapping (values as typed,
    read as YAML where the field is not plain text), checked against `cls` when given."""
    prefix = section + "."
    raw = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    if cls is None:
        return raw
    hints, known, values = _hints(cls), settable(cls), {}
    for name, value in raw.items():
        flag = getattr(args, f"_flag.{section}.{name}", name)
        if isinstance(value, str) and not _takes_text(hints[name]):
            try:
                value = load_yaml(value, flag)
            except SettingError:  # not YAML: kept as typed (a string cannot expand), `coerce` judges it
                pass
        values[name] = check_bounds(known[name], coerce(hints[name], value, flag), flag)
    return values


# ---- `key.sub=value` overrides of a raw mapping (a recipe's, before it is checked) -----------------------


def typed_overrides(cls, assignments, key: str, raw: dict | None = None) -> dict:
    """`raw` with each `key=value` assignment applied as a recipe override is (`apply_override`), checked and typed
    against `cls`'s fields (`check_mapping`): the settings a script's KEY=VALUE flags give (6e-4 a float, 1:1 a
    string)."""
    raw = dict(raw or {})
    for assignment in assignments:
        apply_override(raw, assignment)
    return check_mapping(cls, raw, key)


def apply_override(raw: dict, assignment: str) -> None:
    """Set `a.b.c=value` in the raw recipe mapping; the value is read as YAML (`true`, `3`, `[1, 2]`, `100M`)."""
    dotted, sep, text = assignment.partition("=")
    if not sep or not dotted.strip():
        raise SettingError(f"override {assignment!r} is not key.sub=value")
    parts = dotted.strip().split(".")
    value = load_yaml(text, f"override {dotted.strip()}={text!r}") if text.strip() else None
    node = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise SettingError(f"override {dotted}: {here} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        i = int(part)
        if not -len(items) <= i < len(items):
            raise SettingError(f"override {key}: index {i} out of range (0..{len(items) - 1})")
        return i
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [str(item.get("name")) for item in items if isinstance(item, dict)]
    raise SettingError(f"override {key}: no entry named {part!r}; names: {', '.join(names)}")
