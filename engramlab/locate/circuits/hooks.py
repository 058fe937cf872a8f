"""What the circuit code shares on top of the hook sites: writer outputs, partial forward passes.

* ``writer_hooks`` reports every writer's contribution to the residual stream as a forward pass
  makes it: the input embedding (``blocks.0.resid_pre``), each head's ``z_h @ W_O[h]`` (from
  ``attn.heads``; the output bias ``b_O`` is the same in every run, so it is left out: it cancels in
  every clean-minus-corrupted difference and in every patch) and each MLP output (``mlp.out``).
  Readers' inputs are the hook sites ``blocks.{l}.attn.in``, ``blocks.{l}.mlp.in`` and
  ``ln_final.in``: the norms are read by their own branch only, so their inputs are exactly "the
  input of reader v".
* ``input_embeddings`` and ``answer_logits`` run only the part of the model a caller needs;
  ``shared_prefix`` runs the tokens every prompt of a batch starts with once, so that later passes
  (``answer_logits(prefix=...)``) cover only the rest.
* ``ablated_values`` is what an ablated edge carries under ``zero`` or ``mean`` ablation; scoring
  and evaluation both take it from here, so they ablate alike.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.models.hooks import site_name
from engramlab.models.prefix import PrefixCache


@contextmanager
def writer_hooks(lm, graph: CircuitGraph, sink: Callable[[int, torch.Tensor], None],
                 writer_major: bool = False, rows: slice | None = None) -> Iterator[None]:
    """Call ``sink(first_writer_index, acts)`` with acts (batch, pos, n, d_model) for every writer
    group as the forward pass produces it: the input (n=1), a layer's heads (n=n_heads), an MLP (n=1).
    ``writer_major``: acts (n, batch, pos, d_model) instead, contiguous (a head's z_h W_O[h] is
    then one batched product per layer, with no transposed copy). ``rows``: only these rows of the
    batch (the others' head outputs are not computed)."""
    a = lm.adapter
    rows = rows if rows is not None else slice(None)

    def heads(layer: int):
        def fn(z):  # (b, pos, n_heads, d_head) -> per-head residual contributions
            w_o = a.W_O(layer).detach()  # (n_heads, d_head, d_model)
            z = z[rows]
            if writer_major:
                b, pos, n, e = z.shape
                out = torch.bmm(z.permute(2, 0, 1, 3).reshape(n, b * pos, e), w_o.to(z.dtype))
                sink(graph.head_writer(layer), out.view(n, b, pos, -1))
            else:
                sink(graph.head_writer(layer), torch.einsum("bphe,hed->bphd", z, w_o))
        return fn

    def single(first: int):
        def fn(x):  # (b, pos, d_model): the input, or an MLP's output
            x = x[rows]
            sink(first, x.unsqueeze(0) if writer_major else x.unsqueeze(2))
        return fn

    with ExitStack() as stack:
        stack.enter_context(lm.hooks.hook(site_name("resid_pre", 0), single(0)))
        for l in range(graph.n_layers):
            stack.enter_context(lm.hooks.hook(site_name("attn.heads", l), heads(l)))
            stack.enter_context(lm.hooks.hook(site_name("mlp.out", l), single(graph.mlp_writer(l))))
        yield


@torch.no_grad()
def writer_activations(lm, graph: CircuitGraph, batch, corrupted: bool = False, prefix=None,
                       writer_major: bool = False):
    """Every writer's contribution in a plain forward pass of the clean (or corrupted) prompts:
    (b, pos, n_writers, d_model) float32 (``writer_major``: (n_writers, b, pos, d_model)), and the
    logits at the last tokens (b, vocab). With ``prefix`` (a ``PrefixCache`` of the first P tokens,
    which every row shares) only positions P.. run, and pos counts those."""
    ids = batch.corrupt_ids if corrupted else batch.clean_ids
    skip = prefix.length if prefix is not None else 0
    shape = (graph.n_writers, ids.shape[0], ids.shape[1] - skip) if writer_major else \
        (ids.shape[0], ids.shape[1] - skip, graph.n_writers)
    acts = torch.zeros(*shape, lm.adapter.d_model, device=ids.device)

    def store(first: int, a: torch.Tensor) -> None:
        if writer_major:
            acts[first: first + a.shape[0]] = a.float()
        else:
            acts[:, :, first: first + a.shape[2]] = a.float()

    with writer_hooks(lm, graph, store, writer_major):
        logits = answer_logits(lm, ids, batch.mask, batch.last, prefix)
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


def answer_logits(lm, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, prefix=None) -> torch.Tensor:
    """Logits at each row's last real token only, (b, vocab): the body of the model, then the
    unembedding of b vectors instead of b*pos (the metrics read nothing else).

    ``prefix``: a ``PrefixCache`` of ids[:, :P] (every row starts with those P tokens, and is
    longer): only ids[:, P:] run, on the prefix's keys and values (``shared_prefix``)."""
    rows = torch.arange(len(ids), device=ids.device)
    if prefix is None:
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return lm.adapter.unembed(hidden[rows, last])
    skip = prefix.length
    hidden = lm.model.base_model(input_ids=ids[:, skip:], attention_mask=mask, cache=prefix,
                                 use_cache=True).last_hidden_state
    return lm.adapter.unembed(hidden[rows, last - skip])


def shared_prefix(lm, batch):
    """A ``PrefixCache`` of the tokens every clean and corrupted prompt of ``batch`` starts with,
    at most up to each row's last token (so every row keeps a position to run); None when they
    share none or the model's cache cannot be shared.

    Under corrupted ablation nothing differs there: a causal model's writers give the same outputs
    at those positions in the clean and the corrupted run, so every difference an ablated edge
    carries is 0 and a patched run equals the clean run there, keys and values included."""
    ids = torch.cat([batch.clean_ids, batch.corrupt_ids])
    same = (ids == ids[:1]).all(0).long()  # (pos,) position where every prompt has the same token
    length = min(int(same.cumprod(0).sum()), int(batch.last.min()))
    if length < 1:
        return None
    try:
        return PrefixCache.run(lm, batch.clean_ids[0, :length].tolist())
    except EngramError:  # a cache of another kind (no keys/values to share): run every position
        return None
