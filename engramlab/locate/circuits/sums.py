"""What EAP-IG's gradient passes leave behind, and how it becomes edge scores.

Only positions where the clean and ablated values can differ are kept: under corrupted patching,
real tokens from the first position whose token differs (earlier positions see the same prefix in
both runs, so every activation difference there is exactly 0 and so is their share of every
score); under zero/mean ablation, every real token. Their flat
(b*pos) indices are ``keep`` (n_keep,); every stored tensor has n_keep rows.

Summed over integration steps (step weights applied), per layer l and reader r:

    head[l]   (n_keep, R, d_head)  q/k/v gradients g' in head space (``AttentionReaders``)
    x_hat[l]  list of (n_keep, d)  each step's normalised residual, with ``dots[l]`` each step's
                                   (n_keep, R) coefficients of the x_hat correction term
    resid[r]  (n_keep, d_model)    gradient of an MLP or of the logits
    full[l]   (n_keep, d, R)       reader gradients, for norms without a closed form

After the passes, ``output_differences`` records corrupted minus clean writer outputs (head outputs
z before W_O, MLP outputs) in one no-grad forward of both prompts (under zero/mean ablation: minus
the clean outputs, from a forward of the clean prompts only).
``scores`` turns them into the (n_writers, n_readers) matrix in chunks of positions: for a chunk,
delta (n_writers, chunk, d_model) = a(ablated) - a(clean), writer-major so that the writers a
reader sees are a contiguous block, and each reader layer is one matrix product with it. Chunking
bounds the largest tensor (delta for all positions would be b*pos*n_writers*d_model floats).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch

from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.readers import AttentionReaders
from engramlab.models.hooks import site_name

# At most this many bytes of activation differences at once (sets the chunk of positions): all of
# delta can be as large as a forward+backward's activations (SmolLM2: 301 writers x 576 floats
# per position). Each extra chunk rebuilds every layer's folded weights (a few ms per layer).
DELTA_CHUNK_BYTES = 32 * 2**20


def kept_positions(clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into (b*pos) of real tokens at or after each row's first differing token."""
    differs = (clean_ids != corrupt_ids) & mask.bool()
    after_first = differs.long().cumsum(1) > 0
    return (after_first & mask.bool()).flatten().nonzero().flatten()


