"""Hook sites and adapters, checked against plain recomputation on tiny random models."""

import pytest
import torch

from engramlab import EngramError
from engramlab.models import get_adapter, tiny_model, wrap_model

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 2], [7, 7, 1, 30, 12, 60, 4, 11]])


def logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids).logits


def test_capture_and_write_back_is_bit_identical(tiny_lm):
    ref = logits(tiny_lm)
    for name in tiny_lm.hooks.names():
        site = tiny_lm.hooks.site(name)
        if not site.editable:
            continue
        with tiny_lm.hooks.capture(name) as cache:
            base = logits(tiny_lm)  # pattern capture runs the eager path: compare like with like
        with tiny_lm.hooks.replace(name, cache[name]):
            again = logits(tiny_lm)
        assert torch.equal(again, base), name
        if site.kind != "pattern":
            assert torch.equal(base, ref), name


def test_editing_changes_logits(tiny_lm):
    ref = logits(tiny_lm)
    for name in ["blocks.0.attn.heads", "blocks.1.mlp.neurons", "blocks.0.mlp.pre", "blocks.0.attn.pattern",
                 "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.resid_pre", "ln_final.out"]:
        with tiny_lm.hooks.scale(name, 0.5):
            assert not torch.allclose(logits(tiny_lm), ref, atol=1e-6), name


def test_heads_through_output_projection_sum_to_attention_output(tiny_lm):
    a = tiny_lm.adapter
    for layer in range(a.n_layers):
        heads, out = f"blocks.{layer}.attn.heads", f"blocks.{layer}.attn.out"
        with tiny_lm.hooks.capture([heads, out]) as c:
            logits(tiny_lm)
        per_head = torch.einsum("bphd,hdm->bphm", c[heads], a.W_O(layer))  # (batch, pos, heads, d_model)
        total = per_head.sum(2) + (a.b_O(layer) if a.b_O(layer) is not None else 0)
        assert torch.allclose(total, c[out], atol=1e-5)


def test_q_k_v_sites_match_weight_views(tiny_lm):
    a = tiny_lm.adapter
    for layer in range(a.n_layers):
        sites = [f"blocks.{layer}.resid_pre"] + [f"blocks.{layer}.attn.{x}" for x in "qkv"]
        with tiny_lm.hooks.capture(sites) as c:
            logits(tiny_lm)
        x = a.attn_norm(layer)(c[sites[0]])
        for site, w in zip(sites[1:], (a.W_Q(layer), a.W_K(layer), a.W_V(layer))):
            got = torch.einsum("bpm,hmd->bphd", x, w)
            bias = c[site] - got
            # Any remaining difference must be a per-(head, dim) constant: the projection bias.
            assert torch.allclose(bias, bias[:1, :1].expand_as(bias), atol=1e-5), site


def test_mlp_and_unembed_weights(tiny_lm):
    a = tiny_lm.adapter
    with tiny_lm.hooks.capture(["blocks.1.mlp.neurons", "blocks.1.mlp.out", "ln_final.out"]) as c:
        out = logits(tiny_lm)
    b = a.b_out(1) if a.b_out(1) is not None else 0
    assert torch.allclose(c["blocks.1.mlp.neurons"] @ a.W_out(1) + b, c["blocks.1.mlp.out"], atol=1e-5)
    assert torch.allclose(c["ln_final.out"] @ a.W_U, out, atol=1e-5)


def test_zeroing_neurons_at_one_position_only_changes_later_logits(tiny_lm):
    ref = logits(tiny_lm)
    p = 3
    with tiny_lm.hooks.scale("blocks.0.mlp.neurons", 0.0, positions=p):
        out = logits(tiny_lm)
    assert torch.equal(out[:, :p], ref[:, :p])
    changed = (out - ref).abs().amax(-1)  # (batch, pos)
    assert (changed[:, p:] > 0).all()


def test_index_and_per_row_positions(tiny_lm):
    name = "blocks.0.attn.heads"
    with tiny_lm.hooks.capture(name) as c:
        logits(tiny_lm)
    with tiny_lm.hooks.scale(name, 0.0, positions=torch.tensor([2, 5]), index=[1]):
        with tiny_lm.hooks.capture(name) as edited:
            logits(tiny_lm)
    diff = (edited[name] != c[name]).any(-1)  # (batch, pos, heads)
    expected = torch.zeros_like(diff)
    expected[0, 2, 1] = expected[1, 5, 1] = True
    expected &= c[name].abs().amax(-1) > 0
    assert torch.equal(diff, expected)


