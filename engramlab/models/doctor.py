"""``run_doctor(lm)``: self-checks of an architecture adapter on the model it is given.

Every number engramlab reports rests on the adapter naming the right tensors. The doctor runs a
few forward passes and one backward pass of a fixed input (``doctor_ids``: 2 rows of 8 seeded
random token ids) and checks, on that model, what the rest of the code assumes:

=============  ==================================================================================
check          what must hold (``tol`` = ``tolerance(dtype)``: 1e-5 for float32)
=============  ==================================================================================
logits         the logits of the plain HF forward equal those of the adapter's path: the forward
               with every site hooked, and the unembedding ln_final.out @ W_U (+ bias); max
               |diff| <= tol (absolute). The eager attention path that the ``attn.pattern``
               sites switch to: max |diff| <= tol * max(1, max |logit|)
sites          every documented site (``HookPoints.names()``) fires exactly once per forward and
               holds a finite tensor of its documented shape (``HookPoints.shape``)
write_back     capturing every editable site and writing the captured tensor back, in the same
               pass and from an earlier capture pass (as patching does), leaves the logits
               bit-identical (``torch.equal``); on failure each site is tried alone
heads          sum_h z_h @ W_O[h] + b_O = attn.out in every layer (the per-head decomposition
               the circuit code uses); max |diff| <= tol * max(1, max |attn.out|)
residual       resid_pre + attn.out + mlp.out = resid_post, resid_pre + attn.out = resid_mid
               (sequential blocks), neurons @ W_out + b_out = mlp.out, resid_post(l) is
               resid_pre(l+1) and ln_final.in is the last resid_post, bit for bit;
               max |diff| <= tol * max(1, max |reference|)
gradients      backward from sum_b logit[b, -1, t_b] (t_b: the plain forward's top token) gives
               every site one finite, non-zero gradient of the site's shape, and the gradient at
               ``ln_final.out`` is W_U[:, t_b] at the last position and 0 elsewhere (<= tol * scale)
=============  ==================================================================================

Each check is a function ``(lm, state) -> Check`` with its name, whether it passed and a detail
line holding the measured number, so a table can say what failed and by how much.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from engramlab.models.hooks import site_name

BATCH, SEQ_LEN, SEED = 2, 8, 0
FLOAT32_TOL = 1e-5
MAX_LISTED = 3  # failing sites named in a detail line


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table: ``value`` is the measured number (a max |diff|, a count)."""

    name: str
    passed: bool
    detail: str
    value: float | None = None

    def row(self) -> dict:
        return asdict(self)


def tolerance(dtype: torch.dtype) -> float:
    """1e-5 in float32, scaled by the dtype's machine epsilon for other dtypes (bfloat16: ~0.66,
    float16: ~0.082): the same number of units in the last place."""
    return FLOAT32_TOL * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps


