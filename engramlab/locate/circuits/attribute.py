"""Edge attribution: EAP, EAP-IG over the input embeddings, and clean-corrupted scoring.

The score of edge u -> v, for one example, is

    S(u -> v) = sum_pos (a_u(corrupted) - a_u(clean)) . g_v

where a_u (pos, d_model) is what writer u adds to the residual stream and g_v is the gradient of
the metric with respect to the input of reader v *through that reader only*. The methods differ in
where g_v is taken:

* ``eap``: at the clean input;
* ``eap-ig``: averaged over m points on the straight line between the corrupted and the clean input
  embeddings, x_k = e_corr + (k/m)(e_clean - e_corr), k = 1..m (k = m is the clean input);
* ``clean-corrupted``: the average of the gradients at the clean and at the corrupted input.

Scores are summed over the examples of a batch; ``attribute_edges`` averages over all examples.

How g_v is obtained without a copy of the residual stream per head. Every reader of layer l reads
the same residual x through a norm N. For the query of head h, q_h = N(x) @ W_Q[h] + b, so

    g_{q,h} = J_N(x)^T (W_Q[h] dM/dq_h)

dM/dq_h comes from a tensor hook on the ``attn.q`` site (likewise ``attn.k``/``attn.v``, one per
key/value head with grouped-query attention); W_Q[h] takes it to d_model, and ``norm_vjp`` pulls
all of a layer's readers through the norm at once. The MLP and the logits each read through their
own norm, so a hook on an alias of that norm's input gives their gradient directly. The alias of
the attention norm's input is the trigger: its gradient is complete only after every q/k/v gradient
of the layer, so the layer's scores are computed there, during the backward pass, and the per-layer
gradients are freed at once (peak memory stays close to one forward + backward).

The m integration points run one after another, not as one m-times-larger batch: a batch of m
points would need m times the activation memory, and the points share nothing a batch could reuse.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import AttentionReaders, norm_pre_hook, writer_hooks

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
    """Per-example metric at each row's last real token: logits (b, pos, vocab) -> (b,).

    ``logit_diff``: logit of the clean answer minus logit of the corrupted answer;
    ``logprob``: log-probability of the clean answer."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.last].float()  # (b, vocab)
    if metric == "logit_diff":
        return last[rows, batch.clean_answer] - last[rows, batch.corrupt_answer]
    return last.log_softmax(-1)[rows, batch.clean_answer]


def integration_points(method: str, steps: int) -> list[tuple[float, float]]:
    """(alpha, weight) pairs, alpha = 1 (the clean input) first: its forward pass also records the
    clean activations that every later gradient is multiplied with."""
    if method == "eap":
        return [(1.0, 1.0)]
    if method == "clean-corrupted":
        return [(1.0, 0.5), (0.0, 0.5)]
    return [(k / steps, 1.0 / steps) for k in range(steps, 0, -1)]


def attribute_batch(lm, graph: CircuitGraph, batch: PairBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logit_diff", closed_form: bool = True) -> torch.Tensor:
    """Edge scores summed over the rows of ``batch``: (n_writers, n_readers) float32.

    Invalid (non-causal) entries stay 0. ``closed_form=False`` pulls every gradient through the
    attention norms with torch.func each step instead (slower; for checking)."""
    check_method(method, steps, metric)
    scorer = _EdgeScorer(lm, graph, batch, closed_form)
    embeds: dict[str, torch.Tensor] = {}
    with torch.no_grad(), writer_hooks(lm, graph, scorer.store), \
            lm.hooks.hook("blocks.0.resid_pre", lambda x: embeds.__setitem__("corrupt", x.detach())):
        lm.model(input_ids=batch.corrupt_ids, attention_mask=batch.mask)

    for i, (alpha, weight) in enumerate(integration_points(method, steps)):
        with ExitStack() as stack:
            leaves: list[torch.Tensor] = []
            stack.enter_context(lm.hooks.hook("blocks.0.resid_pre", _embedding_step(alpha, embeds, leaves)))
            if i == 0:  # alpha = 1: record the clean activations
                stack.enter_context(writer_hooks(lm, graph, scorer.subtract))
            scorer.hooks(stack, weight)
            logits = lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask).logits
            if i == 0:
                scorer.mask_padding(batch.mask)
            torch.autograd.grad(metric_values(logits, batch, metric).sum(), leaves)
    return scorer.finish()


