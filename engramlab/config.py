"""Options declared once: a dataclass field carries its help, its range or choices, and its flag.

    @dataclass
    class NeuronConfig:
        steps: int = option(20, "Integrated-gradients steps m.", range=(1, None))
        baseline: str = option("zero", "IG baseline.", choices=("zero", "mean"))

        def __post_init__(self):
            validate(self)

``validate`` checks every declared field and raises one ``EngramError`` line that names the
field, its command-line flag and what is allowed::

    NeuronConfig.steps=0 (--steps): must be >= 1

Ranges are closed unless ``open_low`` / ``open_high`` is set (``lr`` must be > 0, ``beta`` < 1).
``declared_options(cls)`` lists the declarations, so tests can generate a bad value for every
option. The declaration is the only one: the rest is made from it.

* ``to_dict`` / ``from_dict``: a config as JSON data and back (unknown keys warn: old run
  directories still load).
* ``settings(cls)``: every leaf field, nested configs flattened to dotted paths
  (``cluster.quantile``), each able to ``coerce`` a value from a file or ``--set`` to its type.
* ``load_config(cls, path)``: a config from a YAML / TOML / JSON file; an unknown key or a bad
  value is one line naming the file and the key.
* ``cli_params(cls)``: the command-line flags of a config (name, default, help with the choices),
  which ``engramlab.cli.common.configured`` turns into the options of a verb.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from engramlab.errors import EngramError

_KEY = "engramlab.option"


@dataclass(frozen=True)
class Option:
    """What is declared about one config field."""

    name: str
    help: str
    range: tuple[float | None, float | None] | None = None
    choices: tuple | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False  # None is allowed (means "automatic" / "off")
    flag: str | None = None
    integer: bool = False
    many: bool = False  # a list of choices

    @property
    def cli_flag(self) -> str:
        """The flag that sets the field (for a ``--x/--y`` switch, ``--x``)."""
        return (self.flag or "--" + self.name.replace("_", "-")).split("/")[0]

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None when it is."""
        if value is None:
            return None if self.optional else "must be given"
        if self.choices is not None:
            items = list(value) if self.many and isinstance(value, (list, tuple)) else [value]
            if not items or any(v not in self.choices for v in items):
                return f"choose {'from' if self.many else 'one of'} {', '.join(map(str, self.choices))}"
            return None
        if self.range is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if self.integer and not isinstance(value, int):
            return "must be a whole number"
        if isinstance(value, float) and math.isnan(value):
            return "must be a number, not nan"
        lo, hi = self.range
        if lo is not None and (value <= lo if self.open_low else value < lo):
            return f"must be {'>' if self.open_low else '>='} {lo}"
        if hi is not None and (value >= hi if self.open_high else value > hi):
            return f"must be {'<' if self.open_high else '<='} {hi}"
        return None

    def bad_value(self) -> Any:
        """A value this declaration refuses (for generated tests); None when every value is allowed."""
        if self.choices is None and self.range is None:
            return None
        if self.choices is not None:
            return ["no-such-choice"] if self.many else "no-such-choice"
        lo, hi = self.range
        if lo is not None:
            return lo if self.open_low else (lo - 1 if self.integer else lo - 0.5)
        return hi if self.open_high else (hi + 1 if self.integer else hi + 0.5)


