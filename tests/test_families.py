"""Every model type the adapters accept, on a tiny random model, against plain recomputation.

The cases are enumerated from ``supported_model_types()``: adding a type to an adapter without a
tiny config (``engramlab.models.tiny``) makes these tests fail. For each type:

* the forward pass is unchanged by hooks: capture and write back every site bit for bit, and
  the eager pattern path agrees with the default attention;
* the residual stream adds up: resid_pre + attn.out + mlp.out = resid_post (resid_mid =
  resid_pre + attn.out when sequential), and the heads through W_O sum to attn.out;
* q/k/v, the pattern and the heads agree: z_h = pattern_h @ v_{kv_head(h)} (GQA), and the weight
  views of q/k/v and of the MLP reproduce the sites they name;
* the DKN read vectors (norm folded) give the MLP pre-activations up to the per-position 1/rms;
* the branch-input sites (attn.in, mlp.in, ln_final.in) hold what the norm modules receive and
  editing them changes only that branch; every site's ``grad`` hook equals autograd's gradient
  with respect to a tensor substituted at the site; every norm's ``norm_spec`` reproduces it, and
  the attention readers' folded weights give the q/k/v projections;
* batched integrated gradients equal the plain per-step reference, and EAP-IG equals the
  per-reader residual-copy reference of tests/test_circuits.py.
"""

from __future__ import annotations

import pytest
import torch
from test_circuits import reference_scores
from transformers.activations import ACT2FN

from engramlab.errors import EngramError
from engramlab.locate.circuits import CircuitGraph, attribute_batch
from engramlab.locate.circuits.data import batch_from_ids
from engramlab.locate.circuits.readers import AttentionReaders
from engramlab.locate.neurons.ig import integrated_gradients, integrated_gradients_plain
from engramlab.locate.dkn.graph import read_vectors
from engramlab.models import get_adapter, supported_model_types, tiny_model, wrap_model
from engramlab.models.hooks import site_name

