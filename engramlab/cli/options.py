"""A verb's options made from its config dataclasses: flags, ``--config FILE`` and ``--set KEY=VALUE``.

    @app.command()
    @user_errors
    @configured(NeuronConfig)
    def neurons(model: str = ModelOpt, ..., seed: int = SeedOpt, config: NeuronConfig = None): ...

gives ``engram neurons`` one flag per field declared with ``engramlab.config.option`` (its
default, help and choices come from the declaration, nowhere else), plus

* ``--config FILE``: a YAML / TOML / JSON file of the config's fields (nested configs as nested
  mappings or dotted keys), or a run directory whose settings to repeat;
* ``--set KEY=VALUE`` (repeatable): any field, also those without a flag (``attention_stats``).

The verb receives the built config. Which value wins, per field: a flag given on the command line,
then ``--set``, then the file, then the default. Parameters of the verb named like a plain field
(``seed``, ``device``, ``world``) set that field wherever it occurs (``DKNConfig.seed`` and
``cluster.seed``), with the same order, and the verb receives the value used.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from engramlab.config import build, cli_params, flatten_settings, from_dict, read_settings_file, settings, to_dict
from engramlab.errors import EngramError

#: Keys of a run's manifest config that belong to the verb, not to its locator's config.
RUN_KEYS = ("model", "facts", "relation", "limit", "dtype", "device", "device_map", "paraphrases", "n_layers", "d_mlp",
            "d_model")


@dataclass
class Settings:
    """What a command was given for one config: ``values`` {dotted path: value} (the command's
    defaults, then the file, --set and the flags given) and ``origin`` {path: where it was given}."""

    cls: type
    values: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)
    prefix: str = ""

    def build(self):
        return build(self.cls, self.values, self.prefix)

    @property
    def given(self) -> dict:
        """The settings given by a flag, --set or the file (not the defaults), without the prefix."""
        return {p[len(self.prefix):]: self.values[p] for p in self.origin}


def _from_command_line(ctx, name: str) -> bool:
    # Compared by name: typer ships its own copy of click's ParameterSource.
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def parse_sets(items: list[str] | None, known: dict, example: str = "") -> dict[str, Any]:
    """``--set key=value`` pairs -> {path: value} typed by the field (``none`` for an optional one)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EngramError(f"--set {item!r}: use KEY=VALUE, e.g. --set {example or 'name=value'}")
        out.update(flatten_settings({key.strip(): value}, known, "--set"))
    return out


def _run_settings(path: Path, command: str, parts: dict) -> dict[str, Any]:
    """The settings a run directory was made with ({path: value}); unknown keys only warn."""
    from engramlab.runs import load_json

    manifest = load_json(path / "manifest.json", "run manifest") if (path / "manifest.json").is_file() else None
    if manifest is None:
        raise EngramError(f"{path}: a directory given to --config must be a run directory (it has no manifest.json)")
    if manifest.get("command") != command:
        raise EngramError(f"{path}: holds a run of `engram {manifest.get('command')}`, not {command}; "
                          f"give --config a {command} run or a settings file")
    saved = manifest.get("config") or {}
    out: dict[str, Any] = {}
    for key, (cls, prefix) in parts.items():
        data = saved.get(command) if key == "config" and isinstance(saved.get(command), dict) else \
            saved if key == "config" else saved.get(key)
        if not isinstance(data, dict):
            continue
        if key == "config":  # an older, flat layout: the locator's fields next to the run's own keys
            data = {k: v for k, v in data.items() if k not in parts}
        cfg = from_dict(cls, data, source=f"{path}/manifest.json", ignore=RUN_KEYS)
        known = {s.path: s for s in settings(cls, prefix)}
        nested = to_dict(cfg)
        out.update(flatten_settings({prefix[:-1]: nested} if prefix else nested, known, str(path)))
    return out


