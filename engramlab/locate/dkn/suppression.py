"""P(target) with sets of MLP neurons scaled: the measurement behind every DKN check.

Kept apart from the DKN search (``degenerate``) and its analyses (``dkn_analyses``,
``dkn_robustness``), which all use it.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from typing import Sequence

import numpy as np
import torch

from engramlab.models.scoring import Neuron
from engramlab.models.loading import LoadedModel


@torch.no_grad()
def scaled_target_probs(lm: LoadedModel, prompt: str, target_ids: Sequence[int], neuron_sets: Sequence[Sequence[Neuron]],
                        factors: float | Sequence[float] = 0.0, positions: str = "last",
                        batch_size: int = 64) -> np.ndarray:
    """P(target | prompt) with each neuron set's activations multiplied by its factor, (len(sets),).

    P(target) is teacher-forced: prod_j P(t_j | prompt, t_<j) over the target tokens t, the same
    objective as ``engramlab.locate.neurons.target_probability`` (tested against it).
    ``positions="last"`` scales the neurons at the last prompt token only, ``"all"`` at every
    position. Row r of a batch scales set r, so
    every subset a search tests costs one row. With ``"last"`` nothing before the last prompt
    token can change (the model is causal), so the prompt prefix runs once and every row only
    computes the segment (last prompt token + target tokens but the last) on its keys/values.
    """
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = list(target_ids)
    factors = [float(factors)] * len(neuron_sets) if isinstance(factors, (int, float)) else list(factors)
    prefix = None
    if positions == "last" and len(prompt_ids) > 1:
        prefix = lm.model(input_ids=torch.tensor([prompt_ids[:-1]], device=lm.device), use_cache=True).cache
        segment, where = prompt_ids[-1:] + target_ids[:-1], [0]
    else:
        segment = prompt_ids + target_ids[:-1]
        where = None if positions == "all" else [len(prompt_ids) - 1]
    target = torch.tensor(target_ids, device=lm.device)
    d_mlp, out = lm.adapter.d_mlp, []
    for start in range(0, len(neuron_sets), batch_size):
        rows = neuron_sets[start:start + batch_size]
        scales: dict[int, torch.Tensor] = {}
        for r, (neurons, f) in enumerate(zip(rows, factors[start:start + batch_size])):
            for l, i in neurons:
                scales.setdefault(l, torch.ones(len(rows), d_mlp, dtype=lm.dtype, device=lm.device))[r, i] = f
        cache = None
        if prefix is not None:  # a fresh copy per batch: the forward pass appends to the cache
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(rows))
        with ExitStack() as stack:
            for l, s in scales.items():
                stack.enter_context(lm.hooks.edit(f"blocks.{l}.mlp.neurons", lambda t, s=s: t * s[:, None, :],
                                                  positions=where))
            logits = lm.model(input_ids=torch.tensor([segment] * len(rows), device=lm.device), cache=cache,
                              use_cache=cache is not None, logits_to_keep=len(target_ids)).logits
        # The last len(target) positions predict the target tokens, one each.
        logp = logits[:, -len(target_ids):].float().log_softmax(-1)
        out.append(logp.gather(-1, target.expand(len(rows), -1)[..., None]).sum(dim=(1, 2)).exp().cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)
