"""``FactcheckConfig``: the settings of ``find_factcheck`` (``engram factcheck``), and the names they
choose from.

Only the standard library and ``engramlab.config`` are imported, so the command line builds
``engram factcheck``'s flags (and refuses a bad value) without loading torch. The DKN and
knowledge-neuron locators the checkers are built on keep their own configs, nested here as
``dkn`` and ``kn`` (set them with ``--set dkn.t_low=0.2``, ``--set kn.steps=10``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engramlab.config import check, option, validate
from engramlab.locate.dkn.config import DKNConfig
from engramlab.locate.neurons.config import NeuronConfig

#: The checkers, in the order of the tables.
CHECKERS = ("dkn", "kn", "prompt")
#: The statement forms: the fact's own prompt, and the same claim inside distractor clauses.
FORMS = ("simple", "complex")
#: How a relation-level neuron is kept: count > share x the largest count of any neuron of the
#: relation ("max", the reference's ``threshold_filter``), or > share x the relation's facts ("facts").
SHARE_OF = ("max", "facts")
#: The reference's fixed thresholds (``hallucination.py``): tau for DKNs and for knowledge neurons.
REFERENCE_TAU = {"dkn": 5e-7, "kn": 5e-6}
#: The settings of the nested locators that the checkers only need to build the relation neurons
#: (the default method's DKNs, the refined neurons): the rest (other clustering methods, the DKN
#: robustness analysis, the KN controls on other facts) is not run, and the stats say so.
NOT_RUN = {"dkn": {"robustness": False}, "kn": {"n_compare": 0, "n_random_repeats": 0}}


def parse_threshold(value: str) -> str | float:
    """"fitted" | "reference" | a number (as a float); anything else is None."""
    text = str(value).strip().lower()
    if text in ("fitted", "reference"):
        return text
    try:
        number = float(text)
    except ValueError:
        return None
    return number if number == number else None  # nan is not a threshold


@dataclass
class FactcheckConfig:
    """Settings of ``find_factcheck``. The defaults are engramlab's: the test split is 25% of each
    relation (the reference holds out 1% of 10k facts, which at a few dozen facts per relation is
    nothing), and tau is fitted on the training claims; ``--threshold reference`` uses the
    reference's fixed tau (5e-7 DKN, 5e-6 KN)."""

    test_fraction: float = option(0.25, "Share of each relation's facts held out as the test split (at least one "
                                  "fact, and at least one left to train on).", range=(0, 1), open_low=True,
                                  open_high=True)
    share: float = option(0.5, "Relation-level neurons: those whose count over the relation's training facts "
                          "exceeds share x (the largest count: --share-of max, the reference's 0.5 x max | the "
                          "number of training facts: --share-of facts).", range=(0, 1), open_high=True)
    share_of: str = option("max", "What --share multiplies: max | facts.", choices=SHARE_OF)
    threshold: str = option("fitted", "tau of the DKN and KN checkers (a claim scoring below tau is judged false): "
                            "fitted (maximises F1 on the training claims, per checker and statement form) | "
                            "reference (5e-7 DKN, 5e-6 KN) | a number.")
    complex: bool = option(True, "Also check every claim as a complex statement (distractor clauses around the "
                           "subject).")
    template: int = option(0, "Prompt template index of the claims (the DKN / KN locators use their own "
                           "dkn.template / all templates).")
    batch_size: int = option(32, "Prompts per forward pass of the prompt checker.", range=(1, None))
    dkn: DKNConfig = field(default_factory=DKNConfig)
    kn: NeuronConfig = field(default_factory=NeuronConfig)
    seed: int = 0  # the split, the false objects and the distractor clauses

    def __post_init__(self):
        validate(self)
        check(self, "threshold", parse_threshold(self.threshold) is not None,
              "must be fitted, reference or a number")


#: The flags of ``engram factcheck`` (the nested configs are set with --set dkn.X / kn.X).
OWN_OPTIONS = ("test_fraction", "share", "share_of", "threshold", "complex", "template", "batch_size")

__all__ = ["CHECKERS", "FORMS", "NOT_RUN", "OWN_OPTIONS", "REFERENCE_TAU", "SHARE_OF", "FactcheckConfig",
           "parse_threshold"]
