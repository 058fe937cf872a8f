"""Training on synthetic worlds: the trainer, model presets, checkpoint schedules, sweeps."""

import importlib

# name -> the module defining it. PEP 562: the package is imported whenever one of its modules is
# (``engramlab.train.config`` by the command line, too), so nothing heavy is imported until a name is asked for.
_LAZY = {
    "TrainConfig": "engramlab.train.config",
    "Trainer": "engramlab.train.trainer", "train": "engramlab.train.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a submodule (``engramlab.train.sweep``) reached as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["TrainConfig", "Trainer", "train"]
