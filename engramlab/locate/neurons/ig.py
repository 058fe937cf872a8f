"""Integrated gradients over MLP neurons: the knowledge-neuron attribution kernels.

For a prompt of P tokens and target tokens t_0..t_{T-1}, the attribution of neuron n of layer l is

    Attr(n) = (a_n - b_n) * sum_k w_k * dF/dx_n  at  x = b + alpha_k * (a - b)

where ``a`` (d_mlp,) is layer l's activation at the last prompt position, ``b`` the baseline and
F the objective. The points (alpha_k, w_k) are those of the integration ``rule`` with m = steps
intervals (``engramlab.locate.integration``): "right" alpha_k = k/m, k = 1..m (the default),
"left" k = 0..m-1 (Dai et al. 2022's code), "trapezoid" k = 0..m with half weights at the ends,
"midpoint" (k - 1/2)/m, k = 1..m, "gauss-legendre" the m Gauss-Legendre nodes mapped to [0, 1].

Baselines: "zero"; "mean", the mean activation over the prompt positions 1..P-2 (position 0 is
left out: its "massive activations" are hundreds of times the others on SmolLM2 and would make
the baseline a scaled copy of it); "mean_all", the mean over positions 0..P-2 (engramlab's old
"mean"). A prompt with no position left falls back to zero.

Objectives, teacher-forced on the gold target tokens in one pass (p_j = P(t_j | prompt, t_<j)):
"prob" prod_j p_j (the joint probability, what the interventions measure), "logprob"
sum_j log p_j (its log), "prob_sum" sum_j p_j (engramlab's old "prob"; AMIG/DKN-style). For a
one-token target "prob" and "prob_sum" are the same.

Only layer l's activation at the last prompt position is replaced; all other layers run as usual
("one layer at a time", as in Dai et al. 2022). The sum rule holds: sum_n Attr(n) -> F(a) - F(b)
as m grows.

The site is ``mlp.neurons`` (input of the MLP output projection: act(gate)*up or act(fc)) or
``pre`` (the pre-activation: output of gate_proj / c_fc / dense_h_to_4h, what older tools edit).

Why the batched kernel is fast (``integrated_gradients``):

1. The prompt prefix (positions 0..P-2) runs once; its keys/values are shared by every row.
2. The "segment" (last prompt token + t_0..t_{T-2}) runs once more on that cache, capturing each
   layer's input (``resid_pre``), the clean activations, and the exact arguments HF passes to
   each decoder layer (mask, rotary embeddings).
3. For a chunk of layers, one batch holds one row per integration point and layer. Rows that
   scale layer l enter the batch at layer l from the cached ``resid_pre[l]`` (layers before l
   are never recomputed) and only the segment positions are computed, reading the prefix from
   the shared keys/values (nothing before the last prompt position can change: the model is
   causal).
4. One backward of the summed objective gives every row its own gradient: rows never interact.

Every layer's batch holds a row at alpha = 1 (appended with weight 0 where the rule has none:
"left", "midpoint", "gauss-legendre"), which runs the unedited activation and must reproduce the
model's own forward: a self-check of the batch. It also holds a row at alpha = 0 (appended with
weight 0 where the rule has none: "right", "midpoint", "gauss-legendre"): with the alpha = 1 row
it gives F(a) - F(b) of every layer, and so the completeness error of the sum rule
(``IGRun.completeness_error``) at the cost of at most two rows per layer.

``integrated_gradients_plain`` is the reference: for each layer and point, a full forward of the
whole sequence with the activation replaced, and a backward. The tests check both agree.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from engramlab.errors import EngramError
from engramlab.locate.integration import integration_tensors
from engramlab.locate.integration_rules import RULES, check_rule  # noqa: F401 (RULES re-exported)
from engramlab.locate.neurons.config import BASELINES, OBJECTIVES, SITES
from engramlab.models.hooks import site_name
from engramlab.models.prefix import PrefixCache
from engramlab.models.scoring import token_logprobs


# -- sites and objective ----------------------------------------------------------------------
def site_hook(lm, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Context manager running ``fn`` on layer ``layer``'s neuron tensor (batch, pos, d_mlp).

    ``neurons`` is the input of the MLP output projection, ``pre`` the pre-activation (gate or
    fc output; the gate half of a fused projection: the adapter's ``mlp_pre``), the hook sites
    ``mlp.neurons`` and ``mlp.pre``.
    ``fn`` returns a replacement tensor or None (leave it)."""
    if site not in SITES:
        raise EngramError(f"neuron site {site!r}: choose one of {', '.join(SITES)}")
    return lm.hooks.hook(site_name("mlp.neurons" if site == "neurons" else "mlp.pre", layer), fn)


