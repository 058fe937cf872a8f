"""What the parts of a circuit do: head roles and a logit lens.

Head roles. For head h at the last prompt position, the direct effect on the answer's logit of
what it reads from source position p is

    DE_h(p) = A_h[last, p] * (v_{kv(h)}(p) @ W_O[h]) . g,   g = d logit_answer / d x_final[last]

(g is the unembedding column pulled back through the final norm at the clean run's residual: the
usual frozen-scale linearisation). Summing DE over the subject's tokens gives S, over the other
real tokens (the relation's words and the last token) gives R, each averaged over examples. With
ratio = |S| / |R|:

* ``mover`` (ratio >= mover_ratio, default 10): the head moves the subject to the last position;
* ``relation`` (ratio <= relation_ratio, default 0.1): it carries the relation;
* ``mixture`` otherwise.

Logit lens. The residual stream after each layer at the last position, through the final norm and
the unembedding: rank and probability of the answer's first token, averaged over examples.

Both read one clean forward pass per chunk of prompts (``capture``, the model's body only: the
full-vocabulary unembedding of every position is not needed), which ``head_roles`` and
``logit_lens`` can share: pass the same ``capture`` list to both. A layer's heads are computed
together (one product for all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engramlab.locate.circuits.data import PairBatch, unsort
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.models.hooks import site_name
from engramlab.models.scoring import answer_ranks


# Rows of the logit lens unembedded at once: large enough for an efficient product with the
# unembedding, small enough for (rows, vocab) float32 logits to stay modest.
LENS_ROWS = 256


@dataclass
class ChunkCapture:
    """What one clean forward pass of a chunk leaves for the components, at the last positions.

    chunk    the PairBatch it ran
    resid    (L, b, d_model) resid_post of every layer at each row's last real token
    pattern  {layer: (b, n_heads, pos)} attention of the last token to every position
    values   {layer: (b, pos, n_kv_heads, d_head)} the layer's values
    """

    chunk: PairBatch
    resid: torch.Tensor
    pattern: dict
    values: dict


@dataclass
class Captured:
    """``capture``'s chunks (of the rows sorted by length) and the order that sorted them."""

    parts: list[ChunkCapture]
    order: torch.Tensor

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def clean_logits(self, lm) -> torch.Tensor:
        """(n, vocab) last-token logits of the clean prompts, in the batch's own order: the final
        layer's residual through the final norm and the unembedding, as the model's own head."""
        with torch.no_grad():
            logits = torch.cat([lm.adapter.unembed.forward(lm.adapter.final_norm.forward(p.resid[-1]))
                                for p in self.parts])
        return unsort(logits, self.order)


def capture(lm, batch: PairBatch, pattern_layers=(), batch_size: int = 8, progress=None) -> Captured:
    """One clean forward pass of the model's body per chunk of ``batch`` (rows sorted by length,
    for little padding), keeping resid_post at the last tokens and, for ``pattern_layers``, the
    last token's attention and the values. ``progress`` wraps the iterator of chunks."""
    n = lm.adapter.n_layers
    layers = sorted(set(pattern_layers))
    names = [site_name("resid_post", l) for l in range(n)]
    names += [site_name(f"attn.{s}", l) for l in layers for s in ("v", "pattern")]
    rows, order = batch.by_length()
    chunks = list(rows.chunks(batch_size))
    out = []
    for chunk in (progress(chunks) if progress else chunks):
        with torch.no_grad(), lm.hooks.capture(names) as cache:
            lm.model.base_model(input_ids=chunk.clean_ids, attention_mask=chunk.mask)
        at = torch.arange(len(chunk), device=chunk.last.device)
        resid = torch.stack([cache[site_name("resid_post", l)][at, chunk.last] for l in range(n)])
        pattern = {l: cache[site_name("attn.pattern", l)][at, :, chunk.last] for l in layers}  # (b, H, pos)
        out.append(ChunkCapture(chunk, resid, pattern, {l: cache[site_name("attn.v", l)] for l in layers}))
    return Captured(out, order)