def test_gqa_heads_read_their_kv_head():
    lm = wrap_model(tiny_model("llama", seed=1, n_heads=4, n_kv_heads=2))
    a = lm.adapter
    assert [a.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    site = "blocks.0.attn.heads"
    with lm.hooks.capture(site) as before:
        logits(lm)
    with torch.no_grad():
        a.W_V(0)[1] += 0.5  # perturb kv head 1 through the adapter's view of the live weight
    with lm.hooks.capture(site) as after:
        logits(lm)
    moved = (after[site] - before[site]).abs().amax(dim=(0, 1, 3))  # per query head
    assert moved[0] == 0 and moved[1] == 0
    assert moved[2] > 0 and moved[3] > 0


def test_pattern_site_is_a_distribution_and_can_be_patched(tiny_lm):
    site = "blocks.1.attn.pattern"
    with tiny_lm.hooks.capture(site) as c:
        logits(tiny_lm)
    pat = c[site]
    assert torch.allclose(pat.sum(-1), torch.ones_like(pat.sum(-1)), atol=1e-6)
    assert torch.all(pat.triu(1) == 0)  # causal
    uniform = torch.tril(torch.ones_like(pat))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    ref = logits(tiny_lm)
    with tiny_lm.hooks.replace(site, uniform):
        patched = logits(tiny_lm)
    assert not torch.allclose(patched, ref, atol=1e-5)
    # The attention implementation is restored after the block.
    assert tiny_lm.model.config._attn_implementation != "engram_eager"


def test_gradients_flow_through_edits(tiny_lm):
    site = "blocks.0.mlp.neurons"
    with tiny_lm.hooks.capture(site) as c:
        logits(tiny_lm)
    x = c[site].clone().requires_grad_(True)
    with tiny_lm.hooks.replace(site, x):
        out = tiny_lm.model(IDS).logits
    out[:, -1, 0].sum().backward()
    assert x.grad is not None and x.grad[:, -1].abs().sum() > 0


def test_bad_site_names():
    lm = wrap_model(tiny_model("gpt_neox"))
    with pytest.raises(EngramError, match="unknown hook site"):
        lm.hooks.site("blocks.0.mlp.hook_post")
    with pytest.raises(EngramError, match="out of range"):
        lm.hooks.site("blocks.9.mlp.out")
    with pytest.raises(EngramError, match="parallel residual"):
        lm.hooks.site("blocks.0.resid_mid")
    with pytest.raises(EngramError, match="no head/neuron axis"):
        with lm.hooks.scale("blocks.0.mlp.out", 0.0, index=[1]):
            pass


def test_unsupported_architecture_lists_supported_ones():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=8))
    with pytest.raises(EngramError, match="unsupported architecture 'bert'.*gpt2.*llama"):
        get_adapter(model)


# -- site names, new sites, gradient hooks ------------------------------------------------------------
def test_site_name_builds_every_listed_name():
    from engramlab.models.hooks import GLOBAL_SITES, SITE_DOCS, site_name

    lm = wrap_model(tiny_model("llama"))
    built = [site_name(k, l) for l in range(lm.adapter.n_layers) for k in SITE_DOCS]
    built += [site_name(k) for k in GLOBAL_SITES]
    assert built == lm.hooks.names() and lm.hooks.site_name("mlp.neurons", 1) == "blocks.1.mlp.neurons"
    for kind in ("attn.in", "mlp.in", "mlp.pre"):
        assert kind in SITE_DOCS and site_name(kind, 0) in lm.hooks.names(0)
    assert "ln_final.in" in GLOBAL_SITES and lm.hooks.shape("ln_final.in", 2, 3) == (2, 3, lm.adapter.d_model)
    with pytest.raises(EngramError, match="unknown hook site kind 'mlp.post'"):
        site_name("mlp.post", 0)
    with pytest.raises(EngramError, match="needs a layer index"):
        site_name("attn.in")
    with pytest.raises(EngramError, match="not per layer"):
        site_name("ln_final.in", 0)


def test_inspect_lists_the_branch_input_sites(tiny_hf_dir):
    import json

    from typer.testing import CliRunner

    from engramlab.cli import app

    r = CliRunner().invoke(app, ["inspect", "--model", str(tiny_hf_dir), "--json", "--seq-len", "5"])
    assert r.exit_code == 0, r.output
    sites = {s["site"]: s for s in json.loads(r.stdout)["sites"]}
    for name in ("blocks.0.attn.in", "blocks.0.mlp.in", "blocks.0.mlp.pre", "ln_final.in"):
        assert sites[name]["doc"] and sites[name]["shape"][:2] == [1, 5], name


