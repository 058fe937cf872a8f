"""Edge attribution: EAP, EAP-IG over the input embeddings, and clean-corrupted scoring.

The score of edge u -> v, for one example, is

    S(u -> v) = sum_pos (a_u(ablated) - a_u(clean)) . g_v

where a_u (pos, d_model) is what writer u adds to the residual stream, a_u(ablated) is what the
edge carries once it is cut (``ablation``: the corrupted run's a_u for ``corrupted``, 0 for
``zero``, a_u's mean over the prompts' real tokens for ``mean``; the same values the evaluation
patches in, ``hooks.ablated_values``), and g_v is the gradient of the metric with respect to the
input of reader v *through that reader only*. S estimates metric(edge cut) - metric(clean); the
sign is that of the metric (+logit_diff), the opposite of EAP-IG, which attributes a loss.

The methods differ in where g_v is taken. With e_abl the ablated input embeddings (resid_pre of
layer 0: the corrupted prompt's, 0, or the mean input embedding) and e_clean the clean ones:

* ``eap``: at the clean input;
* ``eap-ig``: sum_k w_k g_v(x_k) over points x_k = e_abl + alpha_k (e_clean - e_abl) of the
  integration rule (``integration.integration_points``): ``right`` alpha_k = k/m, k = 1..m (the
  default; Hanna et al. 2024 and the DynamicKnowledgeCircuits fork), ``left`` k = 0..m-1
  (upstream hannamw/EAP-IG v2), ``trapezoid`` k = 0..m with half weights at the ends. Every pass
  runs the clean token ids; only the embeddings are replaced;
* ``clean-corrupted``: the average of the gradients at e_clean and at e_abl.

Under ``corrupted`` this is EAP-IG-inputs exactly. Under ``zero``/``mean`` it is EAP's
``get_scores_eap`` zero/mean scoring for ``eap`` (difference ablated - clean, gradient at the clean
input); for ``eap-ig`` the path starts at the ablated input embeddings, where the model runs on its
own from there (upstream EAP-IG allows only patching for EAP-IG-inputs). Its start is exactly the
"every edge ablated" state when the model maps a zero input to zero writer outputs (bias-free
RMSNorm models such as Llama/SmolLM2 under ``zero``); otherwise (biases, ``mean``) it is the model
run on the ablated input, an approximation of that state.

Scores are summed over the examples of a batch; ``attribute_edges`` averages over all examples.

How g_v is obtained without a copy of the residual stream per head. Every reader of layer l reads
the same residual x through a norm N. For the query of head h, q_h = N(x) @ W_Q[h] + b, so

    g_{q,h} = J_N(x)^T (W_Q[h] dM/dq_h)

dM/dq_h comes from a gradient hook (``lm.hooks.grad``) on the ``attn.q`` site (likewise
``attn.k``/``attn.v``, one per key/value head with grouped-query attention);
``readers.AttentionReaders`` applies W_Q[h] and the norm's Jacobian. The MLP and the logits each
read through their own norm, so the gradient of that norm's input as the branch reads it (the
``mlp.in`` and ``ln_final.in`` sites, the branch's share only) is their g_v directly. The gradient
of ``attn.in`` is the trigger for a layer: it is complete only after every q/k/v gradient of the
layer.

Cost. The integration points run one after another, not as one m-times-larger batch (that would
need m times the activation memory). During the passes only small per-reader sums are kept: the
head-space gradients, the MLP/logit gradients and the normalised residuals x_hat, and only at the
positions where the two runs can differ. Then one no-grad forward of the clean and corrupted
prompts together (of the clean prompts only under ``zero``/``mean``) records the differences of
their writer outputs, and the activation differences (positions x n_writers x d_model, the largest
tensor here) are formed from them in chunks and multiplied with the sums (``sums.GradientSums``).
So peak memory stays near one forward+backward and the time near m of them. Logits are computed at
each row's last real token only.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from engramlab.errors import EngramError
from engramlab.locate import integration
from engramlab.locate.circuits.config import ABLATIONS, METHODS, METRICS, check_method  # noqa: F401 (re-exported)
from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import ablated_values, answer_logits, input_embeddings, writer_hooks
from engramlab.locate.circuits.sums import GradientSums, kept_positions
from engramlab.models.hooks import site_name


def metric_values(logits: torch.Tensor, batch: PairBatch, metric: str) -> torch.Tensor:
    """Per-example metric from the logits at each row's last real token: (b, vocab) -> (b,).

    ``logit_diff``: logit of the clean answer minus logit of the corrupted answer;
    ``logprob``: log-probability of the clean answer."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    if metric == "logit_diff":
        return logits[rows, batch.clean_answer] - logits[rows, batch.corrupt_answer]
    return logits.log_softmax(-1)[rows, batch.clean_answer]


def integration_points(method: str, steps: int, rule: str = "right") -> list[tuple[float, float]]:
    """(alpha, weight) pairs: gradients are taken at e_abl + alpha (e_clean - e_abl). ``eap`` and
    ``clean-corrupted`` have fixed points; ``eap-ig`` follows ``rule`` with ``steps`` intervals."""
    if method == "eap":
        return [(1.0, 1.0)]
    if method == "clean-corrupted":
        return [(1.0, 0.5), (0.0, 0.5)]
    return integration.integration_points(rule, steps)


@dataclass
class CorruptedRun:
    """What the no-grad forward of one batch's clean and corrupted prompts (the one the scores are
    made from, under corrupted ablation) also gives an evaluator of the same pairs, so that it
    need not run them again (``CircuitEvaluator(runs=...)``).

    clean_logits, corrupt_logits  (b, vocab) at each row's last real token
    acts                          (n_writers, b, pos, d_model) float32, the corrupted run's writer outputs
    """

    clean_logits: torch.Tensor
    corrupt_logits: torch.Tensor
    acts: torch.Tensor


