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
option, and a command-line layer can build its flags from them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
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
        return self.flag or "--" + self.name.replace("_", "-")

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