def objective_from_logits(logits: torch.Tensor, target_ids: Sequence[int], objective: str) -> torch.Tensor:
    """logits (rows, T, vocab), position j predicting target j -> objective per row, (rows,).

    With log p_j = log P(t_j | prompt, t_<j): "prob" exp(sum_j log p_j) (the joint probability),
    "logprob" sum_j log p_j, "prob_sum" sum_j p_j."""
    if objective not in OBJECTIVES:
        raise EngramError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)} (--objective)")
    logp = token_logprobs(logits, target_ids)  # (rows, T)
    if objective == "prob_sum":
        return logp.exp().sum(-1)
    return logp.sum(-1).exp() if objective == "prob" else logp.sum(-1)


def _put_position(t: torch.Tensor, pos: int, x: torch.Tensor) -> torch.Tensor:
    """t (rows, pos, d) with position ``pos`` of every row replaced by x (rows, d) or (d,).

    Built by concatenation (not in-place) so the graph reaches ``x``."""
    x = x.expand(t.shape[0], t.shape[-1]).unsqueeze(1).to(t.dtype)
    return torch.cat([t[:, :pos], x, t[:, pos + 1:]], dim=1)


def _path(rule: str, steps: int, device, ends: bool | str = True
          ) -> tuple[torch.Tensor, torch.Tensor, int | None, int | None]:
    """The rule's (alphas (n,), weights (n,)) plus the indices of a point at alpha = 1 (the
    self-check row, F(a)) and of one at alpha = 0 (F(b), for the completeness error), None where
    there is none. With ``ends``, a rule without such a point gets it appended with weight 0:
    "left", "midpoint" and "gauss-legendre" lack alpha = 1; "right", "midpoint" and
    "gauss-legendre" lack alpha = 0. ``ends="check"``: only the alpha = 1 row (scores without the
    completeness error need no F(b))."""
    alphas, weights = integration_tensors(rule, steps, device=device)
    for end in {True: (1.0, 0.0), "check": (1.0,), False: ()}[ends]:
        if not bool((alphas == end).any()):
            alphas = torch.cat([alphas, alphas.new_full((1,), end)])
            weights = torch.cat([weights, weights.new_zeros(1)])
    at = lambda end: int(torch.nonzero(alphas == end)[0]) if bool((alphas == end).any()) else None  # noqa: E731
    return alphas, weights, at(1.0), at(0.0)


