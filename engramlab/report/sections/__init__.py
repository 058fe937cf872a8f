"""Report sections, one renderer per kind of run (the ``command`` in a run's manifest).

A renderer is ``render(runs, report) -> list[Section]``: ``runs`` are all the collected runs of its
command(s), in study order, ``report`` (``engramlab.report.runs.Report``) gives the other runs (a
fine-tuning run's parent, an evolve's training run). Register it with ``@renderer("train", ...)``
in a module listed in ``MODULES``; a locator added to ``engramlab.locate`` adds its renderer here,
so ``engram report`` and ``engram study`` show it.
"""

from __future__ import annotations

import importlib
from typing import Callable

RENDERERS: dict[str, Callable] = {}

#: Modules that register renderers (imported on first use).
MODULES = ("training", "locators", "neurons", "dkn", "circuit", "evolve", "regions", "freeze", "trace", "factcheck")


def renderer(*commands: str):
    def register(fn):
        for c in commands:
            if c in RENDERERS:
                raise ValueError(f"report section for {c!r} registered twice")
            RENDERERS[c] = fn
        return fn
    return register


def renderers() -> dict[str, Callable]:
    for m in MODULES:
        importlib.import_module(f"engramlab.report.sections.{m}")
    return RENDERERS


__all__ = ["MODULES", "RENDERERS", "renderer", "renderers"]