def doctor_ids(lm, batch: int = BATCH, seq_len: int = SEQ_LEN, seed: int = SEED) -> torch.Tensor:
    """(batch, seq_len) token ids drawn uniformly from the vocabulary with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.adapter.vocab_size, (batch, seq_len), generator=g).to(lm.device)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _scale(t: torch.Tensor) -> float:
    return max(1.0, float(t.float().abs().max()))


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def _is_pattern(name: str) -> bool:
    return name.endswith("attn.pattern")


class _State:
    """The forward passes every check shares, run once.

    ``plain``: logits of the unhooked HF forward (batch, pos, vocab); ``hooked`` / ``c_hooked``:
    the forward with every site except the patterns captured (the default attention path) and its
    captures; ``eager`` / ``c_all``: every site captured, patterns included (the eager path);
    ``fired``: how often each site ran in that pass."""

    def __init__(self, lm):
        self.lm, self.ids, self.tol = lm, doctor_ids(lm), tolerance(lm.dtype)
        self.names = lm.hooks.names()
        self.plain = self.forward()
        self.hooked, self.c_hooked, _ = self.captured([n for n in self.names if not _is_pattern(n)])
        self.eager, self.c_all, self.fired = self.captured(self.names)

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        return self.lm.model(input_ids=self.ids).logits

    def captured(self, names: list[str]):
        cache: dict[str, torch.Tensor] = {}
        fired = {n: 0 for n in names}

        def recorder(n):
            def record(t):
                fired[n] += 1
                cache[n] = t.detach().clone()
            return record

        with ExitStack() as stack:
            for n in names:
                stack.enter_context(self.lm.hooks.hook(n, recorder(n)))
            logits = self.forward()
        return logits, cache, fired

    def written_back(self, names: list[str], cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits with each site in ``names`` written back: with no ``cache``, the tensor each site
        holds in this very pass (captured and written back at once, so a wrong view at one site
        reaches the logits through every later site); with ``cache``, the tensors captured in an
        earlier pass (``HookPoints.replace``, as patching does; a fresh copy each, since some
        models modify module outputs in place)."""
        with ExitStack() as stack:
            for n in names:
                if cache is None:
                    stack.enter_context(self.lm.hooks.hook(n, lambda t: t.clone()))
                else:
                    stack.enter_context(self.lm.hooks.replace(n, cache[n].clone()))
            return self.forward()


# -- the checks -------------------------------------------------------------------------------------
def check_logits(lm, s: _State) -> Check:
    """The adapter's path (every site hooked; the unembedding of ln_final.out) within ``tol``
    absolute of the HF forward; the eager attention path within ``tol * max|logits|`` (another
    attention kernel: its float32 rounding differs and grows with the logits' scale)."""
    a = lm.adapter
    unembed = s.c_hooked["ln_final.out"] @ a.W_U.detach()
    bias = getattr(a.unembed, "bias", None)
    if bias is not None:
        unembed = unembed + bias.detach()
    path = max(_maxdiff(s.hooked, s.plain), _maxdiff(unembed, s.plain))
    eager, eager_tol = _maxdiff(s.eager, s.plain), s.tol * _scale(s.plain)
    ok = path <= s.tol and eager <= eager_tol
    detail = (f"adapter path: max |diff| = {path:.3g} {'<=' if path <= s.tol else '>'} {s.tol:.2g}; "
              f"eager attention: {eager:.3g} {'<=' if eager <= eager_tol else '>'} {eager_tol:.2g} "
              f"(= {s.tol:.2g} * max |logit| {_scale(s.plain):.3g})")
    return Check("logits", ok, detail, path)


def check_sites(lm, s: _State) -> Check:
    bad = []
    b, pos = s.ids.shape
    for n in s.names:
        want = lm.hooks.shape(n, b, pos)
        if s.fired[n] != 1:
            bad.append(f"{n} fired {s.fired[n]} times, not once")
        elif tuple(s.c_all[n].shape) != want:
            bad.append(f"{n} has shape {tuple(s.c_all[n].shape)}, documented {want}")
        elif not bool(torch.isfinite(s.c_all[n]).all()):
            bad.append(f"{n} holds non-finite values")
    if bad:
        return Check("sites", False, f"{len(bad)} of {len(s.names)} sites wrong: {_listed(bad)}", float(len(bad)))
    return Check("sites", True, f"all {len(s.names)} sites fired once with their documented shapes",
                 float(len(s.names)))


