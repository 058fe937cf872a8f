"""The findings table: one row per research result engramlab reproduces, each with its rule.

Every row's verdict is computed by the rule written here (the section that measures it applies the
rule to its own run's numbers and links its evidence). A row no run measured says ``not run``.
The rules are deliberately plain thresholds, so a reader can check them against the numbers shown;
they are not the papers' statistics (most papers give none), and the scale here is small. When a
rule's inputs are missing (no plateau in the source run of a patched twin, no control measured, too
few checkpoints for a fit) the verdict is ``inconclusive``, not ``not reproduced``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FindingSpec:
    key: str
    title: str
    paper: str
    claim: str
    rule: str


FINDINGS: tuple[FindingSpec, ...] = (
    FindingSpec("three_phases", "Three phases of fact learning", "Zucchet et al. 2025",
                "The loss first falls to the no-knowledge baseline (the attribute marginals), stays there on a "
                "plateau, then falls below it as individual facts are learned.",
                "reproduced: the run has a plateau start and end, at least 4 evaluations within 10% of the "
                "baseline before the plateau ends, and final accuracy >= 0.5; partly reproduced: a plateau start "
                "and end but fewer such evaluations or lower accuracy; not reproduced: no plateau end."),
    FindingSpec("plateau_scaling", "Plateau length grows as a power of the population", "Zucchet et al. 2025",
                "The plateau ends later with more people, roughly as N^b (b ~ 0.8 in the paper's set-up).",
                "reproduced: a sweep over >= 3 population sizes fits plateau_end = a*N^b with b > 0.3 and "
                "R^2 >= 0.8; not reproduced otherwise."),
    FindingSpec("imbalance_warmup", "Imbalance and warm-up shorten the plateau", "Zucchet et al. 2025",
                "Drawing some people more often (power law, celebrities) or starting on a small subset "
                "(warm-up) ends the plateau earlier than uniform sampling at the same N.",
                "reproduced: every non-uniform sampler at an N of the sweep ends its plateau (on the training "
                "distribution when measured) earlier than uniform at that N; partly reproduced: some do; not "
                "reproduced: none does."),
    FindingSpec("hallucination", "Hallucination rises with knowledge", "Zucchet et al. 2025",
                "As the model learns individuals, its loss on people it never saw rises above the no-knowledge "
                "baseline: it answers unseen people confidently and wrongly.",
                "reproduced: the held-out population's loss rises above 1.1x the baseline (heldout_rise_step) "
                "at or after the plateau start and ends above the baseline; not reproduced otherwise."),
    FindingSpec("finetune_collapse", "Fine-tuning erases old facts; replay softens it", "Zucchet et al. 2025",
                "Fine-tuning on new individuals quickly destroys the knowledge of the old ones; replaying old "
                "data during fine-tuning reduces the loss.",
                "reproduced: without replay the old population's accuracy falls to at most half its initial "
                "value, and with replay it ends at least 0.1 higher than without; partly reproduced: the "
                "collapse without the replay benefit (or no replay run)."),
    FindingSpec("attention_patching", "Attention patterns carry the plateau", "Zucchet et al. 2025",
                "A twin trained with the attention patterns of a trained model leaves the plateau earlier: "
                "building the attention-based recall circuit is what the plateau waits for.",
                "reproduced: the patched twin's plateau ends at an earlier step than the run it copies; not "
                "reproduced: at the same step or later."),
    FindingSpec("kn_suppression", "Knowledge neurons: suppression vs controls", "Dai et al. 2022",
                "Suppressing a fact's knowledge neurons lowers the model's probability of its answer much more "
                "than it lowers other relations' facts, and much more than suppressing random neurons.",
                "reproduced: mean own drop >= 0.3, at least twice the other-relation drop, and at least 0.2 "
                "above the random-neuron drop; partly reproduced: the own drop exceeds both controls (or every "
                "control measured, when one relation leaves no other-relation control); not reproduced "
                "otherwise."),
    FindingSpec("dkn_partial_full", "Degenerate knowledge neurons", "Chen et al. 2024",
                "Some facts are held by redundant groups of neurons: suppressing part of the group barely "
                "changes the prediction, suppressing all of it removes it.",
                "reproduced: verified DKNs (partial drop < t_low, full drop > t_high) for >= 10% of the "
                "evaluated facts; partly reproduced: for some facts, fewer than 10%; not reproduced: none."),
    FindingSpec("dkn_factcheck", "DKNs help fact-checking", "Chen et al. 2024 (after AMIG, 2024)",
                "Judging a claim false when the mean attribution of its relation's degenerate knowledge neurons "
                "is below a threshold checks facts better than the same with knowledge neurons and better than "
                "asking the model, on simple and on complex statements.",
                "reproduced: on the held-out claims the DKN checker's F1 exceeds both the KN checker's and the "
                "prompt checker's, on simple and on complex statements; partly reproduced: it exceeds one of them "
                "on some statement form; not reproduced: it exceeds neither on any form; inconclusive: the DKN "
                "checker abstains (no relation-level DKNs) or judges fewer than 8 test claims (an undefined F1 "
                "counts as 0)."),
    FindingSpec("sparse_circuits", "Faithful sparse knowledge circuits", "Yao et al. 2024; Ou et al. 2025",
                "A circuit of a few percent of the model's edges reproduces most of its behaviour on the facts.",
                "reproduced: held-out faithfulness >= 0.8 with at most 5% of the edges (the largest model "
                "with a circuit run is used); partly reproduced: faithfulness >= 0.5 at any size; not "
                "reproduced: below 0.5."),
    FindingSpec("krel_kcompl", "Relevant knowledge is learned faster than new", "Ou et al. 2025",
                "During continual pre-training, new facts about known entities (K_rel) are acquired faster than "
                "facts about new entities (K_compl).",
                "reproduced: K_rel reaches half its final accuracy at an earlier checkpoint than K_compl (or, "
                "at equal checkpoints, in the training run's own finer evaluation); partly reproduced: only its "
                "accuracy averaged over training is higher; not reproduced otherwise."),
    FindingSpec("formation_optimization", "Circuits form, then optimise", "Ou et al. 2025",
                "A circuit's edges first change fast (formation), then slowly (optimisation): the Jaccard "
                "similarity with the final circuit over training has a knee after which it flattens.",
                "reproduced: the two-segment fit of edge Jaccard with the final circuit against log step has "
                "its knee with a flatter slope after than before (phase_shift_flattens) and improves on one "
                "line by >= 30%; inconclusive: fewer than 4 checkpoints; not reproduced otherwise."),
    FindingSpec("deep_to_shallow", "Knowledge surfaces deep first, then shallow", "Ou et al. 2025",
                "Over training, the layer at which the answer can be read out moves from deep layers to "
                "shallower ones.",
                "reproduced: Kendall's tau between layer and the step at which the answer surfaces there "
                "(logit lens) is negative with one-sided p < 0.05; inconclusive: fewer than 3 layers surface; "
                "not reproduced otherwise."),
    FindingSpec("core_region", "A ~1% core region is essential to every language", "Zhang et al. 2024",
                "Zeroing the ~1% most important parameters (over several languages) wrecks perplexity in every "
                "language; zeroing the least important or a random 1% barely matters.",
                "reproduced: zeroing the core region raises perplexity on every corpus by at least 10x while the "
                "bottom and the random region each change it by less than 1.5x; partly reproduced: the core "
                "criterion holds but a control changes perplexity by 1.5x or more on some corpus; not reproduced: "
                "the core region raises some corpus's perplexity by less than 10x; inconclusive: fewer than two "
                "corpora."),
    FindingSpec("dimension_dependency", "The core region hangs on a few dimensions", "Zhang et al. 2024",
                "The core region concentrates on a few hidden dimensions; perturbing even one of them breaks "
                "the model.",
                "reproduced: on one of the most core-dense hidden dimensions (engram regions --dimensions, default "
                "8), perturbing the single most important core parameter raises every corpus's perplexity at "
                "least 10x while its same-matrix control (off those and the massive-activation dimensions) "
                "changes none by 1.5x or more; partly reproduced: some such perturbation at least doubles every "
                "corpus's perplexity; not reproduced otherwise; inconclusive: not measured."),
    FindingSpec("freezing", "Freezing the core region reduces forgetting", "Zhang et al. 2024",
                "Freezing the core region during further training in one language keeps the others' perplexity "
                "from degrading.",
                "reproduced: with nothing frozen the other corpora's perplexity rises (forgetting >= 1.05x, the "
                "geometric mean of their end/start perplexity), and with the core region frozen it keeps at most "
                "75% of that rise in log terms and less than with a random region of the same size frozen; "
                "partly reproduced: less than unfrozen only; not reproduced: not less; inconclusive: no "
                "forgetting to reduce, or an arm missing."),
    FindingSpec("trace_mlp_peak", "MLP effect at the last subject token peaks early-to-middle",
                "Meng et al. 2022",
                "Causal tracing: restoring the MLP outputs (a window of layers) at the last subject token into a run "
                "with a noised subject brings back much of the answer's probability, most strongly in the "
                "early-to-middle layers.",
                "reproduced: the mean MLP indirect effect at the last subject token peaks at a layer <= 0.6 (L - 1) "
                "and that peak is at least a quarter of the mean total effect (P_clean - P_corrupt); partly "
                "reproduced: it peaks there but is smaller; not reproduced: it peaks in the last 40% of the layers; "
                "inconclusive: no facts traced, or the noise changes P(answer) by less than 0.01 on average."),
    FindingSpec("language_knowledge", "Knowledge regions are apart from the linguistic region",
                "the seed's suggestion, after Zhang et al. 2024",
                "The parameters most important for a model's facts (its answer tokens) are not those most "
                "important for the language the facts are stated in (the template tokens): zeroing each costs "
                "its own side most.",
                "reproduced: with base accuracy >= 0.3, zeroing the knowledge region lowers fact accuracy by >= 0.2 "
                "and >= 2x what zeroing the language region does, zeroing the language region raises the "
                "template tokens' perplexity more (and >= 1.5x), and the two regions overlap with Jaccard < 0.5; "
                "partly reproduced: one of the two dissociations; not reproduced: neither; inconclusive: base "
                "accuracy below 0.3 or no regions run on facts."),
)

FINDING_KEYS = tuple(f.key for f in FINDINGS)


def spec(key: str) -> FindingSpec:
    for f in FINDINGS:
        if f.key == key:
            return f
    raise KeyError(f"unknown finding {key!r}; known: {', '.join(FINDING_KEYS)}")


__all__ = ["FINDINGS", "FINDING_KEYS", "FindingSpec", "spec"]
