"""Settings of ``engram evolve`` (no torch here: the command line reads them to build its flags)."""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import option, validate

CHECKPOINT_GRAMMAR = "all | first:N | every:K | steps:a,b,c | log:N"
SPLITS = ("heldout_templates", "train_templates")

#: Settings evolve gives a locator unless told otherwise (``--set ANALYSIS.FIELD=VALUE``): every
#: checkpoint is analysed on the same facts, also those it does not know yet (flagged per fact),
#: and circuits on the pairs frozen on the final checkpoint (``dynamics.evolve``).
EVOLVE_DEFAULTS = {"circuit": {"require_correct": False}, "neurons": {"max_rank": 10**9}}


@dataclass
class EvolutionConfig:
    """Which analyses run on which checkpoints of a run, on which facts, and what is compared."""

    analysis: tuple[str, ...] = option(("recall",), "Registered locators to run at every checkpoint, "
                                       "comma-separated (recall, neurons, dkn, circuit).", many=True)
    checkpoints: str = option("all", f"Which checkpoints: {CHECKPOINT_GRAMMAR} (the last is always included).")
    facts: str = option("world", "world (the run's own evaluated people, prompts cut before the value) or a "
                        "fact file / bundled relation names.")
    split: str = option("heldout_templates", "With --facts world: whose templates make the prompts.",
                        choices=SPLITS)
    transplant: int = option(6, "With circuit: checkpoints in the transplant matrix (the circuit of step s run "
                             "on the model of step t), spread evenly in log step; 0: none.", range=(0, None))
    phase_metric: str = option("auto", "Series whose knee is the formation -> optimization phase shift "
                               "(an evolution.jsonl key; auto: circuit.edge_jaccard_final with circuits, "
                               "else recall.top1_accuracy).")

    def __post_init__(self):
        if isinstance(self.analysis, str):
            self.analysis = tuple(a.strip() for a in self.analysis.split(",") if a.strip())
        self.analysis = tuple(self.analysis)
        validate(self)