def check_write_back(lm, s: _State) -> Check:
    """Every editable site captured and written back in the same pass, on the default attention
    path (patterns left out) and on the eager one (patterns in): logits bit-identical. Then every
    site replaced by its tensor from the capture pass, as patching does: bit-identical too. On a
    failure each site is tried alone, to name the culprits."""
    editable = [n for n in s.names if lm.hooks.site(n).editable]
    default = [n for n in editable if not _is_pattern(n)]
    runs = [(default, None, s.hooked), (editable, None, s.eager), (default, s.c_hooked, s.hooked),
            (editable, s.c_all, s.eager)]
    if all(torch.equal(s.written_back(names, cache), ref) for names, cache, ref in runs):
        return Check("write_back", True, f"logits bit-identical with all {len(editable)} editable sites "
                     "captured and written back", 0.0)
    bad = []
    for n in editable:  # name the culprits: one site at a time
        cache, ref = (s.c_all, s.eager) if _is_pattern(n) else (s.c_hooked, s.hooked)
        worst = max(_maxdiff(s.written_back([n], c), ref) for c in (None, cache))
        if worst != 0:
            bad.append(f"{n} (max |diff| {worst:.2g})")
    what = _listed(bad) if bad else "only when written back together"
    return Check("write_back", False, f"logits change when captured sites are written back: {what}",
                 float(len(bad)))


def check_heads(lm, s: _State) -> Check:
    a, worst, bad = lm.adapter, 0.0, []
    try:
        w_o = [a.W_O(l) for l in range(a.n_layers)]
    except NotImplementedError:
        return Check("heads", True, "skipped: the adapter has no per-head W_O", None)
    for l in range(a.n_layers):
        z, out = s.c_hooked[site_name("attn.heads", l)], s.c_hooked[site_name("attn.out", l)]
        got = torch.einsum("bphd,hdm->bpm", z.float(), w_o[l].detach().float())
        b_o = a.b_O(l)
        if b_o is not None:
            got = got + b_o.detach().float()
        d, tol = _maxdiff(got, out), s.tol * _scale(out)
        worst = max(worst, d / _scale(out))
        if d > tol:
            bad.append(f"layer {l}: max |sum_h z_h W_O[h] + b_O - attn.out| = {d:.3g} > {tol:.2g}")
    if bad:
        return Check("heads", False, f"per-head outputs do not add up to attn.out: {_listed(bad)}", worst)
    return Check("heads", True, f"sum_h z_h W_O[h] + b_O = attn.out in {a.n_layers} layers "
                 f"(max |diff| / scale = {worst:.2g} <= {s.tol:.2g})", worst)