@contextmanager
def _recording(lm, graph: CircuitGraph, batch: PairBatch, out: list):
    """Around a forward pass of the clean and corrupted prompts stacked (2b rows): append its
    ``CorruptedRun`` to ``out`` (the corrupted half's writer outputs, both halves' logits)."""
    b, found = len(batch), {}

    def store(first: int, acts: torch.Tensor) -> None:  # (n, b, pos, d): the corrupted half
        if "acts" not in found:
            found["acts"] = torch.empty(graph.n_writers, *acts.shape[1:3], lm.adapter.d_model, device=acts.device)
        found["acts"][first: first + acts.shape[0]] = acts.float()

    def final(x: torch.Tensor) -> None:  # (2b, pos, d): the input of the final norm
        found["final"] = x

    with writer_hooks(lm, graph, store, writer_major=True, rows=slice(b, None)), lm.hooks.hook("ln_final.in", final):
        yield
    rows = torch.arange(b, device=batch.last.device)
    x = found["final"]
    ends = torch.cat([x[:b][rows, batch.last], x[b:][rows, batch.last]])  # (2b, d)
    with torch.no_grad():
        logits = lm.adapter.unembed.forward(lm.adapter.final_norm.forward(ends))
    out.append(CorruptedRun(logits[:b], logits[b:], found["acts"]))


def attribute_batch(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", closed_form: bool = True, rule: str = "right",
                    ablation: str = "corrupted", ablated: torch.Tensor | None = None,
                    runs: list | None = None) -> torch.Tensor:
    """Edge scores summed over the rows of ``batch``: (n_writers, n_readers) float32.

    ``ablated`` (n_writers, d_model): the values cut edges carry under ``zero``/``mean``
    (``hooks.ablated_values``); computed from this batch when not given. Invalid (non-causal)
    entries stay 0. ``closed_form=False`` pulls every gradient through the attention norms with
    torch.func instead (slower, more memory; for checking). ``runs``: under corrupted ablation,
    the batch's ``CorruptedRun`` is appended to this list."""
    check_method(method, steps, metric, rule, ablation)
    clean = input_embeddings(lm, batch.clean_ids, batch.mask)
    if ablation == "corrupted":
        ablated = None
        start = input_embeddings(lm, batch.corrupt_ids, batch.mask)
        keep = kept_positions(batch.clean_ids, batch.corrupt_ids, batch.mask)
    else:
        if ablated is None:
            ablated = ablated_values(lm, graph, [batch], ablation)
        ablated = ablated.to(device=clean.device, dtype=torch.float32)
        start = ablated[0].to(clean.dtype).expand_as(clean).clone()
        keep = batch.mask.bool().flatten().nonzero().flatten()  # every real token can differ
    embeds = {1.0: clean, 0.0: start}
    sums = GradientSums(lm, graph, keep, closed_form)
    for alpha, weight in integration_points(method, steps, rule):
        point = embeds[alpha] if alpha in embeds else embeds[0.0] + alpha * (embeds[1.0] - embeds[0.0])
        point = point.detach().requires_grad_(True)
        with ExitStack() as stack:
            stack.enter_context(lm.hooks.hook(site_name("resid_pre", 0), lambda x: point))
            sums.hooks(stack, weight)
            logits = answer_logits(lm, batch.clean_ids, batch.mask, batch.last)
            torch.autograd.grad(metric_values(logits, batch, metric).sum(), point)
    record = _recording(lm, graph, batch, runs) if runs is not None and ablated is None else nullcontext()
    with record:
        diff = sums.output_differences(batch, corrupted=ablated is None)
    scores = sums.scores(diff, embeds, ablated)
    if not bool(torch.isfinite(scores).all()):
        # Seen with zero ablation: at alpha = 0 the input is 0, every pre-norm residual is 0 in a
        # bias-free model, and each norm's Jacobian is 1/sqrt(eps): the gradient overflows.
        at_zero = any(alpha == 0.0 for alpha, _ in integration_points(method, steps, rule))
        hint = (" at the ablated input (alpha = 0, where a zero residual makes each norm's Jacobian "
                "1/sqrt(eps)); use --ig-rule right with --method eap-ig, or --method eap" if at_zero else "")
        raise EngramError(f"edge scores are not finite under --ablation {ablation} with --method {method}"
                          f"{' --ig-rule ' + rule if method == 'eap-ig' else ''}: the gradient overflowed{hint}")
    return scores


def attribute_edges(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", batch_size: int = 8, progress=None, rule: str = "right",
                    ablation: str = "corrupted", runs: list | None = None) -> torch.Tensor:
    """Edge scores averaged over every example of ``batch``: (n_writers, n_readers) float32 on CPU.

    Under ``mean`` the means are over every real token of all of ``batch`` (as the evaluation of
    the same pairs takes them). ``progress`` wraps the chunk iterator (e.g. a progress bar).
    ``runs``: under corrupted ablation, each chunk's ``CorruptedRun`` is appended to this list, in
    the order of ``batch.chunks(batch_size)``."""
    check_method(method, steps, metric, rule, ablation)
    if len(batch) == 0:
        raise EngramError("no clean/corrupted pairs to attribute; check the facts and the filters")
    total = torch.zeros(graph.n_writers, graph.n_readers)
    chunks = list(batch.chunks(batch_size))
    ablated = ablated_values(lm, graph, chunks, ablation)
    for chunk in (progress(chunks) if progress else chunks):
        total += attribute_batch(lm, graph, chunk, method, steps, metric, rule=rule, ablation=ablation,
                                 ablated=ablated, runs=runs).cpu()
    return total / len(batch)
