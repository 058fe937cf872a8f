"""The static score of a knowledge neuron: its direct contribution to the answer's log-probability.

After Yu and Ananiadou 2024 ("Neuron-Level Knowledge Attribution in Large Language Models"), who
score an FFN neuron of layer l by the log-probability increase of its "subvalue" v = a_n W_out[n]
(its activation times its row of the output projection) added to the residual stream,
Imp(v) = log p(w | v + h) - log p(w | h), read through the final norm and the unembedding. engramlab
uses the first-order form of that increase at the model's final residual, which needs one
forward pass and one matrix-vector product per layer instead of a vocabulary-sized projection per
neuron:

    S(l, n) = a_{l,n} * (W_out_l[n] . u),    u = d log p(t_0 | x) / d x  at  x = x_L

* a_{l,n}: neuron n of layer l at the last prompt position (site ``mlp.neurons``, the input of
  the MLP output projection), from the unedited forward;
* W_out_l (d_mlp, d_model): layer l's output projection (``adapter.W_out``; its bias, shared by
  all neurons, is nobody's);
* x_L (d_model,): the residual stream at the last prompt position entering the final norm
  (``ln_final.in``); log p(t_0 | x) = log_softmax(W_U^T norm(x))[t_0], t_0 the answer's first
  token;
* u is taken through the final norm exactly (RMSNorm or LayerNorm, its scale 1/rms(x) or 1/std(x)
  differentiated too, not frozen): the norm is linearised at x_L, not approximated.

So S(l, n) is, to first order, the drop of log p(t_0) when the neuron's write a_n W_out[n] is
removed from the final residual (removing it changes log p by -S) and nothing downstream (later
layers, attention) reacts: the
direct path only. It is not the exact increase of Yu and Ananiadou (which puts v on top of the
residual *before* layer l's FFN output and re-normalises); the two agree to first order in v,
and differ most for the few neurons whose single write moves the final norm's scale. Multi-token
answers are scored on their first token (the one the last prompt position predicts).

Cost: one forward of the prompt (the pass count records 1) plus a backward through the final norm
and the unembedding at one position, and n_layers products (d_mlp, d_model) @ (d_model,).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch

from engramlab.errors import EngramError
from engramlab.models.hooks import site_name


def logprob_direction(lm, final_resid: torch.Tensor, target_id: int) -> torch.Tensor:
    """u = d log p(target | x) / d x at x = ``final_resid`` (d_model,), through the final norm
    and the unembedding: (d_model,) float32."""
    param = next(lm.model.parameters())
    x = final_resid.detach().to(param.dtype).reshape(1, 1, -1).requires_grad_(True)
    with torch.enable_grad():
        logits = lm.adapter.unembed(lm.adapter.final_norm(x))[0, 0].float()
        value = torch.log_softmax(logits, -1)[int(target_id)]
        (u,) = torch.autograd.grad(value, x)
    return u[0, 0].float()


def static_from(lm, acts: Sequence[torch.Tensor], final_resid: torch.Tensor, target_id: int) -> torch.Tensor:
    """S (n_layers, d_mlp) from the neuron activations ``acts`` (one (d_mlp,) per layer, at the
    last prompt position) and the final residual there (d_model,). See the module docstring."""
    u = logprob_direction(lm, final_resid, target_id)
    rows = []
    for l, a in enumerate(acts):
        w_out = lm.adapter.W_out(l).detach().float()  # (d_mlp, d_model)
        rows.append(a.float().to(u.device) * (w_out.to(u.device) @ u))
    return torch.stack(rows).cpu()


@dataclass
class StaticRun:
    """scores (n_layers, d_mlp), the static score; n_passes: forward passes used (1)."""

    scores: torch.Tensor
    n_passes: int = 1


def static_scores(lm, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> StaticRun:
    """The static score of every MLP neuron for the answer ``target_ids`` (its first token) after
    ``prompt_ids``: one forward of the prompt alone."""
    if not prompt_ids or not target_ids:
        raise EngramError("the static score needs a non-empty prompt and at least one target token")
    n = lm.adapter.n_layers
    acts: list[torch.Tensor] = [None] * n
    seen: dict[str, torch.Tensor] = {}

    def recorder(l):
        def record(t):
            acts[l] = t[0, -1].detach()
        return record

    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(lm.hooks.hook(site_name("ln_final.in"), lambda t: seen.__setitem__("x", t[0, -1].detach())))
        for l in range(n):
            stack.enter_context(lm.hooks.hook(site_name("mlp.neurons", l), recorder(l)))
        lm.model(input_ids=torch.tensor([list(prompt_ids)], device=lm.device))
    return StaticRun(static_from(lm, acts, seen["x"], target_ids[0]), 1)
