"""``NeuronConfig``: the settings of ``find_knowledge_neurons``, and the names they choose from.

Only the standard library and ``engramlab.config`` are imported, so the command line can build
``engram neurons``' flags (and refuse a bad value) without loading torch; the locator itself is
``engramlab.locate.neurons.find``, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import check, option, validate
from engramlab.locate.integration_rules import RULES

# Integrated-gradients choices (``engramlab.locate.neurons.ig``).
SITES = ("neurons", "pre")
BASELINES = ("zero", "mean", "mean_all")
OBJECTIVES = ("prob", "logprob", "prob_sum")
REFINE = ("fact", "dai")
METHODS = ("ig", "static", "screen")
# Above this completeness error (``engramlab.locate.neurons.ig.IGRun.completeness_error``: the sum
# rule's relative error, |sum_n Attr(n) - (F(a) - F(b))| / |F(a) - F(b)| averaged over layers with
# weights |F(a) - F(b)|) a run logs a warning: the integral is too coarse for its scores to be read
# at face value; more --steps or --ig-rule gauss-legendre fix it.
COMPLETENESS_TOLERANCE = 0.05
# Per refinement rule: (p_start, min_prompts) when not given.
_PRESETS = {"fact": (0.5, 1), "dai": (0.7, 3)}


@dataclass
class NeuronConfig:
    """Settings of ``find_knowledge_neurons``.

    The defaults are engramlab's (per-fact refinement, right-sum rule); ``refine="dai"`` with
    ``ig_rule="left"`` is the closest to Dai et al. 2022's code (see docs/neurons.md for what still
    differs). ``p_start`` and ``min_prompts`` left at None take the refinement rule's preset."""

    steps: int = option(20, "Integrated-gradients steps m.", range=(1, None))
    baseline: str = option("zero", "zero | mean (mean activation over prompt positions 1..P-2, position 0 left "
                           "out) | mean_all (0..P-2).",
                           choices=BASELINES)
    objective: str = option("prob", "prob (joint probability of the target tokens, what the interventions "
                            "measure) | logprob | prob_sum (sum of per-token probabilities).",
                            choices=OBJECTIVES)
    site: str = option("neurons", "neurons (MLP output-projection input) | pre (pre-activation: gate / c_fc "
                       "output).",
                       choices=SITES)
    ig_rule: str = option("right", "Integration rule over m steps: right (alpha = k/m, k = 1..m) | left (k = "
                          "0..m-1, Dai et al.'s code) | trapezoid (k = 0..m, half weights at the ends) | midpoint "
                          "((k - 1/2)/m) | gauss-legendre (m Gauss-Legendre nodes: fewest steps for a given "
                          "completeness error).",
                          choices=RULES)
    method: str = option("ig", "ig (integrated gradients over every layer) | static (one forward: each neuron's "
                         "direct first-order contribution to log p(answer) through the unembedding) | screen "
                         "(the static score picks --screen-layers layers, IG verifies only those).",
                         choices=METHODS)
    screen_layers: int = option(3, "screen: layers IG verifies, those holding most of the static score of the top "
                                "--screen-neurons neurons.", range=(1, None))
    screen_neurons: int = option(50, "screen: top neurons by static score that choose the layers.", range=(1, None))
    threshold: float = option(0.2, "Coarse neurons: score > threshold x the prompt's max score.", range=(0, 1),
                              open_high=True)
    refine: str = option("fact", "fact (p adapted per fact, cut to max_neurons) | dai (Dai et al. 2022: p from "
                         "0.7 adapted per relation, >= 3 paraphrases, no cap).",
                         choices=REFINE)
    p_start: float | None = option(None, "Refined: share p of the paraphrases to start from (default: 0.5 fact, 0.7 dai).",
                                   range=(0, 1), open_low=True)
    min_prompts: int | None = option(None, "Refined: in at least this many paraphrases (default: 1 fact, 3 dai).",
                                     range=(1, None), integer=True)
    min_neurons: int = option(2, "Refined neurons per fact, at least, when the paraphrases allow (dai: the "
                              "relation's mean, at least).",
                              range=(1, None))
    max_neurons: int = option(5, "Refined neurons per fact, at most (dai: the relation's mean, at most).", range=(1, None))
    relation_share: float = option(0.1, "Relation neurons: in at least this share of the relation's facts.",
                                   range=(0, 1), open_low=True)
    max_rank: int = option(100, "Skip facts whose first target token ranks beyond this.", range=(1, None))
    completeness_tolerance: float = option(COMPLETENESS_TOLERANCE, "Warn when the mean IG completeness error (the "
                                           "layers' summed scores against F(a) - F(b), weighted by |F(a) - F(b)|) "
                                           "exceeds this: more --steps or --ig-rule gauss-legendre are needed.",
                                           range=(0, None), open_low=True)
    batch_layers: int | None = option(None, "Layers per IG batch (default: as many as fit in memory).",
                                      range=(1, None), integer=True)
    n_random_repeats: int = option(3, "Random-neuron controls per fact.", range=(0, None),
                                   flag="--random-repeats")
    seed: int = 0
    n_compare: int = option(20, "Facts of the same / other relations each fact's neurons are tested on, at most.",
                            range=(0, None))

    def __post_init__(self):
        validate(self)
        p_start, min_prompts = _PRESETS[self.refine]
        self.p_start = p_start if self.p_start is None else self.p_start
        self.min_prompts = min_prompts if self.min_prompts is None else self.min_prompts
        check(self, "min_neurons", self.min_neurons <= self.max_neurons, f"must be <= max_neurons ({self.max_neurons})")
        check(self, "site", self.method == "ig" or self.site == "neurons",
              f"--method {self.method} scores the MLP output-projection input: use --site neurons (or --method ig)")
