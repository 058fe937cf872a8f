"""Edge attribution: EAP, EAP-IG over the input embeddings, and clean-corrupted scoring.

The score of edge u -> v, for one example, is

    S(u -> v) = sum_pos (a_u(corrupted) - a_u(clean)) . g_v

where a_u (pos, d_model) is what writer u adds to the residual stream and g_v is the gradient of
the metric with respect to the input of reader v *through that reader only*. The methods differ in
where g_v is taken:

* ``eap``: at the clean input;
* ``eap-ig``: averaged over m points on the straight line between the corrupted and the clean input
  embeddings (resid_pre of layer 0), x_k = e_corr + (k/m)(e_clean - e_corr), k = 1..m (k = m is
  the clean input; every pass runs the clean token ids, only the embeddings are replaced);
* ``clean-corrupted``: the average of the gradients at the clean and at the corrupted input.

Scores are summed over the examples of a batch; ``attribute_edges`` averages over all examples.

How g_v is obtained without a copy of the residual stream per head. Every reader of layer l reads
the same residual x through a norm N. For the query of head h, q_h = N(x) @ W_Q[h] + b, so

    g_{q,h} = J_N(x)^T (W_Q[h] dM/dq_h)

dM/dq_h comes from a tensor hook on the ``attn.q`` site (likewise ``attn.k``/``attn.v``, one per
key/value head with grouped-query attention); ``readers.AttentionReaders`` applies W_Q[h] and the
norm's Jacobian. The MLP and the logits each read through their own norm, so a hook on an alias of
that norm's input gives their gradient directly. The alias of the attention norm's input is the
trigger for a layer: its gradient is complete only after every q/k/v gradient of the layer.

Cost. The integration points run one after another, not as one m-times-larger batch (that would
need m times the activation memory). During the passes only small per-reader sums are kept: the
head-space gradients, the MLP/logit gradients and the normalised residuals x_hat, and only at the
positions where the two prompts can differ. Then one no-grad forward of the clean and corrupted
prompts together records the differences of their writer outputs, and the activation differences
(positions x n_writers x d_model, the largest tensor here) are formed from them in chunks and
multiplied with the sums (``sums.GradientSums``). So peak memory stays near one forward+backward
and the time near m of them. Logits are computed at each row's last real token only.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import answer_logits, input_embeddings
from engramlab.locate.circuits.sums import GradientSums, kept_positions

METHODS = ("eap", "eap-ig", "clean-corrupted")
METRICS = ("logit_diff", "logprob")


def check_method(method: str, steps: int, metric: str) -> None:
    if method not in METHODS:
        raise EngramError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise EngramError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngramError(f"steps must be a whole number >= 1, got {steps!r}")


def metric_values(logits: torch.Tensor, batch: PairBatch, metric: str) -> torch.Tensor:
    """Per-example metric from the logits at each row's last real token: (b, vocab) -> (b,).

    ``logit_diff``: logit of the clean answer minus logit of the corrupted answer;
    ``logprob``: log-probability of the clean answer."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    if metric == "logit_diff":
        return logits[rows, batch.clean_answer] - logits[rows, batch.corrupt_answer]
    return logits.log_softmax(-1)[rows, batch.clean_answer]


def integration_points(method: str, steps: int) -> list[tuple[float, float]]:
    """(alpha, weight) pairs: gradients are taken at e_corr + alpha (e_clean - e_corr)."""
    if method == "eap":
        return [(1.0, 1.0)]
    if method == "clean-corrupted":
        return [(1.0, 0.5), (0.0, 0.5)]
    return [(k / steps, 1.0 / steps) for k in range(1, steps + 1)]


def attribute_batch(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", closed_form: bool = True) -> torch.Tensor:
    """Edge scores summed over the rows of ``batch``: (n_writers, n_readers) float32.

    Invalid (non-causal) entries stay 0. ``closed_form=False`` pulls every gradient through the
    attention norms with torch.func instead (slower, more memory; for checking)."""
    check_method(method, steps, metric)
    embeds = {1.0: input_embeddings(lm, batch.clean_ids, batch.mask),
              0.0: input_embeddings(lm, batch.corrupt_ids, batch.mask)}
    sums = GradientSums(lm, graph, kept_positions(batch.clean_ids, batch.corrupt_ids, batch.mask), closed_form)
    for alpha, weight in integration_points(method, steps):
        point = embeds[alpha] if alpha in embeds else embeds[0.0] + alpha * (embeds[1.0] - embeds[0.0])
        point = point.detach().requires_grad_(True)
        with ExitStack() as stack:
            stack.enter_context(lm.hooks.hook("blocks.0.resid_pre", lambda x: point))
            sums.hooks(stack, weight)
            logits = answer_logits(lm, batch.clean_ids, batch.mask, batch.last)
            torch.autograd.grad(metric_values(logits, batch, metric).sum(), point)
    return sums.scores(sums.output_differences(batch), embeds)


def attribute_edges(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", batch_size: int = 8, progress=None) -> torch.Tensor:
    """Edge scores averaged over every example of ``batch``: (n_writers, n_readers) float32 on CPU.

    ``progress`` wraps the chunk iterator (e.g. a progress bar)."""
    if len(batch) == 0:
        raise EngramError("no clean/corrupted pairs to attribute; check the facts and the filters")
    total = torch.zeros(graph.n_writers, graph.n_readers)
    chunks = list(batch.chunks(batch_size))
    for chunk in (progress(chunks) if progress else chunks):
        total += attribute_batch(lm, graph, chunk, method, steps, metric).cpu()
    return total / len(batch)
