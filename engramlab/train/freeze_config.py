"""``FreezeConfig``: the settings of ``engram freeze`` (further training with a region held fixed).

Only the standard library and ``engramlab.config`` are imported, so the command line builds the
verb's flags (and refuses a bad value) without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import option, validate

#: What each arm holds fixed: nothing, the regions run's core region, or its random region (same size).
ARMS = ("none", "core", "random")
FREEZE_MODES = ("grad_mask", "restore")  # engramlab.train.freeze.MODES


@dataclass
class FreezeConfig:
    """Further training on one corpus of an ``engram regions`` run, one arm per frozen region."""

    steps: int = option(40, "Optimizer steps per arm.", range=(1, None))
    lr: float = option(5e-5, "Learning rate (AdamW).", range=(0, None), open_low=True)
    schedule: str = option("constant", "Learning-rate schedule.", choices=("cosine", "constant", "linear"))
    weight_decay: float = option(0.1, "AdamW weight decay (on matrices; frozen entries are never moved by it).",
                                 range=(0, None))
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).", range=(0, None))
    batch_size: int = option(4, "Training chunks per step, drawn from the training corpus's chunks (never its "
                             "held-out ones).", range=(1, None))
    eval_every: int = option(5, "Perplexity of every corpus's held-out chunks every this many steps (and at "
                             "the start and end).", range=(1, None))
    checkpoint_every: int = option(10, "Save a resumable checkpoint every this many steps (only the newest is "
                                   "kept, besides the last).", range=(1, None))
    arms: tuple[str, ...] = option(ARMS, "Arms to run, comma-separated: none (nothing frozen), core, random.",
                                   choices=ARMS, many=True)
    freeze_mode: str = option("grad_mask", "How a region is held: grad_mask (frozen gradients zeroed, entries "
                              "written back after each step) | restore (written back after each step only, the "
                              "reference's).", choices=FREEZE_MODES)
    seed: int = 0  # the training batches

    def __post_init__(self):
        if isinstance(self.arms, str):
            self.arms = tuple(a.strip() for a in self.arms.split(",") if a.strip())
        self.arms = tuple(dict.fromkeys(self.arms))  # each arm once, in the order given
        validate(self)