def check_residual(lm, s: _State) -> Check:
    a, c, worst, bad = lm.adapter, s.c_hooked, 0.0, []

    def close(label: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        nonlocal worst
        d = _maxdiff(got, ref) / _scale(ref)
        worst = max(worst, d)
        if d > s.tol:
            bad.append(f"{label}: max |diff| / scale = {d:.3g} > {s.tol:.2g}")

    def same(label: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if not torch.equal(x, y):
            bad.append(f"{label}: not bit-identical (max |diff| {_maxdiff(x, y):.2g})")

    for l in range(a.n_layers):
        pre, attn, mlp = (c[site_name(k, l)] for k in ("resid_pre", "attn.out", "mlp.out"))
        close(f"layer {l} resid_pre + attn.out + mlp.out vs resid_post", pre + attn + mlp,
              c[site_name("resid_post", l)])
        if not a.parallel_residual:
            close(f"layer {l} resid_pre + attn.out vs resid_mid", pre + attn, c[site_name("resid_mid", l)])
        b_out = a.b_out(l)
        neurons = c[site_name("mlp.neurons", l)].float() @ a.W_out(l).detach().float()
        close(f"layer {l} neurons @ W_out + b_out vs mlp.out",
              neurons + (b_out.detach().float() if b_out is not None else 0), mlp)
        if l + 1 < a.n_layers:
            same(f"resid_post {l} vs resid_pre {l + 1}", c[site_name("resid_post", l)],
                 c[site_name("resid_pre", l + 1)])
    same("ln_final.in vs last resid_post", c["ln_final.in"], c[site_name("resid_post", a.n_layers - 1)])
    if bad:
        return Check("residual", False, f"the residual stream does not add up: {_listed(bad)}", worst)
    return Check("residual", True, f"residual stream and MLP writers add up in {a.n_layers} layers "
                 f"(max |diff| / scale = {worst:.2g} <= {s.tol:.2g})", worst)


def check_gradients(lm, s: _State) -> Check:
    a, names = lm.adapter, s.names
    targets = s.plain[:, -1].argmax(-1)  # (batch,)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(n):
        return lambda g: grads[n].append(g.detach().clone())

    embeds: list[torch.Tensor] = []

    def leaf(module, args, out):  # frozen parameters: start the graph at the embeddings
        embeds.append(out if out.requires_grad else out.detach().requires_grad_(True))
        return embeds[-1]

    handle = a.embed.register_forward_hook(leaf)
    try:
        with torch.enable_grad(), ExitStack() as stack:
            for n in names:
                stack.enter_context(lm.hooks.grad(n, keep(n)))
            logits = lm.model(input_ids=s.ids).logits
            objective = logits[torch.arange(len(targets)), -1, targets].float().sum()
            torch.autograd.grad(objective, embeds)
    finally:
        handle.remove()
    b, pos = s.ids.shape
    bad = []
    for n in names:
        g = grads[n]
        if len(g) != 1:
            bad.append(f"{n} got {len(g)} gradients, not one")
        elif tuple(g[0].shape) != lm.hooks.shape(n, b, pos):
            bad.append(f"{n} gradient has shape {tuple(g[0].shape)}, documented {lm.hooks.shape(n, b, pos)}")
        elif not bool(torch.isfinite(g[0]).all()):
            bad.append(f"{n} gradient is not finite")
        elif float(g[0].abs().max()) == 0.0:
            bad.append(f"{n} gradient is zero")
    # independent closed form: d logit_t / d ln_final.out = W_U[:, t] at the last position, 0 elsewhere
    d = None
    if len(grads["ln_final.out"]) == 1:
        want = torch.zeros(b, pos, a.d_model, device=s.ids.device)
        want[:, -1] = a.W_U.detach().float()[:, targets].t()
        d = _maxdiff(grads["ln_final.out"][0], want)
        if d > s.tol * _scale(want):
            bad.append(f"ln_final.out gradient differs from W_U[:, target] by {d:.3g}")
    if bad:
        return Check("gradients", False, f"{len(bad)} problems: {_listed(bad)}", float(len(bad)))
    return Check("gradients", True, f"all {len(names)} sites got one finite non-zero gradient; at ln_final.out "
                 f"it is W_U[:, target] (max |diff| {d:.2g})", d)


CHECKS: tuple[Callable, ...] = (check_logits, check_sites, check_write_back, check_heads, check_residual,
                                check_gradients)
CHECK_NAMES = ("logits", "sites", "write_back", "heads", "residual", "gradients")


def run_doctor(lm) -> list[Check]:
    """Every check of the module docstring on ``lm`` (a ``LoadedModel``), in order. A check that
    raises is a failed check naming the exception, so one broken site cannot hide the others."""
    try:
        s = _State(lm)
    except Exception as e:  # noqa: BLE001
        return [Check("forward", False, f"the hooked forward pass raised {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}")]
    out = []
    for fn, name in zip(CHECKS, CHECK_NAMES):
        try:
            out.append(fn(lm, s))
        except Exception as e:  # noqa: BLE001 - the doctor reports, it does not crash
            out.append(Check(name, False, f"raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    return out


def summary(checks: list[Check]) -> dict:
    """The flat ``summary.json`` keys: doctor.passed, doctor.n_checks, doctor.n_failed, doctor.<check>."""
    failed = [c for c in checks if not c.passed]
    return {"doctor.passed": not failed, "doctor.n_checks": len(checks), "doctor.n_failed": len(failed),
            **{f"doctor.{c.name}": c.passed for c in checks}}


__all__ = ["CHECKS", "CHECK_NAMES", "Check", "doctor_ids", "run_doctor", "summary", "tolerance"]
