"""What every locator shares: the Result contract, its files, the fact selection, the registry entry.

A *locator* answers "where does this model keep these facts?" in one way (recall, knowledge neurons,
degenerate knowledge neurons, circuits, ...). Every locator is

    find_<thing>(lm: LoadedModel, facts: FactSet, config: <Thing>Config | None = None, *,
                 progress: bool = False) -> <Thing>Result

and every Result follows ``Result`` below. ``engramlab.locate.LOCATORS`` lists them by name, so
``engram evolve``, ``engram study`` and the report can run and read any of them.

One directory layout for every Result (``write_result`` / ``read_result``)::

    config.json     {"locator": name, "config": <the config's fields>, "model": <facts about the
                     model: spec, sizes>, "stats": <counts, seconds>}
    records.jsonl   one row per fact (``records()``), headed by relation / subject / object
    summary.json    ``summary()``: flat {key: number | string | None}
    ...             locator-specific files (tensors in .safetensors)

Older run directories (``neurons_config.json``, ``dkn.jsonl``, ``facts.jsonl``...) still load: each
Result names its old files, and ``read_result`` falls back to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from engramlab.errors import EngramError
from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json, read_jsonl

#: Keys that describe the model a result was computed on (kept apart from the config's fields).
MODEL_KEYS = ("model", "n_layers", "d_mlp", "d_model", "dtype")


@runtime_checkable
class Result(Protocol):
    """The shape of every locator's output."""

    config: dict  # the locator config's fields (``engramlab.config.to_dict``)
    model: dict   # spec and sizes of the model it ran on
    stats: dict   # counts and seconds (not part of what the locator found)

    def summary(self) -> dict:
        """Flat headline numbers: {key: number | str | bool | None}, JSON-serialisable."""

    def records(self) -> list[dict]:
        """One row per fact, each starting with relation, subject, object."""

    def save(self, directory: str | Path) -> None:
        """Write ``config.json``, ``records.jsonl``, ``summary.json`` and the locator's own files."""

    @classmethod
    def load(cls, directory: str | Path) -> "Result":
        """Read what ``save`` wrote (and the files of older versions)."""


# -- small shared helpers ---------------------------------------------------------------------------
def mean_of(values) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def short(x: float) -> float:
    """``x`` to 6 significant digits: what records store, so a saved run re-derives the same sets."""
    return float(f"{x:.6g}")


def fact_record(fact, prompt: str | None = None, target_tokens: list[str] | None = None, **rest) -> dict:
    """The head of every per-fact row: relation, subject, object (then prompt / target tokens)."""
    row = {"relation": fact.relation, "subject": fact.subject, "object": fact.object}
    if prompt is not None:
        row["prompt"] = prompt
    if target_tokens is not None:
        row["target_tokens"] = target_tokens
    row.update(rest)
    return row


def model_facts(lm, **extra) -> dict:
    """Spec and sizes of ``lm`` that a Result records next to its config."""
    a = lm.adapter
    out = {"model": getattr(lm, "spec", None), "n_layers": a.n_layers, "d_mlp": a.d_mlp, "d_model": a.d_model,
           "dtype": str(getattr(lm, "dtype", "")).replace("torch.", "") or None}
    out.update(extra)
    return out


def split_model_keys(config: dict) -> tuple[dict, dict]:
    """(config fields, model facts) of an old result's merged config dict."""
    return ({k: v for k, v in config.items() if k not in MODEL_KEYS},
            {k: v for k, v in config.items() if k in MODEL_KEYS})


# -- the selection of facts, one place for every locator --------------------------------------------
def select(facts, relation: str | list[str] | None = None, limit: int | None = None):
    """``facts`` of ``relation`` (one name or several; None: all), at most ``limit`` per relation.

    ``limit`` counts per relation so that a relation's controls (facts of *other* relations) are
    never emptied by a small limit. An empty selection or a limit below 1 is an error."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EngramError(f"--limit {limit}: must be >= 1 (leave it out for every fact)")
    relation = relation or None
    chosen = facts.filter(relation=relation, per_relation=limit)
    if len(chosen) == 0:
        raise EngramError(f"{facts.source}: no facts left after --relation; relations available: "
                          f"{', '.join(facts.relations) or '(none)'}")
    return chosen


# -- the files -----------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a second name of ``src`` (a hard link; a copy where links are not possible)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


def write_result(directory: str | Path, name: str, result, records_alias: str | None = None) -> Path:
    """Write the three shared files of ``result`` (``config.json``, ``records.jsonl``, ``summary.json``).

    ``records_alias`` also names ``records.jsonl`` under the file name an earlier version used
    (``neurons.jsonl``...), so scripts reading that name keep working."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "config.json", {"locator": name, "config": result.config, "model": result.model,
                                          "stats": result.stats})
    atomic_write_jsonl(d / "records.jsonl", result.records())
    if records_alias:
        _link_or_copy(d / "records.jsonl", d / records_alias)
    atomic_write_json(d / "summary.json", result.summary())
    return d


