"""``CircuitConfig``: the settings of ``find_circuit``, and the names they choose from.

Only the standard library and ``engramlab.config`` are imported, so the command line builds
``engram circuit``'s flags (and refuses a bad value) without loading torch; the modules that do the
work (``attribute``, ``evaluate``, ``prune``, ``find``) re-export the names they use from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import check, option, validate
from engramlab.errors import EngramError
from engramlab.locate.integration_rules import RULES as IG_RULES, check_rule

# The MIB sweep (``mib``); the lists are plain data, so they live here, without torch.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MIB_RANKINGS = ("absolute", "signed")


def check_fractions(fractions) -> tuple[float, ...]:
    """The fractions as floats, or a one-line ``EngramError``: at least two, strictly increasing, in (0, 1]."""
    try:
        out = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise EngramError(f"mib_fractions {fractions!r}: give edge fractions as numbers, e.g. "
                          f"--mib-fractions 0.01,0.1,1") from None
    if len(out) < 2 or any(not (0 < f <= 1) for f in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise EngramError(f"mib_fractions {fractions!r}: give at least two increasing edge fractions in (0, 1], "
                          f"e.g. --mib-fractions 0.01,0.1,1")
    return out


# Edge attribution (``attribute``) and what edges outside the circuit carry (``evaluate``).
METHODS = ("eap", "eap-ig", "clean-corrupted")
METRICS = ("logit_diff", "logprob")
ABLATIONS = ("corrupted", "zero", "mean")


def check_method(method: str, steps: int, metric: str, rule: str = "right", ablation: str = "corrupted") -> None:
    """Raise ``EngramError`` (one line naming the flag) unless the attribution settings go together."""
    if method not in METHODS:
        raise EngramError(f"method {method!r}: choose one of {', '.join(METHODS)} (--method)")
    if metric not in METRICS:
        raise EngramError(f"metric {metric!r}: choose one of {', '.join(METRICS)} (--metric)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngramError(f"steps must be a whole number >= 1, got {steps!r} (--steps)")
    check_rule(rule)
    if rule != "right" and method != "eap-ig":
        raise EngramError(f"--ig-rule {rule} applies to --method eap-ig only; drop it or use --method eap-ig")
    if ablation not in ABLATIONS:
        raise EngramError(f"ablation {ablation!r}: choose one of {', '.join(ABLATIONS)} (--ablation)")


# Pruning rules (``prune``); the integration rules are ``IG_RULES``.
RULES = ("topn", "threshold", "greedy")


@dataclass
class CircuitConfig:
    """Settings of ``find_circuit``; defaults follow EAP-IG (Hanna et al. 2024)."""

    method: str = option("eap-ig", "Edge attribution: eap | eap-ig | clean-corrupted.", choices=METHODS)
    steps: int = option(5, "EAP-IG integration steps m.", range=(1, None))
    ig_rule: str = option("right", "EAP-IG integration rule: right alpha = k/m, k = 1..m (Hanna et al., DKC; "
                          "default) | left k = 0..m-1 (upstream EAP-IG v2) | trapezoid k = 0..m (m + 1 passes) | "
                          "midpoint (k - 1/2)/m | gauss-legendre (m Gauss-Legendre nodes, exact for a gradient "
                          "polynomial of degree 2m - 1 along the path).", choices=IG_RULES)
    metric: str = option("logit_diff", "logit_diff (clean vs corrupted answer) | logprob (clean answer).",
                         choices=METRICS)
    rule: str = option("topn", "Pruning rule: topn | threshold | greedy (the integration rule is ig_rule).", choices=RULES)
    top_n: int | None = option(None, "Edges to keep (default: the smallest N, at most max_fraction of the edges, "
                               "reaching target_faithfulness on the discovery facts).",
                               range=(1, None), integer=True)
    threshold: float | None = option(None, "|score| cut for rule threshold.", range=(0, None))
    # What the automatic N aims for on discovery pairs (a margin: held-out pairs usually come out a
    # little lower), with at most max_fraction of the edges.
    target_faithfulness: float = option(0.9, "Faithfulness the automatic N aims for on discovery pairs.",
                                        range=(0, None), open_low=True)
    max_fraction: float = option(0.1, "Automatic N: at most this share of the edges.", range=(0, 1), open_low=True)
    ablation: str = option("corrupted", "What edges outside the circuit carry: corrupted | zero | mean; edges are "
                           "scored with the same ablation.", choices=ABLATIONS)
    score_ablation: str | None = option(None, "Score edges with another ablation's differences (corrupted | zero | mean; "
                                        "default: ablation).",
                                        choices=ABLATIONS, optional=True)
    split: float = option(0.5, "Share of each relation's subjects used for discovery; the rest is held out "
                          "for evaluation.", range=(0, 1),
                          open_low=True, open_high=True)
    template: int = option(0, "Prompt template index.")
    seed: int = 0
    pairs: str | None = option(None, "Use these discovery/evaluation pairs (a circuit result's records.jsonl or "
                               "its directory) instead of splitting the facts; no correctness filter.",
                               optional=True)
    require_correct: bool = option(True, "Skip facts whose answer is not the model's top-1 token "
                                   "(--keep-wrong keeps them).", flag="--require-correct/--keep-wrong")
    batch_size: int = option(8, "Pairs per attribution batch.", range=(1, None))
    curve: tuple[float, ...] = MIB_FRACTIONS  # edge shares of the faithfulness curve (N = round(share x edges))
    mib_fractions: tuple[float, ...] = option(MIB_FRACTIONS, "MIB CPR/CMD: edge fractions of the sweep (top "
                                              "floor(p x edges) circuits, trapezoid over p; MIB's list by default).",
                                              many=True)
    mib_ranking: str = option("absolute", "MIB CPR/CMD: rank edges by absolute | signed score (signed: EAP-IG's "
                              "sign, the edges whose cut lowers the metric first).", choices=MIB_RANKINGS)
    completeness_tolerance: float = option(0.05, "Warn when the mean IG completeness error |sum of the input's "
                                           "edge scores - metric difference| / |metric difference| exceeds this.",
                                           range=(0, None), open_low=True)
    mover_ratio: float = option(10.0, "Head roles: |subject| / |relation| direct effect above this: mover head.",
                                range=(0, None), open_low=True)
    relation_ratio: float = option(0.1, "Head roles: below this: relation head (between the two: mixture).", range=(0, None), open_low=True)

    def __post_init__(self):
        validate(self)
        check_method(self.method, self.steps, self.metric, self.ig_rule, self.ablation)
        check(self, "rule", self.rule != "threshold" or self.threshold is not None,
              "rule 'threshold' needs --threshold (keep edges with |score| >= it)")
        self.curve = tuple(float(c) for c in self.curve)
        self.mib_fractions = check_fractions(self.mib_fractions)
