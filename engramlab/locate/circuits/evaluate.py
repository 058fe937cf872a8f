"""How well a circuit reproduces the model: faithfulness, Hit@10, faithfulness versus N.

A circuit is run by *ablating every edge outside it*, in one forward pass on the clean prompt:
each reader sees

    x_v = x (this run's residual) + sum_{u -> v not kept} (a_u(ablated) - a_u(this run))

so kept edges carry this run's values and the others carry the ablated value. The ablation is
named and the same for every reported number:

* ``corrupted``: a_u from the corrupted prompt (the default);
* ``zero``: 0;
* ``mean``: a_u averaged over every real token of the prompts being evaluated
  (``hooks.ablated_values``; scoring under ``mean`` takes its means the same way, on the
  discovery prompts).

The input node is resid_pre of layer 0, token *and* position embeddings (EAP-IG's input node is
``hook_embed``, the token embedding only): the same under ``corrupted`` (positions line up), but
``zero``/``mean`` also ablate a learned position embedding (GPT-2) here.

A head's q/k/v inputs differ per head once edges are ablated, so inside this pass each changed
reader's own input is formed and projected by that head's own weights; for evaluation (no
backward) that is fine. The projections are patched as q_h + (N(x_h) - N(x)) W_Q[h], which keeps
every bias without having to know where it lives.

How a run is computed. With diff_u = a_u(ablated) - a_u(this run), reader v's shift is the sum
over missing u -> v of diff_u. The residual is the sum of the writers' outputs (plus constant
biases), so the same shift is also T_v - sum over kept u -> v of diff_u, T_v = the sum of diff_u
over every writer v reads: the ablated input with the kept edges put back. Each reader takes
whichever sum has fewer terms (``reader_group``): a sparse circuit costs a few writers per reader,
a dense one a few missing ones, never the (pos x writers x readers x d_model) product of the plain
formula. The T's are running sums kept as the writers' outputs arrive; the differences are stored
writer-major, so a group of readers is one (dense or sparse) matrix product with the writers it
names. The attention branch's input is set to whichever of x and x + T most of a layer's q/k/v
readers see (a sparse circuit's readers mostly see x + T: no edge of theirs is kept), so only the
other readers are projected one by one.

``CircuitEvaluator`` computes the clean run and the ablated activations of its pairs once (rows
sorted by length, so chunks carry little padding), evaluates many circuits chunk by chunk
(``evaluate_many``: a chunk's corrupted activations serve every circuit, even where they are too
large to keep between calls), remembers what it evaluated, and skips the forward pass for a
circuit that misses no edge (its run is the clean run).

faithfulness = (m(circuit) - m(empty)) / (m(clean) - m(empty)), means over examples, where
m(empty) is the metric with every edge ablated: the corrupted run for ``corrupted``.
Hit@10 is the share of examples whose clean answer is among the 10 most likely first tokens.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.attribute import ABLATIONS, metric_values
from engramlab.locate.circuits.data import PairBatch, unsort
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import (ablated_values, answer_logits, qkv_weights, shared_prefix,
                                             writer_activations, writer_hooks)
from engramlab.models.hooks import site_name
from engramlab.models.scoring import answer_ranks

CACHE_BYTES = 2**30

# Relative costs of a group's sum, per row of differences (b*pos*d floats), measured on CPU: a dense
# product costs max(r, 4) per writer row (r readers; one reader is bound by reading the row), a
# sparse one 4.5 per nonzero coefficient, gathering a row first 5 more.
SPARSE_COST, GATHER_COST, DENSE_FLOOR = 4.5, 5.0, 4


# -- which sums each reader takes ---------------------------------------------------------------------
@dataclass
class ReaderGroup:
    """How the readers of one hook site (a layer's q/k/v readers, an MLP, the logits) are shifted.

    The site's input is set to x + base (base = T_up when ``base_total``, else 0). ``readers``
    (r,) long, ascending, are the site's readers whose own input differs from that; for them

        shift (r, b, pos, d) = coef (r, n) @ diff[writers] + total (r,) * T_up

    coef is +1 for a missing edge (missing mode) or -1 for a kept edge (kept mode, where total = 1).
    Either ``coef`` is dense over ``writers`` (a slice [0, up), or the indices of the writers some
    listed reader sums over), or ``sparse`` holds it as a (r, up) sparse matrix over every writer
    before the site, whichever is cheapest (``SPARSE_COST``...); both None when no listed reader
    sums any writer."""

    up: int
    base_total: bool
    readers: torch.Tensor
    writers: slice | torch.Tensor
    coef: torch.Tensor | None
    sparse: torch.Tensor | None
    total: torch.Tensor
    uses_total: bool

    @property
    def changed(self) -> bool:
        """Whether the site's input changes at all (the base, or some reader's own input)."""
        return self.base_total or len(self.readers) > 0


def reader_group(missing: torch.Tensor, device=None, choose_base: bool = False, way: str | None = None) -> ReaderGroup:
    """``missing`` (up, R) bool, the missing edges into R readers from writers [0, up) -> the
    cheaper of the two sums per reader (see the module docstring). ``choose_base``: set the site's
    input to x + T_up when more readers miss every edge than miss none (attention sites).
    ``way``: sparse | slice | gather, instead of the cheapest (for tests)."""
    up, _ = missing.shape
    n_missing = missing.sum(0)
    base_total = choose_base and int((n_missing == up).sum()) > int((n_missing == 0).sum())
    # A reader whose input is the site's input needs nothing of its own.
    readers = (n_missing != up if base_total else n_missing > 0).nonzero().flatten()
    m, n_miss = missing[:, readers], n_missing[readers]
    kept_mode = (up - n_miss) < n_miss  # (r,)
    coef = torch.where(kept_mode[None], -(~m).float(), m.float()).t()  # (r, up)
    used = (coef != 0).any(0)
    n_used, nnz = int(used.sum()), int((coef != 0).sum())
    writers, dense, sparse = slice(0, 0), None, None
    per_row = max(len(readers), DENSE_FLOOR)
    costs = {"sparse": SPARSE_COST * nnz, "slice": per_row * up, "gather": (per_row + GATHER_COST) * n_used}
    way = (way or min(costs, key=costs.get)) if nnz else None
    if way == "sparse":
        sparse = coef.to_sparse_coo().coalesce().to(device)
    elif way == "slice":  # a view of the leading writers, no copy
        writers, dense = slice(0, up), coef.contiguous().to(device)
    elif way == "gather":
        at = used.nonzero().flatten()
        writers, dense = at.to(device), coef[:, at].contiguous().to(device)
    return ReaderGroup(up, base_total, readers.to(device), writers, dense, sparse, kept_mode.float().to(device),
                       bool(kept_mode.any()))


@dataclass
class CircuitPlan:
    """Every reader group of one circuit: per layer the q/k/v readers and the MLP, then the logits.

    ``kinds[l]`` splits layer l's listed q/k/v readers by projection: per kind (q, k, v) their
    positions in ``attn[l].readers`` (a slice: the readers are ascending) and their head indices
    within that projection (None: every head, in order)."""

    attn: list[ReaderGroup]
    mlp: list[ReaderGroup]
    logits: ReaderGroup
    kinds: list[list[tuple[slice, torch.Tensor | None]]]

    @classmethod
    def build(cls, graph: CircuitGraph, ablated_edges: torch.Tensor, device=None, way: str | None = None,
              base: bool = True) -> "CircuitPlan":
        """``ablated_edges`` (n_writers, n_readers) bool: the edges that carry the ablated value.
        ``way`` as in ``reader_group``; ``base=False`` keeps every attention site's input x (for tests)."""
        missing = ablated_edges.bool().cpu() & graph.valid
        attn, mlp, kinds = [], [], []
        sizes = (graph.n_heads, graph.n_kv_heads, graph.n_kv_heads)
        for l in range(graph.n_layers):
            group = reader_group(missing[: graph.writers_before(l), graph.attn_readers(l)], device, base, way)
            attn.append(group)
            local, layer_kinds, lo = group.readers.cpu(), [], 0
            for size in sizes:
                at = ((local >= lo) & (local < lo + size)).nonzero().flatten()
                heads = local[at] - lo
                every = len(heads) == size  # ascending and distinct, so every head in order
                layer_kinds.append((slice(int(at[0]), int(at[-1]) + 1) if len(at) else slice(0, 0),
                                    None if every else heads.to(device)))
                lo += size
            kinds.append(layer_kinds)
            up = graph.mlp_reads_up_to(l)
            mlp.append(reader_group(missing[:up, graph.mlp_reader(l): graph.mlp_reader(l) + 1], device, way=way))
        logits = reader_group(missing[:, graph.logits_reader: graph.logits_reader + 1], device, way=way)
        return cls(attn, mlp, logits, kinds)


