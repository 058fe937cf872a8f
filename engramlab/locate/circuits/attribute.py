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

Completeness. Every path from the input to the metric leaves the input node through one of its
edges, and each reader v of the input reads the residual stream, which holds e additively; so the
gradient of the metric with respect to the input embeddings is the sum of the gradients through
each reader alone, dM/de = sum_v g_v. Summed over the input's edges (row 0 of the score matrix),
for one example:

    sum_v S(input -> v) = sum_pos (e_abl - e_clean) . sum_k w_k dM/de(x_k)
                        ~ (e_abl - e_clean) . integral_0^1 dM/de(x(alpha)) d alpha = M(e_abl) - M(e_clean)

(the fundamental theorem of calculus along the straight path; M(e_abl) is the model on the
ablated input embeddings: the corrupted run under ``corrupted``). The completeness error of an
example is |sum_v S(input -> v) - (M(e_abl) - M(e_clean))| / |M(e_abl) - M(e_clean)|
(``completeness_errors``): 0 for the exact integral, so it measures the integration rule's error.
``attribute_batch`` forms the left side from the gradient of each pass with respect to its input
embeddings (which autograd returns anyway), weighted and summed: the same number as row 0 of the
batch's scores (tests/test_circuit_scores.py checks the two agree), but per example. The end
metrics come from passes and forwards that run anyway: the alpha = 1 pass (clean) or the closing
forward, the closing forward's corrupted half, an alpha = 0 pass; only under zero/mean without
an alpha = 0 point does the ablated input need one more no-grad forward.