def option(default: Any, help: str = "", *, range: tuple | None = None, choices: Iterable | None = None,
           open_low: bool = False, open_high: bool = False, optional: bool = False, flag: str | None = None,
           integer: bool | None = None, many: bool = False, default_factory=None) -> Any:
    """A ``dataclasses.field`` that records the option's help, range or choices and flag."""
    meta = {_KEY: dict(help=help, range=tuple(range) if range is not None else None,
                       choices=tuple(choices) if choices is not None else None, open_low=open_low,
                       open_high=open_high, optional=optional or default is None, flag=flag,
                       integer=isinstance(default, int) and not isinstance(default, bool)
                       if integer is None else integer, many=many)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared_options(cls_or_obj) -> list[Option]:
    """The declared options of a config dataclass, in field order."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        meta = f.metadata.get(_KEY)
        if meta is not None:
            out.append(Option(name=f.name, **meta))
    return out


def validate(cfg) -> None:
    """Raise ``EngramError`` for the first declared field of ``cfg`` whose value is not allowed."""
    for opt in declared_options(cfg):
        value = getattr(cfg, opt.name)
        why = opt.problem(value)
        if why:
            raise EngramError(f"{type(cfg).__name__}.{opt.name}={value!r} ({opt.cli_flag}): {why}")


def check(cfg, name: str, ok: bool, why: str) -> None:
    """A rule between fields (e.g. t_low < t_high), reported in ``validate``'s format."""
    if not ok:
        opt = next((o for o in declared_options(cfg) if o.name == name), None)
        flag = f" ({opt.cli_flag})" if opt else ""
        raise EngramError(f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r}{flag}: {why}")


# -- configs as plain data -------------------------------------------------------------------------
def to_dict(cfg) -> dict:
    """The fields of a config dataclass as JSON-ready data (nested configs as dicts, tuples as lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_dict(cls, data: dict, *, source: str = "config", ignore: Iterable[str] = ()):
    """Build ``cls`` from ``data`` (what ``to_dict`` wrote), validating as construction does.

    Keys ``cls`` does not know are dropped with one warning naming them (an old run directory or a
    config file from another version still loads, as tuned-lens's ``from_dict`` does); keys in
    ``ignore`` are dropped silently. Nested config dataclasses are rebuilt from their dicts, lists
    become tuples where the field holds a tuple."""
    import logging
    import typing

    if not isinstance(data, dict):
        raise EngramError(f"{source}: expected a mapping of {cls.__name__} settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names and k not in set(ignore)]
    if unknown:
        logging.getLogger("engramlab").warning(
            f"{source}: ignoring unknown {cls.__name__} setting(s) {', '.join(map(str, unknown))}")
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, source=f"{source}: {key}")
        elif isinstance(value, list) and _holds_tuple(names[key], hint):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a required field missing
        raise EngramError(f"{source}: cannot build {cls.__name__}: {e}") from None


def _holds_tuple(f: dataclasses.Field, hint) -> bool:
    import typing

    if f.default is not dataclasses.MISSING and isinstance(f.default, tuple):
        return True
    origin = typing.get_origin(hint)
    return origin is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


# -- every leaf setting of a config, for files, --set and the command line ---------------------------------
@dataclass(frozen=True)
class Setting:
    """One leaf field of a config tree. ``path`` is dotted below nested configs (``cluster.quantile``)
    and below a command's extra sections (``evolvability.n_new``)."""

    path: str
    owner: type             # the dataclass that holds the field
    kind: type              # bool | int | float | str | tuple | dict | object
    default: Any
    optional: bool = False  # None is a value
    item: type = str        # element type of a tuple
    option: Option | None = None  # None: a plain field (settable from a file or --set, never a flag)

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def flag(self) -> str | None:
        return self.option.cli_flag if self.option else None

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from a YAML/TOML file, --set, or a flag) as this field's type, or a one-line error.
        Numbers are widened (1 -> 1.0 for a float), a string of digits is read as a number and a
        comma-separated string as a tuple, since YAML and --set cannot always say what they mean."""
        if value is None or (self.optional and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        bad = f"{where}: {self.path}={value!r}"
        if isinstance(value, Path):
            value = str(value)
        if self.kind is bool:
            if isinstance(value, str) and value.lower() in _TRUTH:
                return _TRUTH[value.lower()]
            if not isinstance(value, bool):
                raise EngramError(f"{bad}: must be true or false")
            return value
        if self.kind in (int, float):
            if isinstance(value, str):
                try:
                    value = float(value) if self.kind is float else int(value)
                except ValueError:
                    pass
            if isinstance(value, float) and self.kind is int and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int
                                                                                and isinstance(value, float)):
                raise EngramError(f"{bad}: must be {'a whole number' if self.kind is int else 'a number'}")
            return self.kind(value)
        if self.kind is str:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise EngramError(f"{bad}: must be a string")
            return str(value)
        if self.kind is tuple:
            if isinstance(value, str) and self.option is not None and not self.option.many:
                return value  # the field's own mini-language ("A:B"), which the config parses
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise EngramError(f"{bad}: must be a list (or a comma-separated string)")
            one = Setting(self.path, self.owner, self.item, None)
            return tuple(one.coerce(v, where) for v in items)
        if self.kind is dict and not isinstance(value, dict):
            raise EngramError(f"{bad}: must be a mapping")
        return value

    def check(self, value: Any, where: str) -> Any:
        """``coerce`` and then the declaration's range / choices, naming ``where`` the value came from."""
        value = self.coerce(value, where)
        why = self.option.problem(value) if self.option else None
        if why:
            raise EngramError(f"{where}: {self.path}={value!r}{f' ({self.flag})' if self.flag else ''}: {why}")
        return value


_TRUTH = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _field_type(hint) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of a field's annotation."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else object), len(args) < len(typing.get_args(hint))
    return hint, False


def settings(cls, prefix: str = "") -> list[Setting]:
    """Every leaf setting of config dataclass ``cls`` in field order; nested configs are flattened
    with dotted paths (``DKNConfig`` -> ``..., cluster.quantile, ...``)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint, optional = _field_type(hints.get(f.name, object))
        path = prefix + f.name
        if dataclasses.is_dataclass(hint):
            out += settings(hint, path + ".")
            continue
        meta = f.metadata.get(_KEY)
        opt = Option(name=f.name, **meta) if meta is not None else None
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        origin = typing.get_origin(hint) or hint
        kind = {tuple: tuple, list: tuple, dict: dict}.get(origin, hint if hint in (bool, int, float, str) else object)
        item = next((a for a in typing.get_args(hint) if a is not Ellipsis), str) if kind is tuple else str
        out.append(Setting(path, cls, kind, default, optional or (opt is not None and opt.optional), item, opt))
    return out


def flatten_settings(data: dict, known: dict[str, Setting], source: str, *, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a settings mapping that may nest (``cluster: {quantile: 0.8}``) or use
    dotted keys (``cluster.quantile: 0.8``); each value checked against its field. A key no field
    has is a one-line error naming ``source`` and the key, with the nearest known names."""
    import difflib

    out: dict[str, Any] = {}
    for key, value in data.items():
        path = prefix + str(key)
        if path in known:
            out[path] = known[path].check(value, source)
        elif isinstance(value, dict) and any(p.startswith(path + ".") for p in known):
            out.update(flatten_settings(value, known, source, prefix=path + "."))
        else:
            near = difflib.get_close_matches(path, list(known), n=3) or \
                [p for p in known if p.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]]
            hint = f"; did you mean {' or '.join(near)}?" if near else "; see the command's --help"
            raise EngramError(f"{source}: unknown setting {path!r}{hint}")
    return out


