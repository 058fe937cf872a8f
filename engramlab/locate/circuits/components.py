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
"""

from __future__ import annotations

import torch

from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.models.scoring import answer_ranks
from engramlab.models.hooks import site_name


def _captures(lm, batch: PairBatch, pattern_layers: list[int] = ()) -> dict:
    """Capture every layer's resid_post, plus v and the pattern of ``pattern_layers``."""
    names = [site_name("resid_post", l) for l in range(lm.adapter.n_layers)]
    names += [site_name(f"attn.{s}", l) for l in pattern_layers for s in ("v", "pattern")]
    with torch.no_grad(), lm.hooks.capture(names) as cache:
        lm.model(input_ids=batch.clean_ids, attention_mask=batch.mask)
    return dict(cache)


def _answer_direction(lm, x_last: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """g (b, d_model): gradient of the answer's logit w.r.t. the final residual at the last position."""
    norm = lm.adapter.final_norm
    _, pull = torch.func.vjp(norm.forward, x_last)
    return pull(lm.adapter.W_U.detach()[:, answer].t().to(x_last.dtype))[0].detach().float()


def head_roles(lm, graph: CircuitGraph, batch: PairBatch, heads: list[tuple[int, int]],
               mover_ratio: float = 10.0, relation_ratio: float = 0.1, batch_size: int = 8) -> list[dict]:
    """One record per (layer, head): subject and relation direct effects, ratio and role."""
    if not heads:
        return []
    a = lm.adapter
    layers = sorted({l for l, _ in heads})
    sums = torch.zeros(len(heads), 2)  # (head, [subject, relation]) summed over examples
    for chunk in batch.chunks(batch_size):
        cache = _captures(lm, chunk, layers)
        rows = torch.arange(len(chunk), device=lm.device)
        g = _answer_direction(lm, cache[site_name("resid_post", a.n_layers - 1)][rows, chunk.last], chunk.clean_answer)
        positions = torch.arange(chunk.clean_ids.shape[1], device=lm.device)
        subject = (positions[None] >= chunk.subject[:, :1]) & (positions[None] < chunk.subject[:, 1:])
        real = chunk.mask.bool()
        for i, (l, h) in enumerate(heads):
            pattern = cache[site_name("attn.pattern", l)][rows, h, chunk.last].float()  # (b, pos)
            v = cache[site_name("attn.v", l)][:, :, a.kv_head(h)].float()  # (b, pos, d_head)
            # (v_p W_O[h]) . g without forming (b, pos, d_model): contract W_O[h] with g first.
            effect = pattern * torch.einsum("bpe,bd,ed->bp", v, g, a.W_O(l)[h].detach().float())
            sums[i, 0] += float((effect * (subject & real)).sum())
            sums[i, 1] += float((effect * (~subject & real)).sum())
    out = []
    for (l, h), (subj, rel) in zip(heads, (sums / len(batch)).tolist()):
        ratio = abs(subj) / abs(rel) if rel != 0 else float("inf")
        role = "mover" if ratio >= mover_ratio else "relation" if ratio <= relation_ratio else "mixture"
        out.append({"node": f"a{l}.h{h}", "layer": l, "head": h, "subject_effect": subj, "relation_effect": rel,
                    "direct_effect": subj + rel, "ratio": None if ratio == float("inf") else ratio, "role": role})
    return out


def logit_lens(lm, batch: PairBatch, batch_size: int = 8) -> list[dict]:
    """Per layer: mean rank, median rank, mean probability and top-1 share of the clean answer."""
    a = lm.adapter
    ranks, probs = [[] for _ in range(a.n_layers)], [[] for _ in range(a.n_layers)]
    for chunk in batch.chunks(batch_size):
        cache = _captures(lm, chunk)
        rows = torch.arange(len(chunk), device=lm.device)
        with torch.no_grad():
            for l in range(a.n_layers):
                x = cache[site_name("resid_post", l)][rows, chunk.last]
                logits = a.unembed.forward(a.final_norm.forward(x)).float()  # (b, vocab)
                ranks[l].append(answer_ranks(logits, chunk.clean_answer).cpu())
                probs[l].append(logits.softmax(-1)[rows, chunk.clean_answer].cpu())
    out = []
    for l in range(a.n_layers):
        rank, prob = torch.cat(ranks[l]).float(), torch.cat(probs[l])
        out.append({"layer": l, "mean_rank": float(rank.mean()), "median_rank": float(rank.median()),
                    "mean_prob": float(prob.mean()), "top1_share": float((rank == 1).float().mean())})
    return out