def _shift(group: ReaderGroup, diffs: torch.Tensor, totals: dict) -> torch.Tensor:
    """(r, b, pos, d) float32 shifts of ``group``'s listed readers; ``diffs`` (n_writers, b, pos, d)
    and ``totals[up]`` (b, pos, d), the sum of the first ``up`` writers' differences."""
    shape = diffs.shape[1:]
    out = None
    if group.sparse is not None:
        out = torch.sparse.mm(group.sparse, diffs[: group.up].reshape(group.up, -1)).view(-1, *shape)
    elif group.coef is not None:
        chosen = diffs[group.writers] if isinstance(group.writers, slice) else diffs.index_select(0, group.writers)
        out = (group.coef @ chosen.reshape(chosen.shape[0], -1)).view(-1, *shape)
    if group.uses_total:
        total = totals[group.up]
        if out is None:
            out = group.total[:, None, None, None] * total[None]
        else:  # out += total (r) outer T (b*pos*d), in place
            out.view(out.shape[0], -1).addr_(group.total, total.flatten())
    return out if out is not None else diffs.new_zeros(len(group.readers), *shape)


# -- the patched forward pass ---------------------------------------------------------------------------
@torch.no_grad()
def patched_logits(lm, graph: CircuitGraph, batch: PairBatch, ablated_edges: torch.Tensor | None,
                   ablated: torch.Tensor, plan: CircuitPlan | None = None, prefix=None,
                   workspace: dict | None = None) -> torch.Tensor:
    """Logits at the last tokens (b, vocab) of the clean prompts with the edges in ``ablated_edges``
    ((n_writers, n_readers) bool) carrying ``ablated`` (broadcastable to (b, pos, n_writers, d)).

    ``plan``: ``CircuitPlan.build(graph, ablated_edges)``, for a caller that runs it more than once.
    ``prefix``: a ``hooks.shared_prefix`` of the batch, for corrupted ablation only (where nothing
    differs on it); then only positions P.. run and ``ablated`` holds those. ``workspace``: a dict
    kept between calls, where the large buffer is reused."""
    a = lm.adapter
    plan = plan or CircuitPlan.build(graph, ablated_edges, lm.device)
    b = batch.clean_ids.shape[0]
    pos = batch.clean_ids.shape[1] - (prefix.length if prefix is not None else 0)
    abl = ablated.movedim(2, 0)  # (n_writers, b | 1, pos | 1, d), a view
    shape = (graph.n_writers, b, pos, a.d_model)
    diffs = _buffer(workspace, shape, lm.device)  # diffs[u] = a_u(ablated) - a_u(this run)
    totals = {0: torch.zeros(b, pos, a.d_model, device=lm.device)}  # totals[w] = sum of diffs[:w]

    def store(first: int, acts: torch.Tensor) -> None:  # acts (n, b, pos, d), writers in order
        block = diffs[first: first + acts.shape[0]]
        torch.sub(abl[first: first + acts.shape[0]], acts, out=block)
        totals[first + acts.shape[0]] = totals[first] + block.sum(0)

    def residual_reader(group: ReaderGroup):
        def fn(x):
            return x + _shift(group, diffs, totals)[0].to(x.dtype) if group.changed else None
        return fn

    with ExitStack() as stack:
        stack.enter_context(writer_hooks(lm, graph, store, writer_major=True))
        for l in range(graph.n_layers):
            per_head: dict[str, torch.Tensor] = {}
            stack.enter_context(lm.hooks.hook(site_name("attn.in", l),
                                              _attention_inputs(lm, l, plan.attn[l], diffs, totals, per_head)))
            for i, kind in enumerate(("q", "k", "v")):
                stack.enter_context(lm.hooks.hook(site_name(f"attn.{kind}", l),
                                                  _project(lm, l, i, plan.kinds[l][i], per_head)))
            stack.enter_context(lm.hooks.hook(site_name("mlp.in", l), residual_reader(plan.mlp[l])))
        stack.enter_context(lm.hooks.hook("ln_final.in", residual_reader(plan.logits)))
        return answer_logits(lm, batch.clean_ids, batch.mask, batch.last, prefix)