def _embedding_step(alpha: float, embeds: dict, leaves: list):
    """resid_pre of layer 0 -> a fresh leaf at e_corr + alpha (e_clean - e_corr)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if alpha == 1.0:
            embeds["clean"] = x.detach()
            point = x.detach()
        elif alpha == 0.0:
            point = embeds["corrupt"]
        else:
            point = embeds["corrupt"] + alpha * (embeds["clean"] - embeds["corrupt"])
        leaf = point.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    return fn


class _EdgeScorer:
    """The state of one batch: activation differences, scores, and gradients summed over steps.

    delta   (b*pos, n_writers, d_model) float32: a_u(corrupted) - a_u(clean), padding zeroed.
            ``delta[:, :up]`` (the writers a reader sees) is a strided batch of (up, d_model)
            matrices that bmm reads in place.
    scores  (n_writers, n_readers)

    Per step, an MLP or the logits contribute their residual gradient, and the attention readers
    of a layer their head-space g' (see ``AttentionReaders``); these are summed over steps and
    multiplied with delta once, in ``finish``. Only the x_hat . delta term changes with the step's
    norm statistics, so it is scored during each backward pass (a read of delta, no big product)."""

    def __init__(self, lm, graph: CircuitGraph, batch: PairBatch, closed_form: bool):
        self.lm, self.graph = lm, graph
        b, pos = batch.clean_ids.shape
        self.delta = torch.zeros(b * pos, graph.n_writers, lm.adapter.d_model, device=lm.device)
        self.scores = torch.zeros(graph.n_writers, graph.n_readers, device=lm.device)
        self.readers = [AttentionReaders(lm, l, closed_form) for l in range(graph.n_layers)]
        self.head_sums: dict[int, torch.Tensor] = {}   # layer -> (bp, R, d_head)
        self.resid_sums: dict[int, torch.Tensor] = {}  # reader -> (bp, d_model)

    # -- activations --------------------------------------------------------------------------
    def store(self, first: int, acts: torch.Tensor) -> None:
        self.delta[:, first: first + acts.shape[2]] = acts.flatten(0, 1)

    def subtract(self, first: int, acts: torch.Tensor) -> None:
        self.delta[:, first: first + acts.shape[2]] -= acts.detach().flatten(0, 1)

    def mask_padding(self, mask: torch.Tensor) -> None:
        # Padding positions differ between runs but no scored position reads them; zero them so
        # they cannot leak into a score.
        self.delta *= mask.reshape(-1, 1, 1).to(self.delta.dtype)

    def _times_delta(self, up: int, grads: torch.Tensor) -> torch.Tensor:
        """sum over positions of delta[:, :up] . grads, grads (bp, d_model, R) -> (up, R)."""
        return torch.bmm(self.delta[:, :up], grads).sum(0)

    # -- hooks ------------------------------------------------------------------------------------
    def hooks(self, stack: ExitStack, weight: float) -> None:
        lm, graph, a = self.lm, self.graph, self.lm.adapter
        for l in range(graph.n_layers):
            seen: dict[str, torch.Tensor] = {}
            for kind in ("q", "k", "v"):
                stack.enter_context(lm.hooks.hook(f"blocks.{l}.attn.{kind}", _grab(seen, kind)))
            stack.enter_context(norm_pre_hook(a.attn_norm(l), _alias(self._on_attention(l, seen, weight), seen)))
            stack.enter_context(norm_pre_hook(a.mlp_norm(l), _alias(self._on_residual(graph.mlp_reader(l), weight))))
        stack.enter_context(norm_pre_hook(a.final_norm, _alias(self._on_residual(graph.logits_reader, weight))))

    def _on_residual(self, reader: int, weight: float):
        def on_grad(g: torch.Tensor) -> None:  # (b, pos, d_model)
            g = weight * g.detach().float().flatten(0, 1)
            self.resid_sums[reader] = g if reader not in self.resid_sums else self.resid_sums[reader] + g
        return on_grad

    def _on_attention(self, layer: int, seen: dict, weight: float):
        """Fires on the attention norm input's gradient, after every q/k/v gradient of ``layer``."""
        graph, readers = self.graph, self.readers[layer]
        up, columns = graph.writers_before(layer), graph.attn_readers(layer)

        def on_grad(_total: torch.Tensor) -> None:
            x = seen.pop("x")
            grads, proj = [], []
            for kind in ("q", "k", "v"):
                value = seen.pop(f"{kind}.value")
                proj.append(value)
                # no gradient means the projection cannot affect the metric
                grads.append(seen.pop(f"{kind}.grad", torch.zeros_like(value)))
            grads, proj = torch.cat(grads, 2), torch.cat(proj, 2)
            if readers.kind is None:
                self.scores[:up, columns] += weight * self._times_delta(up, readers.pull(x, grads))
                return
            x_hat, g, dots = readers.head_terms(x, grads, proj)
            g = weight * g
            self.head_sums[layer] = g if layer not in self.head_sums else self.head_sums[layer] + g
            along = torch.bmm(self.delta[:, :up], x_hat.unsqueeze(2))[:, :, 0]  # (bp, up): delta . x_hat
            self.scores[:up, columns] -= (weight / x_hat.shape[-1]) * (along.t() @ dots)

        return on_grad

    def finish(self) -> torch.Tensor:
        graph = self.graph
        for layer, g in self.head_sums.items():
            up = graph.writers_before(layer)
            self.scores[:up, graph.attn_readers(layer)] += self._times_delta(up, self.readers[layer].expand(g))
        for l in range(graph.n_layers + 1):
            reader = graph.logits_reader if l == graph.n_layers else graph.mlp_reader(l)
            if reader in self.resid_sums:
                up = graph.n_writers if l == graph.n_layers else graph.mlp_reads_up_to(l)
                self.scores[:up, reader] += self._times_delta(up, self.resid_sums[reader].unsqueeze(2))[:, 0]
        return self.scores


def _alias(on_grad, seen: dict | None = None):
    """Pre-hook: replace a norm's input by an alias whose gradient is the norm's share only
    (the residual stream itself also flows around the norm)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen["x"] = x.detach()
        alias = x.view_as(x)
        if alias.requires_grad:
            alias.register_hook(on_grad)
        return alias

    return fn


def _grab(seen: dict, kind: str):
    """Site hook that records a q/k/v projection output (b, pos, n, d_head) and its gradient."""

    def fn(t: torch.Tensor) -> torch.Tensor | None:
        seen[f"{kind}.value"] = t.detach()
        if not t.requires_grad:
            return None
        t.register_hook(lambda g: seen.__setitem__(f"{kind}.grad", g))
        return t  # the view itself goes back in, so the hook sits on the path

    return fn


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
