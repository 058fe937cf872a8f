"""What the circuit code shares on top of the hook sites: writer outputs, partial forward passes.

* ``writer_hooks`` reports every writer's contribution to the residual stream as a forward pass
  makes it: the input embedding (``blocks.0.resid_pre``), each head's ``z_h @ W_O[h]`` (from
  ``attn.heads``; the output bias ``b_O`` is the same in every run, so it is left out: it cancels in
  every clean-minus-corrupted difference and in every patch) and each MLP output (``mlp.out``).
  Readers' inputs are the hook sites ``blocks.{l}.attn.in``, ``blocks.{l}.mlp.in`` and
  ``ln_final.in``: the norms are read by their own branch only, so their inputs are exactly "the
  input of reader v".
* ``input_embeddings`` and ``answer_logits`` run only the part of the model a caller needs.
* ``ablated_values`` is what an ablated edge carries under ``zero`` or ``mean`` ablation; scoring
  and evaluation both take it from here, so they ablate alike.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch

from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.models.hooks import site_name


@contextmanager
def writer_hooks(lm, graph: CircuitGraph, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``sink(first_writer_index, acts)`` with acts (batch, pos, n, d_model) for every writer
    group as the forward pass produces it: the input (n=1), a layer's heads (n=n_heads), an MLP (n=1)."""
    a = lm.adapter

    def heads(layer: int):
        def fn(z):  # (b, pos, n_heads, d_head) -> per-head residual contributions
            sink(graph.head_writer(layer), torch.einsum("bphe,hed->bphd", z, a.W_O(layer).detach()))
        return fn

    def mlp(layer: int):
        def fn(out):
            sink(graph.mlp_writer(layer), out.unsqueeze(2))
        return fn

    with ExitStack() as stack:
        stack.enter_context(lm.hooks.hook(site_name("resid_pre", 0), lambda x: sink(0, x.unsqueeze(2))))
        for l in range(graph.n_layers):
            stack.enter_context(lm.hooks.hook(site_name("attn.heads", l), heads(l)))
            stack.enter_context(lm.hooks.hook(site_name("mlp.out", l), mlp(l)))
        yield


@torch.no_grad()
def writer_activations(lm, graph: CircuitGraph, batch, corrupted: bool = False):
    """Every writer's contribution in a plain forward pass of the clean (or corrupted) prompts:
    (b, pos, n_writers, d_model) float32, and the logits at the last tokens (b, vocab)."""
    ids = batch.corrupt_ids if corrupted else batch.clean_ids
    acts = torch.zeros(*ids.shape, graph.n_writers, lm.adapter.d_model, device=ids.device)

    def store(first: int, a: torch.Tensor) -> None:
        acts[:, :, first: first + a.shape[2]] = a.float()

    with writer_hooks(lm, graph, store):
        logits = answer_logits(lm, ids, batch.mask, batch.last)
    return acts, logits


def ablated_values(lm, graph: CircuitGraph, chunks, ablation: str) -> torch.Tensor | None:
    """What an ablated edge carries, one value per writer for every position: (n_writers, d_model)
    float32; None for ``corrupted`` (then it is the corrupted run's own activation).

    ``zero``: 0. ``mean``: each writer's output averaged over every real token of the clean
    prompts of ``chunks`` (an iterable of PairBatch), a_u_mean = sum_{b,p} mask a_u / sum mask."""
    if ablation == "corrupted":
        return None
    total = torch.zeros(graph.n_writers, lm.adapter.d_model, device=lm.device)
    if ablation == "zero":
        return total
    tokens = 0
    for chunk in chunks:
        acts = writer_activations(lm, graph, chunk)[0]
        total += (acts * chunk.mask[:, :, None, None]).sum((0, 1))
        tokens += int(chunk.mask.sum())
    return total / tokens


def qkv_weights(lm, layer: int) -> list[torch.Tensor]:
    """W_Q (n_heads, d_model, d_head), W_K and W_V (n_kv_heads, d_model, d_head), detached."""
    a = lm.adapter
    return [a.W_Q(layer).detach(), a.W_K(layer).detach(), a.W_V(layer).detach()]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (only the embeddings were wanted)."""


def input_embeddings(lm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """resid_pre of layer 0 (token + position embeddings, as the model makes them), (b, pos, d),
    without running the layers."""
    found = {}

    def grab(x):
        found["x"] = x.detach()
        raise _Stop

    with torch.no_grad(), lm.hooks.hook(site_name("resid_pre", 0), grab):
        try:
            lm.model.base_model(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
    return found["x"]


def answer_logits(lm, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real token only, (b, vocab): the body of the model, then the
    unembedding of b vectors instead of b*pos (the metrics read nothing else)."""
    hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return lm.adapter.unembed(hidden[torch.arange(len(ids), device=ids.device), last])