def _answer_direction(lm, x_last: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """g (b, d_model): gradient of the answer's logit w.r.t. the final residual at the last position."""
    norm = lm.adapter.final_norm
    _, pull = torch.func.vjp(norm.forward, x_last)
    return pull(lm.adapter.W_U.detach()[:, answer].t().to(x_last.dtype))[0].detach().float()


def head_effects(lm, part: ChunkCapture, layer: int, heads: list[int]) -> torch.Tensor:
    """(b, len(heads), pos) direct effects DE_h(p) of ``heads`` of ``layer`` on the answer's logit.

    DE_h(p) = A_h[last, p] * v_kv(h)(p) . (W_O[h] g): W_O[h] is contracted with g first, so no
    (b, pos, d_model) tensor per head is formed."""
    a, chunk = lm.adapter, part.chunk
    g = _answer_direction(lm, part.resid[-1], chunk.clean_answer)  # (b, d)
    idx = torch.tensor(heads, device=g.device)
    w_o = a.W_O(layer).detach().float().index_select(0, idx)  # (h, d_head, d)
    g_o = torch.einsum("bd,hed->bhe", g, w_o)  # (b, h, d_head)
    kv = torch.tensor([a.kv_head(h) for h in heads], device=g.device)
    v = part.values[layer].float().index_select(2, kv)  # (b, pos, h, d_head)
    pattern = part.pattern[layer].float().index_select(1, idx)  # (b, h, pos)
    return pattern * torch.einsum("bphe,bhe->bhp", v, g_o)


def head_roles(lm, graph: CircuitGraph, batch: PairBatch, heads: list[tuple[int, int]],
               mover_ratio: float = 10.0, relation_ratio: float = 0.1, batch_size: int = 8,
               captured: Captured | None = None) -> list[dict]:
    """One record per (layer, head): subject and relation direct effects, ratio and role.
    ``captured``: ``capture(lm, batch, layers of heads, batch_size)``, when already run."""
    if not heads:
        return []
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    parts = captured if captured is not None else capture(lm, batch, list(by_layer), batch_size)
    sums = {}  # (layer, head) -> [subject, relation] summed over examples
    for part in parts:
        chunk = part.chunk
        positions = torch.arange(chunk.clean_ids.shape[1], device=chunk.last.device)
        subject = (positions[None] >= chunk.subject[:, :1]) & (positions[None] < chunk.subject[:, 1:])
        real = chunk.mask.bool()
        for l, hs in by_layer.items():
            effect = head_effects(lm, part, l, hs)  # (b, h, pos)
            subj = (effect * (subject & real)[:, None]).sum((0, 2))
            rel = (effect * (~subject & real)[:, None]).sum((0, 2))
            for h, s_, r_ in zip(hs, subj.tolist(), rel.tolist()):
                acc = sums.setdefault((l, h), [0.0, 0.0])
                acc[0] += s_
                acc[1] += r_
    out = []
    for l, h in heads:
        subj, rel = (v / len(batch) for v in sums[(l, h)])
        ratio = abs(subj) / abs(rel) if rel != 0 else float("inf")
        role = "mover" if ratio >= mover_ratio else "relation" if ratio <= relation_ratio else "mixture"
        out.append({"node": f"a{l}.h{h}", "layer": l, "head": h, "subject_effect": subj, "relation_effect": rel,
                    "direct_effect": subj + rel, "ratio": None if ratio == float("inf") else ratio, "role": role})
    return out


def logit_lens(lm, batch: PairBatch, batch_size: int = 8, captured: Captured | None = None,
               progress=None) -> list[dict]:
    """Per layer: mean rank, median rank, mean probability and top-1 share of the clean answer.
    ``captured`` as in ``head_roles``. Every layer's residuals are unembedded together, LENS_ROWS
    rows at a time (``progress`` wraps those blocks)."""
    a = lm.adapter
    parts = list(captured if captured is not None else capture(lm, batch, (), batch_size))
    resid = torch.cat([p.resid for p in parts], 1)  # (L, n, d)
    n_layers, n = resid.shape[:2]
    flat = resid.reshape(n_layers * n, -1)
    answers = torch.cat([p.chunk.clean_answer for p in parts]).repeat(n_layers)  # row l*n + i: example i
    ranks, probs = [], []
    blocks = range(0, len(flat), LENS_ROWS)
    with torch.no_grad():
        for start in (progress(blocks) if progress else blocks):
            x, ans = flat[start: start + LENS_ROWS], answers[start: start + LENS_ROWS]
            logits = a.unembed.forward(a.final_norm.forward(x)).float()  # (rows, vocab)
            ranks.append(answer_ranks(logits, ans).cpu())
            probs.append(logits.softmax(-1).gather(1, ans[:, None])[:, 0].cpu())
    rank, prob = torch.cat(ranks).float().view(n_layers, n), torch.cat(probs).view(n_layers, n)
    return [{"layer": l, "mean_rank": float(rank[l].mean()), "median_rank": float(rank[l].median()),
             "mean_prob": float(prob[l].mean()), "top1_share": float((rank[l] == 1).float().mean())}
            for l in range(n_layers)]