class GradientSums:
    """Accumulates one batch's gradient passes (see module docstring)."""

    def __init__(self, lm, graph: CircuitGraph, keep: torch.Tensor, closed_form: bool = True):
        self.lm, self.graph, self.keep = lm, graph, keep
        self.readers = [AttentionReaders(lm, l, closed_form) for l in range(graph.n_layers)]
        self.head: dict[int, torch.Tensor] = {}
        self.x_hat: dict[int, list[torch.Tensor]] = {}
        self.dots: dict[int, list[torch.Tensor]] = {}
        self.resid: dict[int, torch.Tensor] = {}
        self.full: dict[int, torch.Tensor] = {}

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(b, pos, ...) -> (n_keep, ...)."""
        return t.flatten(0, 1)[self.keep]

    @staticmethod
    def _add(store: dict, key: int, value: torch.Tensor) -> None:
        store[key] = value if key not in store else store[key] + value

    # -- during a pass ----------------------------------------------------------------------------
    def hooks(self, stack: ExitStack, weight: float) -> None:
        """Hooks that add this pass's gradients, times ``weight``, when its backward runs.

        The norm inputs' gradients (``attn.in``, ``mlp.in``, ``ln_final.in``) are each branch's
        share only, what reader v's input receives (the residual stream also flows around the
        norm); the attention one fires after every q/k/v gradient of its layer."""
        lm, graph = self.lm, self.graph
        for l in range(graph.n_layers):
            seen: dict = {}
            names = [site_name(f"attn.{kind}", l) for kind in ("q", "k", "v")]
            sites = [lm.hooks.site(n) for n in names]
            # A fused q/k/v output (GPT-2, NeoX, Phi-3) stays alive anyway (attention saves its
            # value view), so its views are kept: then x_hat W~ need not be recomputed in the
            # backward pass. Separate projections' outputs are not kept.
            fused = len({id(site.module) for site in sites}) == 1
            for name in names:
                stack.enter_context(lm.hooks.grad(name, _store(seen, ("grad", name))))
                if fused:
                    stack.enter_context(lm.hooks.hook(name, _store(seen, ("value", name))))
            attn_in = site_name("attn.in", l)
            stack.enter_context(lm.hooks.hook(attn_in, _store(seen, "x")))
            stack.enter_context(lm.hooks.grad(attn_in, self._on_attention(l, seen, sites, weight)))
            stack.enter_context(lm.hooks.grad(site_name("mlp.in", l), self._on_residual(graph.mlp_reader(l), weight)))
        stack.enter_context(lm.hooks.grad("ln_final.in", self._on_residual(graph.logits_reader, weight)))

    def _on_residual(self, reader: int, weight: float):
        def on_grad(g: torch.Tensor) -> None:  # (b, pos, d_model)
            self._add(self.resid, reader, weight * self._rows(g.detach()).float())
        return on_grad

    def _on_attention(self, layer: int, seen: dict, sites: list, weight: float):
        """Fires on the attention norm input's gradient, after every q/k/v gradient of ``layer``."""
        readers, graph = self.readers[layer], self.graph

        def on_grad(_total: torch.Tensor) -> None:
            x = self._rows(seen.pop("x"))
            values = {key[1]: self._rows(v) for key, v in seen.items() if key[0] == "value"}
            grads = []
            for site, n in zip(sites, (graph.n_heads, graph.n_kv_heads, graph.n_kv_heads)):
                grad = seen.get(("grad", site.name))  # None: it cannot affect the metric
                grads.append(self._rows(grad) if grad is not None else
                             torch.zeros(len(x), n, self.lm.adapter.d_head, device=x.device))
            seen.clear()
            grads = torch.cat(grads, 1)  # (n_keep, R, d_head)
            if readers.kind is None:
                self._add(self.full, layer, weight * readers.pull(x, grads))
                return
            x_hat, g, dots = readers.head_terms(x, grads, sites, values)
            self._add(self.head, layer, weight * g)
            self.x_hat.setdefault(layer, []).append(x_hat)
            self.dots.setdefault(layer, []).append(weight * dots)

        return on_grad

    def record_outputs(self, stack: ExitStack, store: dict) -> None:
        """Hooks that put this pass's head outputs z (before W_O) and MLP outputs at the kept
        positions, detached, in ``store`` (by site name): run in the alpha = 1 pass, they are
        the clean outputs ``output_differences`` would otherwise run the clean prompts for."""
        def keep(name: str):
            def fn(t):
                store[name] = self._rows(t.detach())
            return fn

        for l in range(self.graph.n_layers):
            for kind in ("attn.heads", "mlp.out"):
                name = site_name(kind, l)
                stack.enter_context(self.lm.hooks.hook(name, keep(name)))

    @torch.inference_mode()
    def output_differences(self, batch, corrupted: bool = True, clean: dict | None = None, prefix=None) -> dict:
        """Corrupted minus clean head outputs z (before W_O) and MLP outputs at the kept
        positions: one no-grad forward of both prompts stacked (2b rows, clean first), without the
        unembedding. ``corrupted=False``: minus the clean outputs (the ablated values are added in
        ``scores``). ``clean``: the clean outputs already recorded (``record_outputs``); then only
        the corrupted prompts run (b rows), or nothing under ``corrupted=False``. ``prefix``: a
        ``PrefixCache`` of the first P tokens (``keep`` indexes positions P..): only those run. Run
        after the gradient passes, so none of this is held while they run."""
        b = len(batch)
        diff: dict = {}

        def record(name: str):
            def fn(t):
                if clean is not None:  # in place: the recorded clean outputs become the difference
                    diff[name] = clean[name].neg_().add_(self._rows(t))
                else:
                    diff[name] = self._rows(t[b:]) - self._rows(t[:b]) if corrupted else -self._rows(t)
            return fn

        if clean is not None and not corrupted:
            return {name: value.neg_() for name, value in clean.items()}
        with ExitStack() as stack:
            for l in range(self.graph.n_layers):
                for kind in ("attn.heads", "mlp.out"):
                    name = site_name(kind, l)
                    stack.enter_context(self.lm.hooks.hook(name, record(name)))
            if clean is not None:
                ids, mask = batch.corrupt_ids, batch.mask
            elif corrupted:
                ids, mask = torch.cat([batch.clean_ids, batch.corrupt_ids]), torch.cat([batch.mask, batch.mask])
            else:
                ids, mask = batch.clean_ids, batch.mask
            if prefix is None:
                self.lm.model.base_model(input_ids=ids, attention_mask=mask)
            else:
                self.lm.model.base_model(input_ids=ids[:, prefix.length:], attention_mask=mask, cache=prefix,
                                         use_cache=True)
        return diff

    # -- after the passes -------------------------------------------------------------------------
    def _delta(self, rows: slice, diff: dict, embeds: dict, ablated: torch.Tensor | None) -> torch.Tensor:
        """a(ablated) - a(clean) at kept rows ``rows``: (n_writers, chunk, d_model) float32.
        Heads are z_h W_O[h]; the output bias is in neither (the same in every run, and the
        evaluation leaves it in place too). ``ablated`` (n_writers, d_model) is added to the
        recorded -a(clean) of heads and MLPs under zero/mean; the input's is in ``embeds[0.0]``."""
        graph, a = self.graph, self.lm.adapter
        embed = self._rows(embeds[0.0] - embeds[1.0])[rows]
        delta = torch.empty(graph.n_writers, embed.shape[0], a.d_model, device=embed.device)
        delta[0] = embed
        for l in range(graph.n_layers):
            z = diff[site_name("attn.heads", l)][rows].float()
            first = graph.head_writer(l)
            delta[first: first + graph.n_heads] = torch.einsum("khe,hed->hkd", z, a.W_O(l).detach().float())
            delta[graph.mlp_writer(l)] = diff[site_name("mlp.out", l)][rows]
        if ablated is not None:
            delta[1:] += ablated[1:, None, :]
        return delta

    def scores(self, diff: dict, embeds: dict, ablated: torch.Tensor | None = None) -> torch.Tensor:
        """(n_writers, n_readers) scores from the sums and the runs' output differences;
        ``ablated`` as in ``_delta`` (None: corrupted patching)."""
        graph, d = self.graph, self.lm.adapter.d_model
        scores = torch.zeros(graph.n_writers, graph.n_readers, device=self.keep.device)
        n_keep = len(self.keep)
        step = max(1, DELTA_CHUNK_BYTES // (4 * graph.n_writers * d))
        for start in range(0, n_keep, step):
            rows = slice(start, min(start + step, n_keep))
            delta = self._delta(rows, diff, embeds, ablated)

            def times_delta(up: int, grads: torch.Tensor) -> torch.Tensor:
                # (up, chunk*d) @ (chunk*d, k) -> (up, k), with delta[:up] a contiguous block. Asked
                # for as its transpose, (k, chunk*d) @ (chunk*d, up): the same product, but BLAS
                # runs the skinny k-row shape about twice as fast on CPU.
                return (grads.reshape(-1, grads.shape[-1]).t() @ delta[:up].reshape(up, -1).t()).t()

            for l in range(graph.n_layers):
                up, columns = graph.writers_before(l), graph.attn_readers(l)
                if l in self.full:
                    scores[:up, columns] += times_delta(up, self.full[l][rows])
                elif l in self.head:
                    grads = self.readers[l].expand(self.head[l][rows])  # (chunk, d, R)
                    x_hat = torch.stack([x[rows] for x in self.x_hat[l]], 2)  # (chunk, d, steps)
                    dots = torch.stack([c[rows] for c in self.dots[l]], 1)  # (chunk, steps, R)
                    grads.baddbmm_(x_hat, dots, alpha=-1.0 / d)
                    scores[:up, columns] += times_delta(up, grads)
            for l in range(graph.n_layers + 1):
                reader = graph.logits_reader if l == graph.n_layers else graph.mlp_reader(l)
                if reader in self.resid:
                    up = graph.n_writers if l == graph.n_layers else graph.mlp_reads_up_to(l)
                    scores[:up, reader] += times_delta(up, self.resid[reader][rows].unsqueeze(-1))[:, 0]
        return scores


def _store(seen: dict, key) -> Callable[[torch.Tensor], None]:
    """A hook that puts its tensor, detached, in ``seen[key]`` (a forward value or a gradient)."""

    def fn(t: torch.Tensor) -> None:
        seen[key] = t.detach()

    return fn