def configured(cls: type, *, sections: dict[str, type] | None = None, defaults: dict | None = None,
               only: tuple[str, ...] | None = None, build_config: bool = True,
               section_flags: bool = True) -> Callable:
    """Give a verb the flags of config dataclass ``cls`` (``engramlab.config.cli_params``), and of
    each ``sections`` {key: config class} whose settings sit under ``key`` in files and --set
    (``evolvability.n_new``), plus ``--config`` and ``--set``.

    The verb takes a parameter ``config`` and one per section key; it receives the built configs
    (``build_config=False``: the ``Settings``, to build later or read ``given``). ``defaults``
    {path: value} replaces a field's default for this verb; ``only`` keeps those paths' flags.
    ``section_flags=False``: the sections get no flags, only ``--set KEY.FIELD=V`` and ``--config``
    (``engram evolve``: every locator's settings, whose flag names would clash)."""
    parts = {"config": (cls, ""), **{k: (c, k + ".") for k, c in (sections or {}).items()}}

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in parts]
        flags = {k: cli_params(c, prefix=pre, defaults=defaults if k == "config" else None,
                               only=only if k == "config" else None) if k == "config" or section_flags else []
                 for k, (c, pre) in parts.items()}
        generated = [cp for cps in flags.values() for cp in cps]
        known = {s.path: s for c, pre in parts.values() for s in settings(c, pre)}
        plain = {s.name for s in known.values() if s.option is None}
        linked = [p.name for p in own if p.name in plain]
        ctx_name = next((p.name for p in own if isinstance(hints.get(p.name), type)
                         and issubclass(hints[p.name], typer.Context)), None)
        _check_clashes(fn.__name__, own, generated)

        def wrapper(**kw):
            ctx = kw[ctx_name] if ctx_name else kw.pop("engram_context_")
            values, origin = _gather(ctx, kw, parts, generated, known, linked)
            for key, (c, pre) in parts.items():
                # a section's paths start with its key; the main config's are the rest
                mine = [p for p in values if p.startswith(pre) and (pre or p.split(".")[0] not in parts)]
                got = Settings(c, {p: values[p] for p in mine}, {p: origin[p] for p in mine if p in origin}, pre)
                kw[key] = got.build() if build_config else got
            return fn(**kw)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                  for p in own]
        if ctx_name is None:
            params.append(inspect.Parameter("engram_context_", inspect.Parameter.KEYWORD_ONLY,
                                            annotation=typer.Context))
        for cp in generated:  # grouped in --help by the config that declares them
            path, owner = cp.setting.path, cp.setting.owner.__name__
            panel = f"{owner} ({path.rsplit('.', 1)[0]}.*)" if "." in path else owner
            params.append(inspect.Parameter(cp.name, inspect.Parameter.KEYWORD_ONLY, annotation=cp.annotation,
                                            default=typer.Option(cp.default, cp.decl, help=cp.help,
                                                                 rich_help_panel=panel)))
        panel = "Config file and --set" if generated else None
        params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", help=CONFIG_HELP,
                                                             rich_help_panel=panel)))
        params.append(inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[List[str]],
                                        default=typer.Option(None, "--set", help=SET_HELP, rich_help_panel=panel)))
        functools.update_wrapper(wrapper, fn)
        del wrapper.__wrapped__  # typer must see the new signature, not fn's
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.cli_settings = known  # for tests and docs: every setting the verb takes
        return wrapper

    return decorate


def _gather(ctx, kw: dict, parts: dict, generated: list, known: dict, linked: list) -> tuple[dict, dict]:
    """{path: value} and {path: where it was given} of one invocation; pops the generated
    parameters, --config and --set from ``kw`` and sets its linked ones to the values used."""
    config_file, sets = kw.pop("config_file"), kw.pop("sets")
    # 1. the command's defaults (a field's default, or the verb's own)
    values = {cp.setting.path: cp.value(cp.default) for cp in generated}
    origin: dict[str, str] = {}
    # 2. the --config file (or run directory), 3. --set
    if config_file is not None:
        got = (_run_settings(config_file, ctx.command.name, parts) if config_file.is_dir()
               else flatten_settings(read_settings_file(config_file), known, str(config_file)))
        values.update(got)
        origin.update(dict.fromkeys(got, str(config_file)))
    example = next((f"{cp.setting.path}={cp.default}" for cp in generated), next(iter(known), ""))
    from_set = parse_sets(sets, known, example)
    values.update(from_set)
    origin.update(dict.fromkeys(from_set, "--set"))
    # 4. the flags given on the command line
    given = {}
    for cp in generated:
        raw = kw.pop(cp.name)
        if _from_command_line(ctx, cp.name):
            given[cp.setting.path] = (cp.value(raw), cp.decl.split("/")[0])
    for name in linked:  # --seed / --device / --world set every plain field of that name
        paths = [p for p, s in known.items() if s.option is None and s.name == name]
        flag = _flag_of(ctx, name)
        if _from_command_line(ctx, name):
            value = known[paths[0]].coerce(kw[name], flag)
            given.update({p: (value, flag) for p in paths})
        else:  # the file's (or --set's) value of the main config's field, else the verb's default
            value = values[name] if name in origin else kw[name]
            value = None if value is None else known[paths[0]].coerce(value, flag)
            values.update({p: value for p in paths if p not in origin and value is not None})
        kw[name] = value
    for path, (value, flag) in given.items():
        if path in from_set and from_set[path] != value:
            raise EngramError(f"{flag} {value!r} and --set {path}={from_set[path]!r} disagree; pass one")
        values[path], origin[path] = value, flag
    return values, origin


CONFIG_HELP = ("Settings for this command from a YAML / TOML file (field: value; nested configs as a mapping "
               "or dotted keys), or a run directory to repeat; flags given win over it.")
SET_HELP = ("Set any field of this command's config, KEY=VALUE (repeatable; a nested config's field as "
            "SECTION.FIELD=VALUE).")


def _flag_of(ctx, name: str) -> str:
    param = next((p for p in ctx.command.params if p.name == name), None)
    return max(param.opts, key=len) if param is not None else "--" + name.replace("_", "-")


def _check_clashes(verb: str, own: list, generated: list) -> None:
    """A verb parameter and a generated flag must not share a name or a flag."""
    names = {p.name for p in own}
    own_flags = {d for p in own for d in getattr(p.default, "param_decls", None) or () if str(d).startswith("-")}
    for cp in generated:
        if cp.name in names or set(cp.decl.split("/")) & own_flags:
            raise ValueError(f"engram {verb}: {cp.setting.path} ({cp.decl}) is also declared by the verb; "
                             f"declare it once, on the config field")