@dataclass
class Stored:
    """What ``read_result`` found: the config, model facts, stats and rows of a saved result."""

    config: dict
    model: dict
    stats: dict
    records: list[dict]
    meta: dict = field(default_factory=dict)  # the whole config.json (or the old config file)


def read_result(directory: str | Path, name: str, *, old_config: tuple[str, ...] = (),
                old_records: tuple[str, ...] = (), records_required: bool = True) -> Stored:
    """Read ``config.json`` + ``records.jsonl`` of a saved ``name`` result, or an older layout.

    ``old_config`` / ``old_records`` are the file names earlier versions used; an old config file
    may hold the merged {config + model facts} dict or {"config": ..., "stats": ...}."""
    d = Path(directory)
    if not d.is_dir():
        raise EngramError(f"{d}: no such result directory; run `engram {name} ... --out {d}` first")
    meta: dict[str, Any] = {}
    if (d / "config.json").is_file():
        meta = load_json(d / "config.json", f"{name} result config")
        if meta.get("locator") not in (None, name):
            raise EngramError(f"{d / 'config.json'}: holds a {meta.get('locator')!r} result, not {name!r}; "
                              f"load it with engramlab.locate.LOCATORS[{meta.get('locator')!r}]")
        config, model, stats = meta.get("config", {}), meta.get("model", {}), meta.get("stats", {})
    else:
        old = next((d / n for n in old_config if (d / n).is_file()), None)
        config, model, stats = {}, {}, {}
        if old is not None:
            meta = load_json(old, f"{name} config")
            merged = meta["config"] if isinstance(meta.get("config"), dict) else meta
            stats = meta.get("stats", {}) if merged is not meta else {}
            config, model = split_model_keys(merged)
    rec = next((d / n for n in ("records.jsonl", *old_records) if (d / n).is_file()), None)
    if rec is None:
        if records_required:
            raise EngramError(f"{d}: no records.jsonl; is this an `engram {name}` result directory?")
        rows = []
    else:
        rows = read_jsonl(rec)
    return Stored(config, model, stats, rows, meta)


@dataclass
class RowResult:
    """A Result whose findings are its per-fact rows: ``save`` / ``load`` are the shared layout.

    A subclass sets ``NAME`` (its locator's name) and writes ``summary()``; ``OLD_CONFIG`` /
    ``OLD_RECORDS`` name the files of earlier versions (the first old records name is also written,
    as a second name of ``records.jsonl``)."""

    rows: list[dict]
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    NAME: ClassVar[str] = ""
    OLD_CONFIG: ClassVar[tuple[str, ...]] = ()
    OLD_RECORDS: ClassVar[tuple[str, ...]] = ()

    def records(self) -> list[dict]:
        return self.rows

    def summary(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        write_result(directory, self.NAME, self, records_alias=self.OLD_RECORDS[0] if self.OLD_RECORDS else None)

    @classmethod
    def load(cls, directory: str | Path):
        got = read_result(directory, cls.NAME, old_config=cls.OLD_CONFIG, old_records=cls.OLD_RECORDS)
        return cls(got.records, got.config, got.stats, got.model)


# -- the registry entry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Locator:
    """One registered locator: what ``engram evolve`` / ``engram study`` / the report need to know.

    ``find(lm, facts, config=None, *, progress=False) -> result_cls``; ``config_cls`` is a dataclass
    whose fields are declared with ``engramlab.config.option`` (the CLI's flags are made from them);
    ``quick`` holds settings for a fast run on a tiny model (the contract suite and smoke runs);
    ``summary_keys`` are the headline keys the CLI prints; ``files`` what ``save`` writes besides
    the shared three."""

    name: str
    config_cls: type
    find: Callable
    result_cls: type
    help: str = ""
    summary_keys: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    quick: dict = field(default_factory=dict)

    def make_config(self, **settings):
        return self.config_cls(**settings)

    def load(self, directory: str | Path):
        return self.result_cls.load(directory)
