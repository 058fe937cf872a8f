"""Settings of ``engram evolve`` (no torch here: the command line reads them to build its flags)."""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import option, validate

CHECKPOINT_GRAMMAR = "all | first:N | every:K | steps:a,b,c | log:N"
SPLITS = ("heldout_templates", "train_templates")


@dataclass
class EvolutionConfig:
    """Which analyses run on which checkpoints of a run, on which facts."""

    analysis: tuple[str, ...] = option(("recall",), "Registered locators to run at every checkpoint, "
                                       "comma-separated (recall, neurons, dkn, circuit).", many=True)
    checkpoints: str = option("all", f"Which checkpoints: {CHECKPOINT_GRAMMAR} (the last is always included).")
    facts: str = option("world", "world (the run's own evaluated people, prompts cut before the value) or a "
                        "fact file / bundled relation names.")
    split: str = option("heldout_templates", "With --facts world: whose templates make the prompts.",
                        choices=SPLITS)

    def __post_init__(self):
        if isinstance(self.analysis, str):
            self.analysis = tuple(a.strip() for a in self.analysis.split(",") if a.strip())
        self.analysis = tuple(self.analysis)
        validate(self)
