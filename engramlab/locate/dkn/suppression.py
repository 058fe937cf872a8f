"""P(target) with sets of MLP neurons scaled: the measurement behind every DKN check.

Kept apart from the DKN search (``find``, ``search``) and its analyses (``robustness``,
``evolvability``). The numbers come from ``engramlab.models.scoring``: one row per neuron set,
each row with its own ``NeuronScale``, so every subset a search tests costs one row of a batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.locate.dkn.config import POSITIONS
from engramlab.models.loading import LoadedModel
from engramlab.models.prefix import PrefixCache
from engramlab.models.scoring import Neuron, NeuronScale, encode, target_logprobs



def prompt_prefix(lm: LoadedModel, prompt_ids: Sequence[int], positions: str = "last") -> PrefixCache | None:
    """The shared-prefix cache that ``scaled_target_probs`` can reuse for this prompt: positions
    0..P-2 run once. None where it cannot help: ``positions="all"`` edits the prefix too, and a
    one-token prompt has no prefix."""
    if positions == "last" and len(prompt_ids) > 1:
        return PrefixCache.run(lm, list(prompt_ids)[:-1])
    return None


@torch.no_grad()
def scaled_target_probs(lm: LoadedModel, prompt: str | Sequence[int], target_ids: Sequence[int],
                        neuron_sets: Sequence[Sequence[Neuron]], factors: float | Sequence[float] = 0.0,
                        positions: str = "last", batch_size: int = 64, *,
                        prefix: PrefixCache | None = None) -> np.ndarray:
    """P(target | prompt) with each neuron set's activations multiplied by its factor, (len(sets),) float64.

    P(target) is teacher-forced: prod_j P(t_j | prompt, t_<j) over the target tokens t
    (``engramlab.models.scoring.target_logprobs``). ``positions="last"`` scales the neurons at the
    last prompt token only, ``"all"`` at every position. With ``"last"`` nothing before the last
    prompt token can change (the model is causal), so the prompt prefix runs once
    (``prompt_prefix``; pass ``prefix=`` to reuse one across calls) and every row only computes the
    segment (last prompt token + target tokens but the last) on its keys/values.
    """
    if positions not in POSITIONS:
        raise EngramError(f"positions={positions!r}: choose one of {', '.join(POSITIONS)}")
    ids, target = encode(lm, prompt), list(target_ids)
    factors = [float(factors)] * len(neuron_sets) if isinstance(factors, (int, float)) else list(factors)
    if prefix is None:
        prefix = prompt_prefix(lm, ids, positions)
    where = "all" if positions == "all" else "prompt_end"
    edits = [NeuronScale(s, f, where) for s, f in zip(neuron_sets, factors)]
    n = len(edits)
    logp = target_logprobs(lm, [ids] * n, [target] * n, edits=edits, prefix=prefix, batch_size=batch_size)  # (n,)
    return logp.exp().cpu().double().numpy() if n else np.zeros(0)
