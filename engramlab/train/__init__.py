"""Training on synthetic worlds: the trainer, model presets, checkpoint schedules, sweeps.

``config`` holds ``TrainConfig`` without torch (the command line reads it); ``trainer`` trains.
"""

from engramlab.lazy import lazy_exports

# name -> the module defining it. PEP 562: the package runs whenever one of its modules is
# imported (``engramlab.train.config`` by the command line, too), so a name's module is
# imported only when the name is first asked for.
_LAZY = {
    "TrainConfig": "engramlab.train.config",
    "Trainer": "engramlab.train.trainer", "train": "engramlab.train.trainer",
}
lazy_exports(__name__, _LAZY)

__all__ = ["TrainConfig", "Trainer", "train"]