Cost. The integration points run one after another, not as one m-times-larger batch (that would
need m times the activation memory). During the passes only small per-reader sums are kept: the
head-space gradients, the MLP/logit gradients and the normalised residuals x_hat, and only at the
positions where the two runs can differ. Then one no-grad forward of the clean and corrupted
prompts together (of the clean prompts only under ``zero``/``mean``) records the differences of
their writer outputs, and the activation differences (positions x n_writers x d_model, the largest
tensor here) are formed from them in chunks and multiplied with the sums (``sums.GradientSums``).
So peak memory stays near one forward+backward and the time near m of them. When a rule has
alpha = 1 (right, trapezoid, eap), that pass also records the clean writer outputs at the kept
positions and the clean logits, so the closing forward runs the corrupted prompts only (under
zero/mean: no closing forward at all). Under ``corrupted`` the tokens every prompt of the batch
starts with (``hooks.shared_prefix``: a relation's template before the subject) run once, and
every pass and the closing forward run only the positions after them on the prefix's cached
keys and values; nothing differs there, so no score changes. Logits are computed at each row's
last real token only.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from engramlab.errors import EngramError
from engramlab.locate import integration
from engramlab.locate.circuits.config import ABLATIONS, METHODS, METRICS, check_method  # noqa: F401 (re-exported)
from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import (ablated_values, answer_logits, input_embeddings, shared_prefix,
                                             writer_hooks)
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
def _closing(lm, graph: CircuitGraph, batch: PairBatch, sides: tuple, runs: list | None, found: dict, prefix=None):
    """Around the closing no-grad forward (``GradientSums.output_differences``), whose rows are the
    prompts of ``sides`` stacked in that order ("clean", "corrupt"; b rows each, possibly none):
    put each side's last-token logits (b, vocab) in ``found[side]``, and with ``runs`` (the
    corrupted side must be run) keep the corrupted side's writer outputs in ``found["acts"]``.
    With ``prefix`` the forward runs positions P.. only; the writer outputs at 0..P-1 (the same in
    every prompt) come from one more forward of those P tokens, one row."""
    b, skip = len(batch), (prefix.length if prefix is not None else 0)

    def store(first: int, acts: torch.Tensor) -> None:  # (n, b, pos, d): the corrupted side
        if "acts" not in found:
            found["acts"] = torch.empty(graph.n_writers, *acts.shape[1:3], lm.adapter.d_model, device=acts.device)
        found["acts"][first: first + acts.shape[0]] = acts.float()

    def final(x: torch.Tensor) -> None:  # (len(sides) b, pos, d): the input of the final norm
        found["final"] = x

    with ExitStack() as stack:
        stack.enter_context(lm.hooks.hook("ln_final.in", final))
        if runs is not None:
            at = sides.index("corrupt") * b
            stack.enter_context(writer_hooks(lm, graph, store, writer_major=True, rows=slice(at, at + b)))
        yield
    if runs is not None and skip:
        head: dict = {}

        def store_head(first: int, acts: torch.Tensor) -> None:  # (n, 1, P, d)
            head[first] = acts.float()

        with torch.no_grad(), writer_hooks(lm, graph, store_head, writer_major=True):
            lm.model.base_model(input_ids=batch.clean_ids[:1, :skip])
        start = torch.cat([head[k] for k in sorted(head)]).expand(-1, b, -1, -1)  # (n_writers, b, P, d)
        found["acts"] = torch.cat([start, found["acts"]], 2)
    if "final" in found:
        rows = torch.arange(b, device=batch.last.device)
        x = found.pop("final")
        ends = torch.cat([x[i * b: (i + 1) * b][rows, batch.last - skip] for i in range(len(sides))])  # (sides b, d)
        with torch.no_grad():
            logits = lm.adapter.unembed.forward(lm.adapter.final_norm.forward(ends))
        for i, side in enumerate(sides):
            found[side] = logits[i * b: (i + 1) * b]


def attribute_batch(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", closed_form: bool = True, rule: str = "right",
                    ablation: str = "corrupted", ablated: torch.Tensor | None = None,
                    runs: list | None = None, completeness: list | None = None,
                    share_prefix: bool = True) -> torch.Tensor:
    """Edge scores summed over the rows of ``batch``: (n_writers, n_readers) float32.

    ``ablated`` (n_writers, d_model): the values cut edges carry under ``zero``/``mean``
    (``hooks.ablated_values``); computed from this batch when not given. Invalid (non-causal)
    entries stay 0. ``closed_form=False`` pulls every gradient through the attention norms with
    torch.func instead (slower, more memory; for checking). ``runs``: under corrupted ablation,
    the batch's ``CorruptedRun`` is appended to this list. ``completeness``: the batch's
    ``{"attribution", "difference"}`` (b,) each is appended to it (see ``completeness_errors``).
    ``share_prefix``: under corrupted ablation, run the tokens every prompt of the batch starts
    with once (``hooks.shared_prefix``; nothing differs there, so every score is unchanged) and
    only the rest in each pass; False runs every position (for tests)."""
    check_method(method, steps, metric, rule, ablation)
    clean = input_embeddings(lm, batch.clean_ids, batch.mask)
    prefix, skip = None, 0
    if ablation == "corrupted":
        ablated = None
        start = input_embeddings(lm, batch.corrupt_ids, batch.mask)
        prefix = shared_prefix(lm, batch) if share_prefix else None
        if prefix is not None:  # the passes and the closing forward run positions skip.. only
            skip = prefix.length
            clean, start = clean[:, skip:], start[:, skip:]
        keep = kept_positions(batch.clean_ids[:, skip:], batch.corrupt_ids[:, skip:], batch.mask[:, skip:])
    else:
        if ablated is None:
            ablated = ablated_values(lm, graph, [batch], ablation)
        ablated = ablated.to(device=clean.device, dtype=torch.float32)
        start = ablated[0].to(clean.dtype).expand_as(clean).clone()
        keep = batch.mask.bool().flatten().nonzero().flatten()  # every real token can differ
    embeds = {1.0: clean, 0.0: start}
    sums = GradientSums(lm, graph, keep, closed_form)
    # What the passes give besides the sums: at alpha = 1 (the clean input) the clean writer
    # outputs and logits, so the closing forward need not run the clean prompts again; at alpha = 0
    # the metric at the start; for the completeness check, sum_k w_k dM/de(x_k) (b, pos, d).
    # The clean outputs are kept from the pass only when a shared prefix shortens the positions:
    # over every position (subject-first prompts) they add a full copy of the writer outputs to
    # the pass's own activations, which raised the peak memory to 1.59x of a plain pass and saved
    # no measurable time (issue 14's benchmark), so there the closing forward runs them again.
    clean_run: dict = {}
    reuse_clean = prefix is not None
    ends: dict = {}
    path_grad = torch.zeros(clean.shape, dtype=torch.float32, device=clean.device)
    for alpha, weight in integration_points(method, steps, rule):
        point = embeds[alpha] if alpha in embeds else embeds[0.0] + alpha * (embeds[1.0] - embeds[0.0])
        point = point.detach().requires_grad_(True)
        with ExitStack() as stack:
            stack.enter_context(lm.hooks.hook(site_name("resid_pre", 0), lambda x: point))
            sums.hooks(stack, weight)
            if alpha == 1.0 and reuse_clean and not clean_run:
                sums.record_outputs(stack, clean_run)
            logits = answer_logits(lm, batch.clean_ids, batch.mask, batch.last, prefix)
            values = metric_values(logits, batch, metric)
            (grad,) = torch.autograd.grad(values.sum(), point)
        path_grad.add_(grad.float(), alpha=weight)
        if alpha in (0.0, 1.0):
            ends[alpha] = (logits.detach(), values.detach())
    corrupted = ablated is None
    sides = (() if clean_run else ("clean",)) + (("corrupt",) if corrupted else ())
    found: dict = {}
    with _closing(lm, graph, batch, sides, runs if corrupted else None, found, prefix):
        diff = sums.output_differences(batch, corrupted=corrupted, clean=clean_run or None, prefix=prefix)
    clean_logits = ends[1.0][0] if clean_run else found["clean"]
    if runs is not None and corrupted:
        runs.append(CorruptedRun(clean_logits, found["corrupt"], found["acts"]))
    if completeness is not None:
        if corrupted:
            m_start = metric_values(found["corrupt"], batch, metric)
        elif 0.0 in ends:
            m_start = ends[0.0][1]
        else:  # the model on the ablated input, which no pass visited (zero/mean without alpha = 0)
            with torch.no_grad(), lm.hooks.hook(site_name("resid_pre", 0), lambda x: start):
                m_start = metric_values(answer_logits(lm, batch.clean_ids, batch.mask, batch.last), batch, metric)
        m_clean = metric_values(clean_logits, batch, metric)
        # sum over the input's edges of S = (e_abl - e_clean) . sum_k w_k dM/de(x_k), per row
        attribution = ((start.float() - clean.float()) * path_grad).sum((1, 2))
        completeness.append({"attribution": attribution.cpu(), "difference": (m_start - m_clean).float().cpu()})
    scores = sums.scores(diff, embeds, ablated)
    if not bool(torch.isfinite(scores).all()):
        # Seen with zero ablation: at alpha = 0 the input is 0, every pre-norm residual is 0 in a
        # bias-free model, and each norm's Jacobian is 1/sqrt(eps): the gradient overflows.
        at_zero = any(alpha == 0.0 for alpha, _ in integration_points(method, steps, rule))
        hint = (" at the ablated input (alpha = 0, where a zero residual makes each norm's Jacobian "
                "1/sqrt(eps)); use --ig-rule right (or midpoint, gauss-legendre: no end point) with --method "
                "eap-ig, or --method eap" if at_zero else "")
        raise EngramError(f"edge scores are not finite under --ablation {ablation} with --method {method}"
                          f"{' --ig-rule ' + rule if method == 'eap-ig' else ''}: the gradient overflowed{hint}")
    return scores


def metric_differences(terms: list[dict]) -> list[float]:
    """Per example, |M(e_abl) - M(e_clean)| from ``attribute_batch``'s ``completeness`` terms."""
    return [abs(d) for t in terms for d in t["difference"].tolist()]


def pooled_completeness_error(errors: list[float | None], differences: list[float]) -> float | None:
    """sum_i |a_i - d_i| / sum_i |d_i| over the examples with an error: the per-example errors
    weighted by |d_i|, as the knowledge-neuron completeness error is, so a pair whose metric barely
    changes (where any rounding is a large relative error) cannot dominate. None without any."""
    pairs = [(e, d) for e, d in zip(errors, differences) if e is not None]
    total = sum(d for _, d in pairs)
    return sum(e * d for e, d in pairs) / total if total > 0 else None


def completeness_errors(terms: list[dict]) -> list[float | None]:
    """Per example, |sum of the input's edge scores - (M(e_abl) - M(e_clean))| / |M(e_abl) - M(e_clean)|
    from ``attribute_batch``'s ``completeness`` terms (in their order); None where the metric
    difference is below 1e-6 in size (no path to integrate)."""
    out = []
    for t in terms:
        for a, d in zip(t["attribution"].tolist(), t["difference"].tolist()):
            out.append(abs(a - d) / abs(d) if abs(d) >= 1e-6 else None)
    return out


def attribute_edges(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", batch_size: int = 8, progress=None, rule: str = "right",
                    ablation: str = "corrupted", runs: list | None = None,
                    completeness: list | None = None) -> torch.Tensor:
    """Edge scores averaged over every example of ``batch``: (n_writers, n_readers) float32 on CPU.

    Under ``mean`` the means are over every real token of all of ``batch`` (as the evaluation of
    the same pairs takes them). ``progress`` wraps the chunk iterator (e.g. a progress bar).
    ``runs``: under corrupted ablation, each chunk's ``CorruptedRun`` is appended to this list, in
    the order of ``batch.chunks(batch_size)``; ``completeness``: likewise each chunk's
    completeness terms (``attribute_batch``)."""
    check_method(method, steps, metric, rule, ablation)
    if len(batch) == 0:
        raise EngramError("no clean/corrupted pairs to attribute; check the facts and the filters")
    total = torch.zeros(graph.n_writers, graph.n_readers)
    chunks = list(batch.chunks(batch_size))
    ablated = ablated_values(lm, graph, chunks, ablation)
    for chunk in (progress(chunks) if progress else chunks):
        total += attribute_batch(lm, graph, chunk, method, steps, metric, rule=rule, ablation=ablation,
                                 ablated=ablated, runs=runs, completeness=completeness).cpu()
    return total / len(batch)