def _points(a: torch.Tensor, b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The integration points b + alpha_k (a - b) as a leaf: (n, d_mlp)."""
    return (b + alphas[:, None] * (a - b)).detach().requires_grad_(True)


def check_options(steps: int, baseline: str, objective: str, site: str, rule: str = "right") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngramError(f"steps must be a whole number >= 1, got {steps!r} (--steps)")
    if baseline not in BASELINES:
        raise EngramError(f"baseline {baseline!r}: choose one of {', '.join(BASELINES)} (--baseline)")
    if objective not in OBJECTIVES:
        raise EngramError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)} (--objective)")
    if site not in SITES:
        raise EngramError(f"neuron site {site!r}: choose one of {', '.join(SITES)} (--site)")
    check_rule(rule)


def _baseline(prefix_acts: torch.Tensor | None, a: torch.Tensor, baseline: str) -> torch.Tensor:
    """The baseline for activations ``a`` (d_mlp,) from ``prefix_acts`` (P-1, d_mlp), the site
    activations at prompt positions 0..P-2: zero; "mean" the mean over positions 1..P-2;
    "mean_all" the mean over 0..P-2. With no position to average (a one-token prompt, or a
    two-token one for "mean"), zero."""
    rows = None if prefix_acts is None else prefix_acts[1:] if baseline == "mean" else prefix_acts
    if baseline != "zero" and rows is not None and rows.shape[0] > 0:
        return rows.float().mean(0)
    return torch.zeros_like(a)


# -- the batched kernel -------------------------------------------------------------------------
class _CleanRun:
    """What the batched pass needs from the unedited model, computed once per prompt.

    resid[l]  (1, T, d_model)  input of layer l at the segment positions
    acts[l]   (d_mlp,)         site activation at the last prompt position
    prefix[l] (P-1, d_mlp)     site activations at the other prompt positions (mean baseline)
    calls[l]  (args, kwargs)   what HF passed to layer l besides the hidden states
    final     (d_model,)       input of the final norm at the last prompt position (the static
                               score, ``engramlab.locate.neurons.static``, reads it)
    objective float            F of the unedited model (checks the batched pass)
    """

    def __init__(self, lm, prompt_ids: list[int], target_ids: list[int], site: str, objective: str):
        from transformers.cache_utils import Cache

        n = lm.adapter.n_layers
        self.prefix: list[torch.Tensor | None] = [None] * n
        self.resid: list[torch.Tensor] = [None] * n
        self.calls: list[tuple] = [None] * n
        with torch.no_grad():
            cache = self._prefix_pass(lm, prompt_ids[:-1], site)
            logits, acts = self._segment_pass(lm, prompt_ids[-1:] + list(target_ids[:-1]), cache, site)
        self.acts = [t[0, 0].float() for t in acts]
        self.final = self._final[0, 0].float()
        self.prefix = [None if t is None else t[0] for t in self.prefix]
        self.objective = float(objective_from_logits(logits, target_ids, objective)[0])
        # The batched pass calls each layer with what HF passed it here, the shared prefix cache
        # among it: a PrefixCache never grows, so it serves every batch (any other cache is swapped).
        swap = lambda v: cache if isinstance(v, Cache) else v  # noqa: E731
        self.calls = [(tuple(swap(v) for v in args), {k: swap(v) for k, v in kw.items()})
                      for args, kw in self.calls]

    def _prefix_pass(self, lm, prefix_ids: list[int], site: str):
        """Positions 0..P-2: their shared key/value cache (``PrefixCache``; None for a one-token
        prompt) and the site activations there (for the mean baseline)."""
        if not prefix_ids:
            return None
        with ExitStack() as stack:
            for l in range(lm.adapter.n_layers):
                stack.enter_context(site_hook(lm, l, site, self._recorder(self.prefix, l)))
            return PrefixCache.run(lm, prefix_ids)

    def _segment_pass(self, lm, segment_ids: list[int], cache, site: str):
        """The last prompt token and the target tokens but the last, on the prefix cache: logits
        (1, T, vocab), site activations per layer, and each layer's input and call arguments."""
        acts: list[torch.Tensor] = [None] * lm.adapter.n_layers
        with ExitStack() as stack:
            stack.enter_context(lm.hooks.hook(site_name("ln_final.in"), self._final_recorder))
            for l in range(lm.adapter.n_layers):
                stack.enter_context(site_hook(lm, l, site, self._recorder(acts, l)))
                handle = lm.adapter.layers[l].register_forward_pre_hook(self._call_recorder(l), with_kwargs=True)
                stack.callback(handle.remove)
            logits = lm.model(input_ids=torch.tensor([segment_ids], device=lm.device), cache=cache,
                              use_cache=cache is not None).logits
        return logits, acts

    def _final_recorder(self, t):
        self._final = t.detach()

    @staticmethod
    def _recorder(store: list, layer: int):
        def record(t):
            store[layer] = t.detach()
        return record

    def _call_recorder(self, layer: int):
        def record(module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            self.resid[layer] = hidden.detach()
            self.calls[layer] = (rest, kwargs)
        return record


def _run_layers(lm, clean: _CleanRun, start: int, hidden: torch.Tensor | None, entering: dict[int, int]):
    """Run decoder layers start..L-1 on ``hidden`` (rows, T, d_model); before layer l, append
    ``entering[l]`` rows of the clean input of layer l. Returns the final hidden states."""
    for l in range(start, lm.adapter.n_layers):
        if l in entering:
            fresh = clean.resid[l].expand(entering[l], -1, -1)
            hidden = fresh if hidden is None else torch.cat([hidden, fresh], dim=0)
        args, kwargs = clean.calls[l]
        out = lm.adapter.layers[l](hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    return lm.adapter.unembed(lm.adapter.final_norm(hidden))


# On a CPU, more rows per batch stop paying off early (SmolLM2, m = 20: 4 to 30 layers per batch
# all take the same time) while memory grows with them, so the automatic size stops near 128 rows;
# on a GPU only memory limits it.
CPU_ROWS = 128


def auto_batch_layers(lm, steps: int, n_segment: int, n_prompt: int, budget_bytes: int | None = None) -> int:
    """How many layers one batch holds, with ``steps`` rows per layer (the integration points):
    within a memory budget (a rough upper estimate of what autograd keeps: ~16 d_model + 6 d_mlp
    + attention scores per row, layer and position, plus three copies of the logits per row)
    and, on a CPU, about ``CPU_ROWS`` rows."""
    a = lm.adapter
    if budget_bytes is None:
        budget_bytes = 2 * 1024**3
        if lm.device.type == "cuda":
            budget_bytes = int(torch.cuda.mem_get_info(lm.device)[0] * 0.5)
    item = torch.finfo(lm.dtype).bits // 8
    per_row_layer = item * n_segment * (16 * a.d_model + 6 * a.d_mlp + 2 * a.n_heads * (n_prompt + n_segment))
    per_row_head = 4 * 3 * n_segment * a.vocab_size
    most = a.n_layers if lm.device.type == "cuda" else max(1, CPU_ROWS // steps)
    for size in range(min(most, a.n_layers), 0, -1):
        if steps * size * (a.n_layers * per_row_layer + per_row_head) <= budget_bytes:
            return size
    return 1


@dataclass
class IGRun:
    """What one prompt's batched integrated gradients give besides the scores.

    scores      (n_layers, d_mlp)  Attr(n); zeros off ``layers``
    layers      the layers attributed
    f_input     {layer: F(a)}      the objective at alpha = 1 (the unedited model)
    f_baseline  {layer: F(b)}      the objective with layer l's activation at its baseline
    n_passes    forward(+backward) passes: 1 for the clean run (prefix and segment together
                are one forward of prompt + target[:-1]) and one per batch row, i.e. per
                (layer, integration point) including the rows at alpha = 1 and 0 that the rule
                lacks (each row runs forward from its layer and backward)
    clean       the unedited run (``_CleanRun``), reusable for the static score
    """

    scores: torch.Tensor
    layers: list[int]
    f_input: dict[int, float]
    f_baseline: dict[int, float]
    n_passes: int
    clean: "_CleanRun | None" = None

    def completeness_error(self) -> float | None:
        """sum_l |sum_n Attr_l(n) - (F(a) - F_l(b))| / sum_l |F(a) - F_l(b)| over the attributed
        layers: the per-layer relative error of the sum rule, averaged over layers with weights
        |F(a) - F_l(b)| (a plain mean would be ruled by layers whose change is ~0, where any
        rounding is a large relative error). None when no layer changes F at all."""
        if any(l not in self.f_input for l in self.layers):
            return None  # run with ends=False and a rule lacking an end
        return completeness_error(self.scores, self.f_input, self.f_baseline, self.layers)


def completeness_error(scores: torch.Tensor, f_input: dict[int, float], f_baseline: dict[int, float],
                       layers: Sequence[int]) -> float | None:
    """See ``IGRun.completeness_error``; ``scores`` (n_layers, d_mlp)."""
    gap = sum(abs(float(scores[l].double().sum()) - (f_input[l] - f_baseline[l])) for l in layers)
    scale = sum(abs(f_input[l] - f_baseline[l]) for l in layers)
    return gap / scale if scale > 0 else None


def integrated_gradients(lm, prompt_ids: list[int], target_ids: list[int], steps: int = 20,
                         baseline: str = "zero", objective: str = "prob", site: str = "neurons",
                         layers: Sequence[int] | None = None, batch_layers: int | None = None,
                         rule: str = "right", ends: bool | str = "check") -> torch.Tensor:
    """Attribution scores (n_layers, d_mlp) at the last prompt position (see module docstring).

    Layers not in ``layers`` (default: all) get zeros. ``batch_layers`` layers share one batch of
    ``batch_layers * n`` rows, n the number of integration points of ``rule`` (None: as many
    layers as ``auto_batch_layers`` allows). ``integrated_gradients_run`` also returns the ends
    of the path (the completeness error) and the pass count; ``ends``: see there (by default here
    only the alpha = 1 self-check row is added: no weight-0 alpha = 0 row for a completeness error
    nobody reads)."""
    return integrated_gradients_run(lm, prompt_ids, target_ids, steps, baseline, objective, site, layers,
                                    batch_layers, rule, ends=ends).scores


def clean_run(lm, prompt_ids: list[int], target_ids: list[int], site: str = "neurons",
              objective: str = "prob") -> "_CleanRun":
    """The unedited forward of prompt + target[:-1] that ``integrated_gradients_run`` starts from
    (one pass); pass it back in as ``clean`` to reuse it (the screen scores layers on it first)."""
    check_options(1, "zero", objective, site)
    if not prompt_ids or not target_ids:
        raise EngramError("integrated gradients needs a non-empty prompt and at least one target token")
    return _CleanRun(lm, list(prompt_ids), list(target_ids), site, objective)


def integrated_gradients_run(lm, prompt_ids: list[int], target_ids: list[int], steps: int = 20,
                             baseline: str = "zero", objective: str = "prob", site: str = "neurons",
                             layers: Sequence[int] | None = None, batch_layers: int | None = None,
                             rule: str = "right", clean: "_CleanRun | None" = None,
                             ends: bool | str = True) -> IGRun:
    """``integrated_gradients`` with F at both ends of every layer's path and the pass count
    (``IGRun``). ``clean`` (from ``clean_run`` with the same ids, site and objective) saves the
    clean forward; it is then not counted again. ``ends=False`` adds no weight-0 rows: only the
    rule's own points run (fastest; the self-check and F at an end the rule lacks are then
    skipped, and ``completeness_error`` is None unless the rule has both ends); ``ends="check"``
    adds only the alpha = 1 row (the self-check, not the completeness error)."""
    check_options(steps, baseline, objective, site, rule)
    if not prompt_ids or not target_ids:
        raise EngramError("integrated gradients needs a non-empty prompt and at least one target token")
    if batch_layers is not None and batch_layers < 1:
        raise EngramError(f"batch_layers must be >= 1 (or None for automatic), got {batch_layers}")
    n_layers = lm.adapter.n_layers
    layers = sorted(set(range(n_layers) if layers is None else layers))
    passes = 0
    if clean is None:
        clean, passes = _CleanRun(lm, list(prompt_ids), list(target_ids), site, objective), 1
    alphas, weights, check_row, zero_row = _path(rule, steps, clean.acts[0].device, ends)
    n = len(alphas)
    size = batch_layers or auto_batch_layers(lm, n, len(target_ids), len(prompt_ids))
    scores = torch.zeros(n_layers, lm.adapter.d_mlp)
    f_input, f_baseline = {}, {}
    for first in range(0, len(layers), size):
        chunk = layers[first: first + size]
        points, bases = {}, {}
        for l in chunk:
            bases[l] = _baseline(clean.prefix[l], clean.acts[l], baseline)
            points[l] = _points(clean.acts[l], bases[l], alphas)

        def scaler(l):
            # The rows that scale layer l are the last n rows when the batch reaches layer l.
            return lambda t: torch.cat([t[:-n], _put_position(t[-n:], 0, points[l])], dim=0)

        with torch.enable_grad(), ExitStack() as stack:
            for l in chunk:
                stack.enter_context(site_hook(lm, l, site, scaler(l)))
            hidden = _run_layers(lm, clean, chunk[0], None, {l: n for l in chunk})
            values = objective_from_logits(_logits(lm, hidden), target_ids, objective)  # (rows,)
            grads = torch.autograd.grad(values.sum(), [points[l] for l in chunk])
        passes += len(chunk) * n
        at_points = values.detach().double().view(len(chunk), n)
        if check_row is not None:
            _check_against_clean(lm, at_points[:, check_row], clean.objective)
        for j, (l, g) in enumerate(zip(chunk, grads)):
            scores[l] = ((clean.acts[l] - bases[l]) * (weights[:, None] * g.float()).sum(0)).cpu()
            if check_row is not None and zero_row is not None:
                f_input[l], f_baseline[l] = float(at_points[j, check_row]), float(at_points[j, zero_row])
    return IGRun(scores, layers, f_input, f_baseline, passes, clean)


def _check_against_clean(lm, full_scale_values: torch.Tensor, clean_value: float) -> None:
    """The rows at alpha = 1 run the unedited activation, so they must reproduce the model's own
    forward; a family whose layers need inputs we did not capture would fail loudly here."""
    tol = 1e-3 if lm.dtype == torch.float32 else 5e-2
    worst = float((full_scale_values.float() - clean_value).abs().max())
    if worst > tol * max(1.0, abs(clean_value)):
        raise EngramError(f"batched integrated gradients disagree with the model's own forward pass by {worst:.3g} "
                          f"({lm.model.config.model_type}); use integrated_gradients_plain and report this model")


# -- the plain reference ------------------------------------------------------------------------
def integrated_gradients_plain(lm, prompt_ids: list[int], target_ids: list[int], steps: int = 20,
                               baseline: str = "zero", objective: str = "prob", site: str = "neurons",
                               layers: Sequence[int] | None = None, batch_steps: bool = False,
                               rule: str = "right") -> torch.Tensor:
    """The same scores computed the plain way: for each layer and each integration point a full
    forward of prompt + target[:-1] with the last prompt position replaced, then a backward.

    ``batch_steps=True`` puts the points of one layer in one batch (what the knowledge-neurons
    package does); the layers before the scaled one are still recomputed for every row."""
    check_options(steps, baseline, objective, site, rule)
    alphas, weights = integration_tensors(rule, steps)
    n_layers = lm.adapter.n_layers
    pos, n_target = len(prompt_ids) - 1, len(target_ids)
    ids = torch.tensor([list(prompt_ids) + list(target_ids[:-1])], device=lm.device)
    acts: list[torch.Tensor] = [None] * n_layers
    with torch.no_grad(), ExitStack() as stack:
        for l in range(n_layers):
            stack.enter_context(site_hook(lm, l, site, _CleanRun._recorder(acts, l)))
        lm.model(input_ids=ids)
    scores = torch.zeros(n_layers, lm.adapter.d_mlp)
    for l in (range(n_layers) if layers is None else sorted(set(layers))):
        a = acts[l][0, pos].float()
        b = _baseline(acts[l][0, :pos], a, baseline)
        points = _points(a, b, alphas.to(a.device))
        total = torch.zeros_like(a)
        groups = [points] if batch_steps else list(points.split(1))
        for x in groups:
            with torch.enable_grad(), site_hook(lm, l, site, lambda t, x=x: _put_position(t, pos, x)):
                logits = lm.model(input_ids=ids.expand(x.shape[0], -1)).logits[:, pos: pos + n_target]
                value = objective_from_logits(logits, target_ids, objective).sum()
                grad = torch.autograd.grad(value, points)[0].float()  # (n, d_mlp), zero off this group
                total += (weights.to(a.device)[:, None] * grad).sum(0)
        scores[l] = ((a - b) * total).cpu()
    return scores