def read_settings_file(path: str | Path) -> dict:
    """The mapping in a ``.yaml`` / ``.yml``, ``.toml`` or ``.json`` file (one-line errors)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise EngramError(f"{path}: no such config file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise EngramError(f"{path}: a config file is .yaml, .yml, .toml or .json")
    except EngramError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngramError(f"{path}: not valid {suffix.lstrip('.').upper()} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EngramError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    return data


def build(cls, values: dict[str, Any], prefix: str = ""):
    """``cls`` built from {dotted path: value}; nested configs from their paths, the rest defaults."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        hint, _ = _field_type(hints.get(f.name, object))
        if dataclasses.is_dataclass(hint):
            if any(p.startswith(path + ".") for p in values):
                kwargs[f.name] = build(hint, values, path + ".")
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def load_config(cls, path: str | Path, **overrides):
    """A ``cls`` from a YAML / TOML / JSON file of its settings (nested configs as nested mappings
    or dotted keys), ``overrides`` ({dotted path: value}) on top. An unknown key or a bad value is
    one ``EngramError`` line naming the file and the key::

        load_config(DKNConfig, "dkn.yaml")   # steps: 10 / cluster: {quantile: 0.8}
    """
    known = {s.path: s for s in settings(cls)}
    values = flatten_settings(read_settings_file(path), known, str(path))
    values.update(overrides)
    return build(cls, values)


# -- command-line parameters made from the fields ---------------------------------------------------------
@dataclass(frozen=True)
class CliParam:
    """One command-line flag generated from a declared field (what a CLI library needs to make it)."""

    setting: Setting
    name: str                # the parameter's identifier: the dotted path with "__"
    decl: str                # "--steps", or "--fold-norm/--no-fold-norm" for a switch
    annotation: Any          # int | float | str | bool | Optional[...] (a tuple field is a comma-separated str)
    default: Any             # the field's default (a tuple joined with commas)
    help: str

    def value(self, raw: Any) -> Any:
        """The field's value of what the flag parsed (a comma-separated string -> tuple)."""
        return self.setting.coerce(raw, self.decl.split("/")[0])


def _help(opt: Option) -> str:
    import re

    text = opt.help.strip()
    if opt.choices and not all(re.search(rf"(?<![\w-]){re.escape(str(c))}(?![\w-])", text) for c in opt.choices):
        sep = "," if opt.many else " |"
        listed = f"{'Comma-separated, from' if opt.many else 'One of'}: {(sep + ' ').join(map(str, opt.choices))}."
        text = f"{text} {listed}" if text else listed
    return text


def cli_params(cls, *, prefix: str = "", defaults: dict | None = None, only: Iterable[str] | None = None
               ) -> list[CliParam]:
    """The flags of config dataclass ``cls``: one per field declared with ``option`` (nested
    configs flattened: ``cluster.quantile`` -> ``--quantile``), in field order. Booleans are
    ``--x/--no-x`` switches (``flag="--x/--y"`` names both), tuples comma-separated strings,
    ``None``-able fields optional; the default is the field's (``defaults`` {path: value}
    replaces it for a command whose defaults differ); ``only`` keeps those paths.
    Plain fields (``seed``, ``device``) get no flag: the command's common flag sets them."""
    import typing

    defaults, keep = defaults or {}, set(only) if only is not None else None
    out, seen = [], {}
    for s in settings(cls, prefix):
        if s.option is None or (keep is not None and s.path not in keep):
            continue
        default = defaults.get(s.path, s.default)
        if s.kind is bool:
            decl = s.option.flag if s.option.flag and "/" in s.option.flag else f"{s.flag}/--no-{s.flag[2:]}"
            annotation = bool
        elif s.kind is tuple:  # many: comma-separated; otherwise the field's own syntax ("A:B")
            decl, annotation = s.flag, (typing.Optional[str] if s.optional else str)
            default = ",".join(map(str, default)) if default is not None and s.option.many else default
        else:
            decl = s.flag
            annotation = typing.Optional[s.kind] if s.optional else s.kind
        for name in decl.split("/"):
            if name in seen:
                raise ValueError(f"{cls.__name__}: {s.path} and {seen[name]} both want the flag {name}; "
                                 f"give one a flag= of its own")
            seen[name] = s.path
        out.append(CliParam(s, s.path.replace(".", "__"), decl, annotation, default, _help(s.option)))
    return out