CASES = [(t, {}) for t in supported_model_types()] + [("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = [t for t, _ in CASES[:-1]] + ["gpt_neox-sequential"]
IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 2], [7, 7, 1, 30, 12, 60, 4, 11]])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=CASES, ids=CASE_IDS)
def lm(request):
    """A tiny model whose 1-d parameters (norm gains and biases) are moved off their 1/0 initial
    values, so folding them anywhere is exercised."""
    model_type, kw = request.param
    model = tiny_model(model_type, seed=0, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return wrap_model(model)


def run(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def sites(lm, layer):
    return {s: f"blocks.{layer}.{s}" for s in ("resid_pre", "resid_mid", "resid_post", "attn.in", "attn.q", "attn.k",
                                               "attn.v", "attn.pattern", "attn.heads", "attn.out", "mlp.in",
                                               "mlp.pre", "mlp.neurons", "mlp.out")
            if not (s == "resid_mid" and lm.adapter.parallel_residual)}


def capture_all(lm, ids=IDS, pattern=True):
    """Every site of every layer; with ``pattern`` the run takes the eager attention path."""
    names = [n for l in range(lm.adapter.n_layers) for n in sites(lm, l).values()
             if pattern or not n.endswith("attn.pattern")] + ["ln_final.in", "ln_final.out"]
    with lm.hooks.capture(names) as c:
        out = run(lm, ids)
    return c, out


def constant_over_rows(diff):
    """True when diff (batch, pos, ...) is the same at every (batch, pos): a bias."""
    flat = diff.flatten(0, 1)
    return torch.allclose(flat, flat[:1].expand_as(flat), atol=1e-5)


# -- which types ------------------------------------------------------------------------------------
def test_cases_cover_every_supported_type():
    assert {t for t, _ in CASES} == set(supported_model_types())
    for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "gemma", "phi3", "gpt2", "gpt_neox"):
        assert t in supported_model_types()


def test_post_norm_olmo2_is_refused_with_the_reason():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("olmo2", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, pad_token_id=None, eos_token_id=1)
    with pytest.raises(EngramError, match="'olmo2'.*post-norm.*use a pre-norm model .*llama"):
        get_adapter(AutoModelForCausalLM.from_config(cfg))


# -- forward pass -----------------------------------------------------------------------------------
def test_hooks_leave_the_forward_pass_unchanged(lm):
    plain = run(lm)
    c, captured = capture_all(lm, pattern=False)
    assert torch.equal(captured, plain)
    assert torch.allclose(c["ln_final.out"] @ lm.adapter.W_U, plain, atol=1e-5)
    eager_c, eager = capture_all(lm)  # the pattern sites switch to the eager attention path
    assert torch.allclose(eager, plain, atol=1e-5)
    for layer in range(lm.adapter.n_layers):
        for name in sites(lm, layer).values():
            assert (eager_c if name.endswith("attn.pattern") else c)[name].shape == lm.hooks.shape(name, *IDS.shape)
            if not lm.hooks.site(name).editable:
                continue
            pattern = name.endswith("attn.pattern")
            with lm.hooks.replace(name, (eager_c if pattern else c)[name]):
                again = run(lm)
            assert torch.equal(again, eager if pattern else plain), name


def test_residual_stream_adds_up(lm):
    a, (c, _) = lm.adapter, capture_all(lm)
    for l in range(a.n_layers):
        s = sites(lm, l)
        pre, attn, mlp = c[s["resid_pre"]], c[s["attn.out"]], c[s["mlp.out"]]
        assert torch.allclose(pre + attn + mlp, c[s["resid_post"]], atol=1e-5)
        if not a.parallel_residual:
            assert torch.allclose(pre + attn, c[s["resid_mid"]], atol=1e-5)
        if l + 1 < a.n_layers:
            assert torch.equal(c[s["resid_post"]], c[f"blocks.{l + 1}.resid_pre"])
        b_O = a.b_O(l) if a.b_O(l) is not None else 0
        heads = torch.einsum("bphd,hdm->bpm", c[s["attn.heads"]], a.W_O(l))
        assert torch.allclose(heads + b_O, attn, atol=1e-5)
    assert torch.allclose(a.final_norm(c[f"blocks.{a.n_layers - 1}.resid_post"]), c["ln_final.out"], atol=1e-5)


def test_attention_sites_and_grouped_query_heads(lm):
    a, cfg, (c, _) = lm.adapter, lm.model.config, capture_all(lm)
    kv = torch.tensor([a.kv_head(h) for h in range(a.n_heads)])
    assert torch.equal(kv, torch.arange(a.n_heads) // (a.n_heads // a.n_kv_heads))
    window = getattr(cfg, "sliding_window", None)
    for l in range(a.n_layers):
        s = sites(lm, l)
        x = a.attn_norm(l)(c[s["resid_pre"]])
        for site, w in (("attn.q", a.W_Q(l)), ("attn.k", a.W_K(l)), ("attn.v", a.W_V(l))):
            assert constant_over_rows(c[s[site]] - torch.einsum("bpm,hmd->bphd", x, w)), site
        pat, v = c[s["attn.pattern"]], c[s["attn.v"]]
        assert torch.allclose(pat.sum(-1), torch.ones_like(pat[..., 0]), atol=1e-5)
        assert torch.all(pat.triu(1) == 0)
        layer_type = (getattr(cfg, "layer_types", None) or ["sliding_attention"] * a.n_layers)[l]
        if window is not None and layer_type == "sliding_attention":
            assert torch.all(pat.tril(-window) == 0) and torch.any(pat.tril(-window + 1) > 0)
        if getattr(cfg, "clip_qkv", None) is not None:  # OLMo clips q/k/v after the projections
            v = v.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        z = torch.einsum("bhqk,bkhd->bqhd", pat, v[:, :, kv])  # each query head reads its kv head
        assert torch.allclose(z, c[s["attn.heads"]], atol=1e-5)


def test_weight_views_edit_the_live_model(lm):
    a, site = lm.adapter, "blocks.0.attn.heads"
    with lm.hooks.capture(site) as before:
        run(lm)
    with torch.no_grad():
        a.W_V(0)[1] += 0.05 * torch.randn(a.W_V(0)[1].shape, generator=torch.Generator().manual_seed(0))
    with lm.hooks.capture(site) as after:
        run(lm)
    moved = (after[site] - before[site]).abs().amax(dim=(0, 1, 3)) > 0  # per query head
    assert moved.tolist() == [a.kv_head(h) == 1 for h in range(a.n_heads)]


def test_mlp_sites_and_weight_views(lm):
    a, cfg, (c, _) = lm.adapter, lm.model.config, capture_all(lm)
    act = ACT2FN[getattr(cfg, "activation_function", None) or cfg.hidden_act]
    for l in range(a.n_layers):
        s = sites(lm, l)
        resid_in = c[s["resid_pre"]] if a.parallel_residual else c[s["resid_mid"]]
        x = a.mlp_norm(l)(resid_in)
        assert torch.allclose(a.mlp(l)(x), c[s["mlp.out"]], atol=1e-5)  # mlp_norm is what the MLP reads
        pre, neurons = c[s["mlp.pre"]], c[s["mlp.neurons"]]
        if a.has_gated_mlp:
            assert torch.allclose(pre, x @ a.W_gate(l), atol=1e-5)
            assert torch.allclose(neurons, act(pre) * (x @ a.W_in(l)), atol=1e-5)
        else:
            assert a.W_gate(l) is None and constant_over_rows(pre - x @ a.W_in(l))
            assert torch.allclose(neurons, act(pre), atol=1e-5)
        b_out = a.b_out(l) if a.b_out(l) is not None else 0
        assert torch.allclose(neurons @ a.W_out(l) + b_out, c[s["mlp.out"]], atol=1e-5)


def test_folded_read_vectors_give_the_pre_activations(lm):
    """norm(x) @ w_i = rstd(x) * (x . r_i) + norm(0) @ w_i for every neuron i: the folded read
    vector r_i carries the norm's gain (and centring); only the 1/rms factor depends on x."""
    a, (c, _) = lm.adapter, capture_all(lm)
    for l in range(a.n_layers):
        x = c[f"blocks.{l}.resid_pre"] if a.parallel_residual else c[f"blocks.{l}.resid_mid"]
        norm, idx = a.mlp_norm(l), list(range(0, a.d_mlp, 3))
        mats = [a.W_in(l)] + ([a.W_gate(l)] if a.has_gated_mlp else [])
        for w, r in zip(mats, read_vectors(a, l, idx)):
            got = norm(x) @ w[:, idx] - norm(torch.zeros_like(x[:1, :1])) @ w[:, idx]  # (b, pos, k)
            dots = x @ r.t()
            scale = (got * dots).sum(-1, keepdim=True) / dots.pow(2).sum(-1, keepdim=True)  # the rstd
            assert torch.all(scale > 0)
            assert torch.allclose(got, scale * dots, atol=1e-5, rtol=1e-4)


# -- branch inputs, gradients, norms ---------------------------------------------------------------
def _module_inputs(lm, ids=IDS):
    """What each norm module receives in a plain forward, from raw torch pre-hooks (no HookPoints),
    keyed by the site name that should hold it; and HF's own hidden states."""
    a, seen, handles = lm.adapter, {}, []

    def grab(key):
        def pre(module, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre

    modules = {site_name("attn.in", l): a.attn_norm(l) for l in range(a.n_layers)}
    modules |= {site_name("mlp.in", l): a.mlp_norm(l) for l in range(a.n_layers)}
    modules["ln_final.in"] = a.final_norm
    for key, module in modules.items():
        handles.append(module.register_forward_pre_hook(grab(key), with_kwargs=True))
    try:
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return seen, hidden


def test_branch_input_sites_hold_what_the_norms_read(lm):
    a, (c, _) = lm.adapter, capture_all(lm, pattern=False)  # the default attention path, like HF's
    seen, hidden = _module_inputs(lm)
    for name, value in seen.items():
        assert torch.equal(c[name], value), name
    for l in range(a.n_layers):
        # HF's hidden_states[l] is the input of layer l; the attention norm reads it as it is.
        assert torch.equal(c[site_name("attn.in", l)], hidden[l])
        assert torch.equal(c[site_name("attn.in", l)], c[site_name("resid_pre", l)])
        mid = "resid_pre" if a.parallel_residual else "resid_mid"
        assert torch.equal(c[site_name("mlp.in", l)], c[site_name(mid, l)])
    assert torch.equal(c["ln_final.in"], c[site_name("resid_post", a.n_layers - 1)])
    assert torch.allclose(a.final_norm(c["ln_final.in"]), c["ln_final.out"], atol=1e-6)


def test_editing_a_branch_input_changes_only_that_branch(lm):
    """An edit of attn.in / mlp.in changes what that branch reads; the residual stream around it
    carries the unedited tensor."""
    a, (clean, _) = lm.adapter, capture_all(lm, pattern=False)
    delta = torch.randn(a.d_model, generator=torch.Generator().manual_seed(5))
    for branch, out in (("attn.in", "attn.out"), ("mlp.in", "mlp.out")):
        names = [site_name(k, 0) for k in ("resid_pre", "attn.out", "mlp.out", "resid_post")]
        with lm.hooks.capture(names) as c, lm.hooks.add(site_name(branch, 0), delta):
            run(lm)
        pre, attn, mlp, post = (c[n] for n in names)
        assert torch.equal(pre, clean[names[0]])
        assert not torch.allclose(c[site_name(out, 0)], clean[site_name(out, 0)], atol=1e-4), branch
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5), branch  # no delta in the residual
    with lm.hooks.add("ln_final.in", delta):
        edited = run(lm)
    assert torch.allclose(edited, a.final_norm(clean["ln_final.in"] + delta) @ a.W_U, atol=1e-5)


def _loss(logits):
    w = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(2))
    return (logits[:, -3:] * w).sum()


def _substituted_grad(lm, name, value):
    """dL/dx with x a fresh tensor equal to ``value`` substituted at the site (autograd's own)."""
    x = value.clone().requires_grad_(True)
    with lm.hooks.replace(name, x * 1):  # x * 1: OLMo clamps q/k/v in place, not allowed on a leaf
        return torch.autograd.grad(_loss(lm.model(input_ids=IDS).logits), x)[0]


def test_grad_hooks_equal_autograd_through_the_site(lm):
    params = [p for p in lm.model.parameters()]
    for name in lm.hooks.names():
        with lm.hooks.capture(name) as c:  # on its own: only attn.pattern takes the eager path
            run(lm)
        got = []
        with lm.hooks.grad(name, got.append):
            logits = lm.model(input_ids=IDS).logits
        torch.autograd.grad(_loss(logits), params, allow_unused=True)  # the hook fires here
        assert len(got) == 1 and got[0].shape == c[name].shape, name
        if lm.hooks.site(name).editable:
            want = _substituted_grad(lm, name, c[name])
        else:  # resid_mid is the residual itself: what flows on to resid_post plus the MLP's share
            post, mlp_in = site_name("resid_post", int(name.split(".")[1])), name.replace("resid_mid", "mlp.in")
            with lm.hooks.capture([post, mlp_in]) as c:
                run(lm)
            want = _substituted_grad(lm, post, c[post]) + _substituted_grad(lm, mlp_in, c[mlp_in])
        scale = float(want.abs().max())
        assert scale > 0 and float((got[0] - want).abs().max()) <= 1e-5 * scale, name


def test_norm_specs_reproduce_every_norm(lm):
    a = lm.adapter
    x = 2.0 * torch.randn(3, 5, a.d_model, generator=torch.Generator().manual_seed(4)) + 0.5
    norms = [a.attn_norm(l) for l in range(a.n_layers)] + [a.mlp_norm(l) for l in range(a.n_layers)]
    for norm in norms + [a.final_norm]:
        spec = a.norm_spec(norm)
        assert spec.kind in ("layer", "rms"), type(norm)  # every supported family has a closed form
        assert spec.centred == (spec.kind == "layer")
        with torch.no_grad():
            assert torch.allclose(spec.apply(x), norm(x), atol=1e-5), type(norm)
            x_hat, rstd = spec.normalise(x)
            y = x_hat * (1 if spec.gain is None else spec.gain) + (0 if spec.bias is None else spec.bias)
            assert torch.allclose(y, norm(x), atol=1e-5)


def test_folded_attention_readers_give_the_projections(lm):
    """norm(x) @ W_r = rstd(x) * (x @ W~_r) + bias_norm @ W_r: the folded weights W~ (gain and
    centring) and rstd of ``AttentionReaders`` against the attention norm module itself."""
    a, (c, _) = lm.adapter, capture_all(lm)
    for l in range(a.n_layers):
        readers = AttentionReaders(lm, l)
        assert readers.kind is not None
        x = c[site_name("attn.in", l)].flatten(0, 1)  # (n, d_model)
        w = torch.cat([a.W_Q(l), a.W_K(l), a.W_V(l)]).detach()  # (R, d_model, d_head)
        with torch.no_grad():
            want = torch.einsum("nd,rde->nre", a.attn_norm(l)(x), w)
            if readers.spec.bias is not None:
                want = want - torch.einsum("d,rde->re", readers.spec.bias, w)
            rstd = readers.normalise(x)[1]  # (n, 1)
            got = rstd[:, :, None] * torch.einsum("nd,rde->nre", x, readers.weights())
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), l


# -- locators ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["neurons", "pre"])
def test_batched_integrated_gradients_equal_the_plain_reference(lm, site):
    prompt, target = [1, 5, 3, 8, 2, 11], [7, 9]  # longer than the sliding windows (4)
    fast = integrated_gradients(lm, prompt, target, steps=3, site=site)
    plain = integrated_gradients_plain(lm, prompt, target, steps=3, site=site)
    scale = float(plain.abs().max())
    assert scale > 0 and float((fast - plain).abs().max()) <= 1e-5 * scale


def test_eap_ig_equals_the_per_reader_reference(lm):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 4, 6, 4)]
    batch = batch_from_ids(rows[:2], rows[2:], [3, 5], [7, 9])
    graph = CircuitGraph.from_model(lm)
    reference = reference_scores(lm, graph, batch, [k / 3 for k in range(1, 4)]).detach()
    scale = float(reference.abs().max())
    assert scale > 0
    for closed_form in (True, False):
        fast = attribute_batch(lm, graph, batch, "eap-ig", steps=3, closed_form=closed_form)
        assert float((fast - reference).abs().max()) <= 1e-4 * scale, closed_form
