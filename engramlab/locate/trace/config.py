"""``TraceConfig``: the settings of ``find_trace`` (``engram trace``), and the names they choose from.

Only the standard library and ``engramlab.config`` are imported, so the command line builds
``engram trace``'s flags (and refuses a bad value) without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engramlab.config import option, validate

#: The three kinds of restored state, in the order of the effect arrays' first axis.
KINDS = ("resid", "mlp", "attn")
#: Where sigma's standard deviation is measured (``engramlab.locate.trace.noise.embedding_std``).
NOISE_SAMPLES = ("subjects", "embedding")
#: The token kinds of the averaged heat maps, as Meng et al. (2022) plot them.
TOKEN_KINDS = ("first subject", "middle subject", "last subject", "first subsequent", "further", "last")


@dataclass
class TraceConfig:
    """Settings of ``find_trace``; the defaults are ROME's (3 sigma, window 10) except ``samples``
    (ROME averages 10 noise draws; one fixed draw per fact is the default here, for CPU cost)."""

    template: int = option(0, "Index of the prompt template to use (negative counts from the end).")
    noise: float = option(3.0, "Noise scale: the subject's input embeddings get Gaussian noise of standard "
                          "deviation noise x std(embeddings) (ROME: 3).", range=(0, None), open_low=True)
    noise_sample: str = option("subjects", "Where that std is measured: subjects (every element of the "
                               "subject tokens' embeddings over the traced facts, ROME's choice) | embedding "
                               "(every row of the embedding matrix, the same for any facts).", choices=NOISE_SAMPLES)
    samples: int = option(1, "Noise draws per fact; probabilities are averaged over them (ROME: 10).",
                          range=(1, None))
    window: int = option(10, "Layers restored together for the MLP and attention traces: the window centred on "
                         "each layer, cut at the first and last layer (ROME: 10).", range=(1, None))
    batch_size: int = option(96, "Restorations (grid cells x one noise draw) per forward pass.", range=(1, None))
    seed: int = 0  # the noise: fact k of the selection draws from seed * 1_000_003 + k

    def __post_init__(self):
        validate(self)


__all__ = ["KINDS", "NOISE_SAMPLES", "TOKEN_KINDS", "TraceConfig"]