def _buffer(workspace: dict | None, shape: tuple, device) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``, a view of ``workspace``'s flat buffer (grown
    when too small), so chunks of any width reuse one allocation."""
    numel = 1
    for n in shape:
        numel *= n
    if workspace is None:
        return torch.empty(shape, device=device)
    flat = workspace.get("flat")
    if flat is None or flat.numel() < numel:
        flat = workspace["flat"] = torch.empty(numel, device=device)
    return flat[:numel].view(shape)


def _attention_inputs(lm, layer: int, group: ReaderGroup, diffs: torch.Tensor, totals: dict, per_head: dict):
    """Attention-norm pre-hook: the branch input x + base, the listed q/k/v readers' own inputs
    x + shift_r (r, b, pos, d), and N(x + base) (b, pos, d) they are compared with."""
    norm = lm.adapter.attn_norm(layer)

    def fn(x):
        per_head.clear()
        base = x + totals[group.up].to(x.dtype) if group.base_total else x
        if len(group.readers):
            per_head["normed"] = norm.forward(base)
            per_head["inputs"] = x[None] + _shift(group, diffs, totals).to(x.dtype)
        return base if group.base_total else None

    return fn


def _project(lm, layer: int, which: int, kind: tuple[slice, torch.Tensor | None], per_head: dict):
    """q/k/v site hook: t[..., h, :] + (N(x_h) - N(x + base)) W[h] for this projection's listed
    heads h; ``kind`` = (their positions in the layer's listed readers, h or None for every head)."""
    positions, heads = kind

    def fn(t):  # (b, pos, n, d_head)
        if "inputs" not in per_head or positions.stop == positions.start:
            return None
        change = lm.adapter.attn_norm(layer).forward(per_head["inputs"][positions]) - per_head["normed"][None]
        r, b, pos, d = change.shape  # (r, b, pos, d)
        weights = qkv_weights(lm, layer)[which]  # (n, d, d_head)
        weights = weights if heads is None else weights.index_select(0, heads)
        moved = torch.bmm(change.reshape(r, b * pos, d), weights.to(change.dtype)).view(r, b, pos, -1)
        moved = moved.permute(1, 2, 0, 3).to(t.dtype)
        return t + moved if heads is None else t.index_add(2, heads, moved)

    return fn


def _ranks(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Rank (1 = top) of the clean answer in last-token logits (b, vocab)."""
    return answer_ranks(logits, batch.clean_answer)


def _key(missing: torch.Tensor) -> bytes:
    """A short fingerprint of a (n_writers, n_readers) bool mask."""
    return hashlib.blake2b(missing.cpu().numpy().tobytes(), digest_size=16).digest()


# -- many circuits on one set of pairs ---------------------------------------------------------------
def cache_fits(lm, graph: CircuitGraph, batch: PairBatch, batch_size: int = 8) -> bool:
    """Whether ``CircuitEvaluator`` keeps the corrupted activations of ``batch`` (at most CACHE_BYTES)."""
    tokens = sum(c.clean_ids.numel() for c in batch.chunks(batch_size))
    return tokens * graph.n_writers * lm.adapter.d_model * 4 <= CACHE_BYTES


class CircuitEvaluator:
    """Evaluates many circuits on one set of pairs: clean and ablated runs are computed once, and
    each circuit's result is kept (a circuit asked for again costs nothing).

    Rows run sorted by length (``PairBatch.by_length``); every per-example tensor here
    (``m_clean``, ``rank_clean``, ``m_empty``, ``run``'s) is in the batch's own order. Under
    corrupted ablation the tokens every prompt of a chunk starts with run once per chunk
    (``hooks.shared_prefix``): each run covers only the positions after them.

    What a caller has already computed on the same pairs is not run again: ``clean_logits``
    (n, vocab), the clean prompts' last-token logits; ``runs``, under corrupted ablation, the
    attribution's ``CorruptedRun`` per chunk of ``batch.chunks(k)`` (any k), in order."""

    def __init__(self, lm, graph: CircuitGraph, batch: PairBatch, ablation: str = "corrupted",
                 metric: str = "logit_diff", batch_size: int = 8, clean_logits: torch.Tensor | None = None,
                 runs: list | None = None):
        if ablation not in ABLATIONS:
            raise EngramError(f"ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
        if runs is not None and ablation != "corrupted":
            raise EngramError(f"runs of the corrupted prompts cannot evaluate under --ablation {ablation}")
        self.lm, self.graph, self.metric, self.ablation = lm, graph, metric, ablation
        self.n = len(batch)
        rows, self.order = batch.by_length()
        self.chunks = list(rows.chunks(batch_size))
        self._memo: dict[bytes, dict] = {}
        self._workspace: dict = {}
        self.prefixes = [shared_prefix(lm, c) if ablation == "corrupted" else None for c in self.chunks]
        # Corrupted activations are kept between evaluations unless they would take more than
        # CACHE_BYTES; then each evaluate_many recomputes them, one more forward per chunk.
        self.cache = cache_fits(lm, graph, rows, batch_size)
        if runs is not None:
            clean_logits = torch.cat([r.clean_logits for r in runs])
            self.ablated = self._from_runs(runs, batch_size)
            bad = torch.cat([r.corrupt_logits for r in runs]).to(lm.device)[self.order.to(lm.device)]
            corrupt_m = [metric_values(bad, rows, metric).cpu()]
        elif ablation == "corrupted":
            corrupt_m, self.ablated = [], []
            for chunk, prefix in zip(self.chunks, self.prefixes):
                acts, bad = self._corrupted(chunk, prefix)
                self.ablated.append(acts if self.cache else None)
                corrupt_m.append(metric_values(bad, chunk, metric).cpu())
        else:  # one value per writer for every position and example
            corrupt_m = []
            self.ablated = [ablated_values(lm, graph, self.chunks, ablation)[None, None]] * len(self.chunks)
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = torch.cat([answer_logits(lm, c.clean_ids, c.mask, c.last, p)
                                          for c, p in zip(self.chunks, self.prefixes)])
        else:
            clean_logits = clean_logits.to(lm.device)[self.order.to(lm.device)]
        self._m_clean = metric_values(clean_logits, rows, metric).cpu()  # in the sorted order
        self._rank_clean = _ranks(clean_logits, rows).cpu()
        self.m_clean, self.rank_clean = unsort(self._m_clean, self.order), unsort(self._rank_clean, self.order)
        # m(empty): for "corrupted" the corrupted run itself, otherwise every edge ablated.
        self.m_empty = (unsort(torch.cat(corrupt_m), self.order) if corrupt_m else
                        self.run(torch.zeros_like(graph.valid))[0])

    def _from_runs(self, runs: list, batch_size: int) -> list:
        """Each chunk's corrupted writer outputs (b, pos, n_writers, d), writer-major in memory and
        from its prefix on, copied row by row out of the runs (whose rows are in batch order)."""
        where = [(run, row) for run in runs for row in range(run.acts.shape[1])]  # example -> its run and row
        if len(where) != self.n:
            raise EngramError(f"{len(where)} rows in the runs for {self.n} pairs; give the runs of these pairs")
        out, order = [], self.order.tolist()
        for c, (chunk, prefix) in enumerate(zip(self.chunks, self.prefixes)):
            skip, width = (prefix.length if prefix is not None else 0), chunk.clean_ids.shape[1]
            acts = torch.zeros(self.graph.n_writers, len(chunk), width - skip, self.lm.adapter.d_model,
                               device=self.lm.device)
            for j, i in enumerate(order[c * batch_size: c * batch_size + len(chunk)]):
                run, row = where[i]
                stop = min(width, run.acts.shape[2])  # past a row's own length both are padding
                acts[:, j, : stop - skip] = run.acts[:, row, skip:stop]
            out.append(acts.movedim(0, 2))
        return out

    def _corrupted(self, chunk: PairBatch, prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """The corrupted run's writer outputs, (b, pos, n_writers, d) shaped but writer-major in
        memory (what ``patched_logits`` reads), and its last-token logits."""
        acts, logits = writer_activations(self.lm, self.graph, chunk, corrupted=True, prefix=prefix,
                                          writer_major=True)
        return acts.movedim(0, 2), logits

    def run(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric, clean-answer rank) per example, (n,) each, with the circuit ``kept``."""
        return self.run_many([kept])[0]

    def run_many(self, circuits: list[torch.Tensor], progress=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``run`` for each circuit, chunk by chunk: a chunk's ablated activations serve every
        circuit. A circuit that misses no edge is the clean run (no forward pass). ``progress``
        wraps the iterator of chunks."""
        device = self.lm.device
        missing = [self.graph.valid & ~kept.bool().cpu() for kept in circuits]
        plans = [CircuitPlan.build(self.graph, m, device) if bool(m.any()) else None for m in missing]
        out: list[tuple[list, list]] = [([], []) for _ in circuits]
        steps = list(zip(self.chunks, self.prefixes, self.ablated))
        if any(p is not None for p in plans):
            for chunk, prefix, ablated in (progress(steps) if progress else steps):
                if ablated is None:
                    ablated = self._corrupted(chunk, prefix)[0]
                for plan, (metrics, ranks) in zip(plans, out):
                    if plan is not None:
                        logits = patched_logits(self.lm, self.graph, chunk, None, ablated, plan=plan, prefix=prefix,
                                                workspace=self._workspace)
                        metrics.append(metric_values(logits, chunk, self.metric).cpu())
                        ranks.append(_ranks(logits, chunk).cpu())
            self._workspace.clear()  # the buffer is as large as a chunk's activations: not kept idle
        return [(self.m_clean.clone(), self.rank_clean.clone()) if plan is None else
                (unsort(torch.cat(metrics), self.order), unsort(torch.cat(ranks), self.order))
                for plan, (metrics, ranks) in zip(plans, out)]

    def evaluate(self, kept: torch.Tensor, progress=None) -> dict:
        """faithfulness, Hit@10 of model and circuit, and the mean metrics behind them."""
        return self.evaluate_many([kept], progress)[0]

    def evaluate_many(self, circuits: list[torch.Tensor], progress=None) -> list[dict]:
        """``evaluate`` for each circuit (``run_many``: one pass over the chunks for all of them);
        circuits evaluated before are not run again."""
        keys = [_key(self.graph.valid & ~kept.bool().cpu()) for kept in circuits]
        todo = {k: kept for k, kept in zip(keys, circuits) if k not in self._memo}
        for key, (m_circuit, rank) in zip(todo, self.run_many(list(todo.values()), progress)):
            self._memo[key] = self._metrics(m_circuit, rank)
        return [dict(self._memo[k]) for k in keys]

    def _metrics(self, m_circuit: torch.Tensor, rank: torch.Tensor) -> dict:
        clean, empty, circ = float(self.m_clean.mean()), float(self.m_empty.mean()), float(m_circuit.mean())
        gap = clean - empty
        return {
            "faithfulness": (circ - empty) / gap if abs(gap) > 1e-12 else float("nan"),
            "hit_at_10_model": float((self.rank_clean <= 10).float().mean()),
            "hit_at_10_circuit": float((rank <= 10).float().mean()),
            "metric_clean": clean, "metric_empty": empty, "metric_circuit": circ,
            "n_examples": self.n, "ablation": self.ablation,
        }


def faithfulness_curve(evaluator: CircuitEvaluator, scores: torch.Tensor, graph: CircuitGraph,
                       sizes: list[int], rule: str = "topn", progress=None) -> list[dict]:
    """Faithfulness of the top-N circuit (after cleanup) for each N in ``sizes``, all evaluated in
    one pass over the pairs (``evaluate_many``; ``progress`` wraps its chunks).

    One record per distinct N: ``n`` (requested), ``n_kept`` (edges left after the unreachable-edge
    cleanup: the circuit that was evaluated), ``edge_fraction`` = n_kept / n_edges and
    ``requested_fraction`` = n / n_edges, ``faithfulness``, ``hit_at_10_circuit``."""
    from engramlab.locate.circuits.prune import prune

    sizes = sorted({int(s) for s in sizes})
    circuits = [prune(scores, graph, rule, n=n) for n in sizes]
    out = []
    for n, kept, result in zip(sizes, circuits, evaluator.evaluate_many(circuits, progress)):
        n_kept = int(kept.sum())
        out.append({"n": n, "n_kept": n_kept, "edge_fraction": n_kept / graph.n_edges,
                    "requested_fraction": n / graph.n_edges, "faithfulness": result["faithfulness"],
                    "hit_at_10_circuit": result["hit_at_10_circuit"]})
    return out