def test_grad_hook_can_replace_the_gradient(tiny_lm):
    """A gradient hook's return value is the gradient from there on: zeroing it at layer 1's input
    (the only way from layer 0 to the logits) zeroes every gradient before it."""
    a = tiny_lm.adapter
    x = a.embed(IDS).detach().requires_grad_(True)  # fed in as inputs_embeds
    seen = {}
    with tiny_lm.hooks.grad("blocks.1.resid_pre", torch.zeros_like), \
            tiny_lm.hooks.grad("blocks.0.mlp.neurons", lambda g: seen.setdefault("neurons", g)):
        out = tiny_lm.model(inputs_embeds=x).logits
    out[:, -1].sum().backward()
    assert torch.equal(seen["neurons"], torch.zeros_like(seen["neurons"])) and torch.equal(x.grad, torch.zeros_like(x))
    # Replacing one view of a fused output (q inside GPT-2's / NeoX's q|k|v) leaves the others' gradients.
    grads = {}

    def keep(n):
        return lambda g: grads.__setitem__(n, g)

    x.grad = None
    with tiny_lm.hooks.grad("blocks.0.attn.q", torch.zeros_like), tiny_lm.hooks.grad("blocks.0.attn.k", keep("k")):
        tiny_lm.model(inputs_embeds=x).logits[:, -1].sum().backward()
    with tiny_lm.hooks.grad("blocks.0.attn.k", keep("k_plain")):
        tiny_lm.model(inputs_embeds=x).logits[:, -1].sum().backward()
    assert torch.equal(grads["k"], grads["k_plain"]) and grads["k"].abs().sum() > 0


def test_grad_hooks_are_inert_without_a_backward_and_after_the_block(tiny_lm):
    fired = []
    with torch.no_grad(), tiny_lm.hooks.grad("blocks.0.attn.in", fired.append):
        ref = tiny_lm.model(IDS).logits
    with tiny_lm.hooks.grad("blocks.0.attn.in", fired.append):
        pass
    tiny_lm.model(IDS).logits[:, -1].sum().backward()
    assert fired == [] and torch.allclose(logits(tiny_lm), ref)
    for p in tiny_lm.model.parameters():
        p.grad = None


# -- family knowledge lives in models/adapters.py only -----------------------------------------------
# A family or model-type name (checkpoint names such as "smollm2-135m" are not).
FAMILY_NAME = r"(llama|gpt2|gpt_neox|neox|gemma\d*(_text)?|phi\d*|qwen\d*|olmo\d*|mistral|smollm\d*)"
# Files that build configs for new models rather than read a model's parts: the tiny test models
# (one config per supported type) and the training presets (a Llama or a GPT-2 to train).
SCAN_EXEMPT = {"models/adapters.py", "models/tiny.py", "train/model_configs.py"}


def _family_knowledge(source: str) -> list[str]:
    """Lines of ``source`` that compare against a family name, check a class name, or key a
    literal table by family; docstrings and comments are not code, so they never match."""
    import ast
    import re

    tree = ast.parse(source)

    def names_family(node) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.fullmatch(FAMILY_NAME, node.value, re.IGNORECASE) is not None)

    def operands(node):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            yield from node.elts
        yield node

    def of_a_class(n) -> bool:  # type(x) or x.__class__
        return ((isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "type")
                or (isinstance(n, ast.Attribute) and n.attr == "__class__"))

    def mentions_class_name(node) -> bool:  # type(x).__name__, x.__class__.__name__ (not a function's name)
        return any(isinstance(n, ast.Attribute) and n.attr in ("__name__", "__qualname__") and of_a_class(n.value)
                   for n in ast.walk(node))

    class_name_vars = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and mentions_class_name(n.value)
                       for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        bad = False
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            bad = (any(names_family(e) for side in sides for e in operands(side))
                   or any(mentions_class_name(side) for side in sides)
                   or any(isinstance(side, ast.Name) and side.id in class_name_vars for side in sides))
        elif isinstance(node, ast.Dict):
            bad = any(k is not None and names_family(k) for k in node.keys)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            bad = node.func.attr in ("startswith", "endswith") and any(names_family(x) for x in node.args)
        if bad:
            found.append(f"{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_scan_catches_family_checks():
    assert _family_knowledge('if a.family == "llama":\n    pass')
    assert _family_knowledge('x = {"gpt2": "c_fc", "gpt_neox": "dense_h_to_4h"}[a.family]')
    assert _family_knowledge('ok = type(norm).__name__ in _PLAIN_RMS')
    assert _family_knowledge('ok = norm.__class__.__name__ == "LlamaRMSNorm"')
    assert not _family_knowledge('name = fn.__name__\nif name == other:\n    pass')
    assert _family_knowledge('name = type(norm).__name__\nif "Gemma" in name:\n    pass')
    assert _family_knowledge('t in ("olmo2", "gemma3")')
    assert not _family_knowledge('"""Llama, GPT-2 == "llama"."""\n# if family == "gpt2"\nx = f"{type(o).__name__}"')


def test_no_module_outside_the_adapters_knows_a_family():
    from pathlib import Path

    import engramlab

    root = Path(engramlab.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel not in SCAN_EXEMPT and (hits := _family_knowledge(path.read_text())):
            offenders[rel] = hits
    assert not offenders, f"family knowledge outside models/adapters.py: {offenders}"
