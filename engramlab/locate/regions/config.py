"""``RegionConfig``: the settings of ``find_regions`` (``engram regions``), and the names they choose from.

Only the standard library and ``engramlab.config`` are imported, so the command line builds
``engram regions``' flags (and refuses a bad value) without loading torch. The names below are the
ones ``importance``, ``masks`` and ``perplexity`` accept (tests/test_regions_find.py checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import check, option, validate

METHODS = ("snip", "snip-abs", "wanda")   # engramlab.locate.regions.importance.METHODS
SCOPES = ("tensor", "global")             # engramlab.locate.regions.masks.SCOPES
NORMALIZE = ("total", "none")             # engramlab.locate.regions.masks.NORMALIZE
PPL_MODES = ("token", "batch_mean")       # engramlab.models.perplexity.MODES


@dataclass
class RegionConfig:
    """Settings of ``find_regions``; defaults are the ``engram regions`` defaults (the paper's 1%
    core region by snip, per tensor, over chunks of 512 tokens)."""

    method: str = option("snip", "Importance: snip (|θ·Σ∇L|, gradients summed over the corpus first) | snip-abs "
                         "(Σ|θ·∇L| per batch) | wanda (|W|·‖X‖₂, forward only).", choices=METHODS)
    ratio: float = option(0.01, "Size of the core, bottom and random regions, a fraction of the region tensors' "
                          "entries (0.01 is 1%).", range=(0, 1), open_low=True, open_high=True)
    scope: str = option("tensor", "tensor (the same fraction of every matrix, the reference's budget) | global "
                        "(the top entries of all matrices together).", choices=SCOPES)
    seq_len: int = option(512, "Tokens per chunk.", range=(2, None))
    max_chunks: int | None = option(32, "Importance chunks per corpus, at most: the first ones (None: every "
                                    "chunk not held out).", range=(1, None), integer=True)
    eval_chunks: int = option(4, "Held-out chunks per corpus for perplexity: the last ones of each corpus, "
                              "never used for importance.", range=(1, None))
    batch_size: int = option(8, "Chunks per forward/backward pass.", range=(1, None))
    include_norms: bool = option(False, "Also count the weight vectors of each layer's two residual norms "
                                 "(default: the block weight matrices only).")
    normalize: str = option("total", "Core score: total (each corpus's importance divided by its total first, so "
                            "every corpus weighs the same) | none (the reference's raw sum).", choices=NORMALIZE)
    specific_q: float = option(0.01, "Language-specific region: a corpus's top q...", range=(0, 1),
                               open_low=True, open_high=True)
    specific_p: float = option(0.01, "...minus the top p of every other corpus (Wei et al. 2024's set "
                               "difference).", range=(0, 1), open_low=True, open_high=True)
    ppl_mode: str = option("token", "Perplexity: token (exp of the token-weighted mean loss) | batch_mean (exp of "
                           "the mean of per-batch mean losses, the reference's).", choices=PPL_MODES)
    zero_tops: bool = option(True, "Also measure every corpus with each corpus's own top region zeroed "
                             "(<corpus>.ppl_without_top_<other>): does one language's region serve the others?")
    random_repeats: int = option(1, "Random control regions to measure (seeds seed, seed+1, ...): the summary "
                                 "gives the min and max of their perplexity ratios.", range=(1, None))
    dimensions: int = option(8, "Dimension dependency (corpora only): perturb the single most important core "
                             "parameter on each of this many most core-dense hidden dimensions, and cross-check "
                             "them with the massive activations (0: skip).", range=(0, None))
    dimension_op: str = option("zero", "How that one parameter is perturbed: zero | scale:C (multiply by C, "
                               "e.g. scale:-10).")
    massive_ratio: float = option(100.0, "A hidden dimension's activations are massive when their largest "
                                  "magnitude exceeds this many times the median dimension's.", range=(1, None),
                                  open_low=True)
    save_importance: bool = option(False, "Also write each corpus's importance scores "
                                   "(importance_<corpus>.safetensors, float32: 4 bytes per parameter).")
    seed: int = 0  # the random control region

    def __post_init__(self):
        validate(self)
        op = self.dimension_op
        scale = op.startswith("scale:") and _is_float(op[len("scale:"):])
        check(self, "dimension_op", op == "zero" or scale, "use zero or scale:C with C a number, e.g. scale:-10")
        check(self, "include_norms", not (self.include_norms and self.method == "wanda"),
              "wanda scores weight matrices only (norms have no input columns); leave norms out or use snip")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
