"""engramlab's EAP-IG side by side with the reference implementation, hannamw/EAP-IG (v2, on
transformer_lens), on GPT-2 small's shape: speed at equal accuracy (issue 14).

    git clone https://github.com/hannamw/EAP-IG /path/to/EAP-IG      # once, by hand
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eapig_reference.py \\
        --eapig-dir /path/to/EAP-IG [--tl-dir /tmp/tl-pkgs] [--steps 20] [--batch 8] \\
        [--facts country_capital_city] [--repeats 3] [--threads 1] [--device cpu] [--json out.json]

Nothing is downloaded at run time except, on the first run, transformer-lens and the few of its
dependencies this venv lacks (``TL_PACKAGES``, pinned), from PyPI with ``pip install --no-deps
--target --tl-dir`` (so the venv's torch and transformers are neither replaced nor changed); the
reference is imported from the checkout ``--eapig-dir`` (its ``src/eap``) and not patched.

The model: ``GPT2Config`` with GPT-2 small's sizes (12 layers x 12 heads, d_model 768) and
SmolLM2's vocabulary size, random weights (seed 0), SmolLM2's tokenizer (as ``bench_neurons.py``'s
``bench_kn``). engramlab runs the Hugging Face model; the reference runs a ``HookedTransformer``
built from a ``HookedTransformerConfig`` of the same sizes, with the same weights through
transformer_lens's GPT-2 conversion (``convert_gpt2_weights``; no LayerNorm folding, no weight
centring, so every node writes exactly what the HF model's does) and the settings EAP-IG requires
(``use_attn_result``, ``use_split_qkv_input``, ``use_hook_mlp_in``). The script checks that the two
models give the same logits (max abs diff printed; 2e-6 here). Both models have frozen weights
(``requires_grad_(False)``), so neither computes weight gradients.

The data: the first ``--batch`` clean/corrupted pairs ``corrupted_pairs`` makes from ``--facts`` (as
``bench_circuits.py``), one batch. The reference tokenizes the prompt strings itself
(``eap.utils.tokenize_plus``: BOS prepended, right-padded); engramlab gets exactly those token ids
(checked against BOS + the prompt's own ids). Metric: the logit difference at each row's last
real token, clean answer minus corrupted answer (engramlab's ``logit_diff``); the reference gets
its negative summed over the batch (EAP-IG's ``logit_diff(loss=True)`` convention; summed because
``attribute`` divides by the number of examples itself), so its scores are -1 times engramlab's
batch mean, which is the sign ``store.eapig_json`` exports. The script checks that the two
metrics agree on the models' clean logits.

What is measured:

1. Agreement. The reference's grid: ``get_scores_eap_ig`` takes gradients at
   corrupted + k/m (clean - corrupted) for k in range(0, m), equal weights 1/m: engramlab's
   ``left`` rule. engramlab ``left`` at m = ``--steps`` against the reference at ig_steps = m, edge for
   edge: engramlab's scores are mapped by name through ``store.eapig_json`` (EAP-IG's node names and
   sign) onto the reference's ``Graph.edges`` (GPT-2 has no grouped key/value heads, so every
   edge maps 1:1). Pearson and max abs diff over the 32,491 edges; a loud ``DISAGREE`` line when
   Pearson < 0.9999 or the max abs diff > 1e-3 of the largest score.
2. Equal accuracy. The reference's completeness error at m: per pair (the reference run on that
   pair alone; the scores of the batch cannot be split by row), |sum of the input node's edge
   scores - (M(corrupted) - M(clean))| / |M(corrupted) - M(clean)| with M its metric (as
   ``attribute.completeness_errors`` defines it for engramlab), mean over the pairs. Then the
   fewest engramlab ``midpoint`` and ``gauss-legendre`` steps (1..m) whose mean error is no larger.
3. Cost. Wall and CPU seconds (median of ``--repeats`` rounds after one warm-up, the methods
   interleaved; ``bench_neurons.interleaved``) and peak extra memory (``bench_circuits``: VmHWM over
   the resident set before the call on CPU, torch's peak on CUDA) of: the reference at m, engramlab
   ``left`` at m, engramlab midpoint / Gauss-Legendre at their equal-accuracy steps, and as many plain
   forward+backward passes as each engramlab run has points (``bench_circuits._plain_pass``). The
   speed-ups over the reference (goal: >= 25x at equal completeness) and each engramlab run's ratio
   to its plain passes (goal: <= 1.2) are printed.

Rows are printed as JSON lines and, with ``--json``, written to that file.

Caveats. The reference's ``attribute`` allocates its score matrix with ``device='cuda'`` hard-coded;
on a machine without CUDA the script hands ``eap.attribute`` a stand-in for the ``torch`` module
whose ``zeros`` puts a 'cuda' request on the CPU (every other name is torch's own, so nothing else
changes and no per-operation cost is added). transformer_lens's attention and einsum kernels are
not the HF model's, so scores agree to float32 noise, not bit for bit. engramlab's timings include
its shared-prompt-prefix saving (``attribute_batch``'s default), which the reference has no
counterpart for. Wall times on a shared machine vary; with ``--threads 1`` the CPU seconds are the
steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_circuits import _peak_extra_mib, _plain_pass  # noqa: E402
from bench_neurons import interleaved, pearson  # noqa: E402

# transformer-lens 3.9 is the newest release with HookedTransformer (4.x removed it) and supports
# transformers 5; the rest are its import-time dependencies this venv lacks.
TL_VERSION = "3.9.0"
TL_PACKAGES = (f"transformer-lens=={TL_VERSION}", "einops==0.8.2", "fancy-einsum==0.0.3", "jaxtyping==0.3.11",
               "wadler-lindig==0.1.8", "typeguard==4.6.1", "beartype==0.23.1", "better-abc==0.0.3",
               "datasets==5.2.0", "pyarrow==26.0.1", "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0",
               "pandas==3.1.1")


def install_tl(directory: Path) -> None:
    """transformer-lens and its missing dependencies, into their own directory (no dependency
    resolution, so pip never touches the venv's torch or transformers)."""
    if (directory / f"transformer_lens-{TL_VERSION}.dist-info").is_dir():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(directory),
                    *TL_PACKAGES], check=True)


def import_reference(eapig_dir: Path, tl_dir: Path, device: str):
    """The reference's ``eap.attribute``, ``eap.graph`` and ``eap.utils`` modules, from the checkout."""
    src = eapig_dir / "src"
    if not (src / "eap" / "attribute.py").is_file():
        raise SystemExit(f"--eapig-dir {eapig_dir}: no src/eap/attribute.py; give a checkout of hannamw/EAP-IG")
    install_tl(tl_dir)
    sys.path[:0] = [str(tl_dir), str(src)]
    import eap.attribute
    import eap.graph
    import eap.utils

    if device == "cpu":
        eap.attribute.torch = _CudaToCpuTorch()
    return eap.attribute, eap.graph, eap.utils


class _CudaToCpuTorch(types.ModuleType):
    """``torch`` for ``eap.attribute`` on a CPU-only machine: ``zeros(..., device='cuda')`` (its
    score matrices) lands on the CPU; every other attribute is torch's own."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


def build_models(device: str):
    """(engramlab LoadedModel of the HF GPT-2, the HookedTransformer with the same weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    from engramlab.models import wrap_model
    from engramlab.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval().to(device)
    hf.requires_grad_(False)
    lm = wrap_model(hf, tok, "gpt2-small-config")
    cfg = HookedTransformerConfig(
        n_layers=config.n_layer, d_model=config.n_embd, n_heads=config.n_head, d_head=config.n_embd // config.n_head,
        d_mlp=4 * config.n_embd, n_ctx=config.n_positions, d_vocab=config.vocab_size, act_fn=config.activation_function,
        eps=config.layer_norm_epsilon, normalization_type="LN", original_architecture="GPT2LMHeadModel",
        positional_embedding_type="standard", default_prepend_bos=True, device=device,
        use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)  # what EAP-IG's attribute asserts
    with warnings.catch_warnings():  # 3.x's notice that 4.0 removes HookedTransformer
        warnings.simplefilter("ignore", DeprecationWarning)
        ht = HookedTransformer(cfg, tokenizer=tok)
    ht.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    ht.eval().to(device)
    ht.requires_grad_(False)
    return lm, ht


def make_data(lm, ht, eutils, facts: str, batch: int):
    """The pairs as the reference's data loader (one batch of (clean, corrupted, labels)) and as
    an engramlab PairBatch of the very token ids the reference makes from them."""
    from engramlab.data.facts import corrupted_pairs, load_facts
    from engramlab.locate.circuits.data import PairBatch, encode_pairs
    from engramlab.models.scoring import text_ids

    pairs = corrupted_pairs(load_facts(facts), lm.tokenizer)
    if len(pairs) < batch:
        raise SystemExit(f"{facts}: only {len(pairs)} pairs, fewer than --batch {batch}")
    pairs = pairs[:batch]
    own = encode_pairs(lm, pairs)  # the answer tokens, as engramlab picks them
    clean = [p.clean_prompt for p in pairs]
    corrupt = [p.corrupt_prompt for p in pairs]
    clean_ids, mask, lengths, _ = eutils.tokenize_plus(ht, clean)
    corrupt_ids, corrupt_mask, _, _ = eutils.tokenize_plus(ht, corrupt)
    bos = lm.tokenizer.bos_token_id
    for i, p in enumerate(pairs):
        for ids, prompt in ((clean_ids, p.clean_prompt), (corrupt_ids, p.corrupt_prompt)):
            want = [bos] + text_ids(lm.tokenizer, prompt)
            if ids[i, : int(lengths[i])].tolist() != want or int(lengths[i]) != len(want):
                raise SystemExit(f"pair {i}: the reference tokenizes {prompt!r} to {ids[i].tolist()}, "
                                 f"not BOS + its ids {want}")
    if not torch.equal(mask, corrupt_mask):
        raise SystemExit("clean and corrupted prompts pad differently; the pairs must have equal lengths")
    labels = torch.stack([own.clean_answer, own.corrupt_answer], 1).cpu()
    device = lm.device
    b = PairBatch(clean_ids.to(device), corrupt_ids.to(device), mask.to(device), (lengths - 1).to(device),
                  own.clean_answer, own.corrupt_answer, own.subject + 1)  # +1: the BOS
    loader = [(clean, corrupt, labels)]
    per_pair = [([c], [k], labels[i: i + 1]) for i, (c, k) in enumerate(zip(clean, corrupt))]
    return b, loader, per_pair


def reference_metric(logits, clean_logits, input_lengths, labels):
    """EAP-IG's metric signature: -(logit[clean answer] - logit[corrupted answer]) at each row's
    last real token, summed over the batch (a loss; ``attribute`` divides by the examples)."""
    return -reference_logit_diff(logits, input_lengths, labels).sum()


def reference_logit_diff(logits, input_lengths, labels):
    """(b, pos, vocab) logits -> (b,) logit differences at the last real token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, input_lengths.to(logits.device) - 1].float()
    labels = labels.to(logits.device)
    return last[rows, labels[:, 0]] - last[rows, labels[:, 1]]


def run_reference(eattr, egraph, ht, loader, steps: int):
    """The reference's EAP-IG-inputs scores: (n_forward, n_backward), in its Graph."""
    graph = egraph.Graph.from_model(ht)
    eattr.attribute(ht, graph, loader, reference_metric, method="EAP-IG-inputs", ig_steps=steps, quiet=True)
    return graph


def engram_scores(lm, graph, b, steps: int, rule: str, completeness: list | None = None):
    from engramlab.locate.circuits import attribute_batch

    return attribute_batch(lm, graph, b, "eap-ig", steps, rule=rule, completeness=completeness)


def mapped(cgraph, scores: torch.Tensor, rgraph) -> tuple[torch.Tensor, torch.Tensor]:
    """engramlab's batch-mean scores and the reference's, as two (n_edges,) vectors in the
    reference's edge order, engramlab's through its EAP-IG export (names and sign)."""
    from engramlab.locate.circuits.store import eapig_json

    doc = eapig_json(cgraph, scores, torch.zeros_like(cgraph.valid))
    names = list(rgraph.edges)
    missing = [n for n in names if n not in doc["edges"]]
    if missing or len(names) != len(doc["edges"]):
        raise SystemExit(f"edge sets differ: {len(names)} reference edges, {len(doc['edges'])} engramlab edges, "
                         f"{len(missing)} reference edges unknown to engramlab (e.g. {missing[:3]})")
    ours = torch.tensor([doc["edges"][n]["score"] for n in names], dtype=torch.float64)
    theirs = torch.tensor([float(rgraph.edges[n].score) for n in names], dtype=torch.float64)
    return ours, theirs


def reference_completeness(eattr, egraph, eutils, ht, per_pair, steps: int) -> tuple[list[float], torch.Tensor]:
    """Per pair, the reference's completeness error at ``steps`` (the module docstring), and the
    sum of its per-pair score matrices (to check against the batch run)."""
    errors, total = [], None
    for clean, corrupt, labels in per_pair:
        graph = run_reference(eattr, egraph, ht, [(clean, corrupt, labels)], steps)
        attribution = float(graph.scores[0].double().sum())  # the input node's edges
        m = []
        for text in (corrupt, clean):  # M(corrupted), M(clean): the reference's metric on its model
            ids, mask, lengths, _ = eutils.tokenize_plus(ht, text)
            with torch.no_grad():
                m.append(float(reference_metric(ht(ids, attention_mask=mask), None, lengths, labels)))
        difference = m[0] - m[1]
        errors.append(abs(attribution - difference) / abs(difference))
        total = graph.scores.clone() if total is None else total + graph.scores
    return errors, total


def cost_runs(eattr, egraph, ht, loader, lm, cgraph, b, m: int, equal: dict) -> tuple[dict, dict]:
    """The timed calls by name, and the passes (integration points) of each engramlab one."""
    runs = {f"reference_eap_ig_{m}": lambda: run_reference(eattr, egraph, ht, loader, m),
            f"engramlab_left_{m}": lambda: engram_scores(lm, cgraph, b, m, "left")}
    passes = {f"engramlab_left_{m}": m}
    for rule, k in equal.items():
        runs[f"engramlab_{rule}_{k}"] = lambda rule=rule, k=k: engram_scores(lm, cgraph, b, k, rule)
        passes[f"engramlab_{rule}_{k}"] = k
    for p in sorted(set(passes.values())):
        runs[f"plain_{p}"] = lambda p=p: [_plain_pass(lm, b) for _ in range(p)]
    return runs, passes


def peak_memory(args, equal: dict) -> dict:
    """Peak extra MiB of each call, measured in a fresh process where glibc returns large blocks to
    the system at once (MALLOC_MMAP_THRESHOLD_, as bench_circuits), so freed tensors do not linger.
    Not in this process: that setting makes every large allocation a fresh mapping, which costs
    time, so the timings run without it."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--memory", ",".join(f"{r}:{k}" for r, k in equal.items())] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
        ("eapig_dir", "tl_dir", "steps", "batch", "facts", "threads", "device")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"memory measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eapig-dir", type=Path, required=True, help="a local checkout of hannamw/EAP-IG")
    ap.add_argument("--tl-dir", type=Path, default=Path("/tmp/tl-pkgs"), help="where transformer-lens is installed")
    ap.add_argument("--steps", type=int, default=20, help="the reference's ig_steps (and engramlab left's m)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--facts", default="country_capital_city")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # internal: RULE:M,... -> peak memory only
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engramlab.locate.circuits import CircuitGraph
    from engramlab.locate.circuits.attribute import completeness_errors, metric_values

    eattr, egraph, eutils = import_reference(args.eapig_dir, args.tl_dir, args.device)
    lm, ht = build_models(args.device)
    b, loader, per_pair = make_data(lm, ht, eutils, args.facts, args.batch)
    cgraph = CircuitGraph.from_model(lm)
    m, n = args.steps, len(b)
    if args.memory is not None:
        equal = {rule: int(k) for rule, k in (item.split(":") for item in args.memory.split(","))}
        runs, _ = cost_runs(eattr, egraph, ht, loader, lm, cgraph, b, m, equal)
        for fn in runs.values():  # warm-up, as the timed runs have
            fn()
        memory = {name: _peak_extra_mib(fn, args.device) for name, fn in runs.items() if not name.startswith("plain")}
        memory["plain_1"] = _peak_extra_mib(lambda: _plain_pass(lm, b), args.device)
        print(json.dumps(memory))
        return
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    # the same function: logits and metric of the two models on the clean prompts
    with torch.no_grad():
        hf_logits = lm.model(input_ids=b.clean_ids, attention_mask=b.mask).logits.float()
        tl_logits = ht(b.clean_ids, attention_mask=b.mask).float()
    real = b.mask.bool()
    lengths = b.mask.sum(1)
    ours_metric = metric_values(hf_logits[torch.arange(n), b.last], b, "logit_diff")
    theirs_metric = -reference_logit_diff(tl_logits, lengths, loader[0][2])
    emit({"row": "same_function", "max_abs_logit_diff": float((hf_logits - tl_logits)[real].abs().max()),
          "max_abs_logit": float(hf_logits[real].abs().max()),
          "max_abs_metric_diff": float((ours_metric + theirs_metric).abs().max()),
          "n_pairs": n, "tokens": int(b.mask.sum()), "width": b.mask.shape[1]})

    # 1. agreement on the reference's own grid
    rgraph = run_reference(eattr, egraph, ht, loader, m)
    terms: list = []
    left = engram_scores(lm, cgraph, b, m, "left", terms) / n
    ours, theirs = mapped(cgraph, left, rgraph)
    r, diff, top = pearson(ours, theirs), float((ours - theirs).abs().max()), float(theirs.abs().max())
    agree = r >= 0.9999 and diff <= 1e-3 * top
    emit({"row": "agreement", "steps": m, "engramlab_rule": "left", "n_edges": len(ours), "pearson": r,
          "max_abs_diff": diff, "max_abs_score": top, "relative_max_abs_diff": diff / top,
          "pearson_flipped_sign": pearson(-ours, theirs), "agree": agree})
    if not agree:
        print(f"DISAGREE: engramlab left m={m} vs the reference ig_steps={m}: Pearson {r:.6f}, max abs diff "
              f"{diff:.3g} of max |score| {top:.3g}", flush=True)

    # 2. equal accuracy
    ref_errors, ref_sum = reference_completeness(eattr, egraph, eutils, ht, per_pair, m)
    ref_error = statistics.mean(ref_errors)
    left_errors = [e for e in completeness_errors(terms) if e is not None]
    equal = {}
    for rule in ("midpoint", "gauss-legendre"):
        curve = {}
        for k in range(1, m + 1):
            t: list = []
            engram_scores(lm, cgraph, b, k, rule, t)
            curve[k] = statistics.mean(e for e in completeness_errors(t) if e is not None)
            if curve[k] <= ref_error:
                break
        found = next((k for k, e in curve.items() if e <= ref_error), None)
        equal[rule] = found or m
        emit({"row": "equal_accuracy", "rule": rule, "steps_needed": found, "error": curve[equal[rule]],
              "curve": {str(k): e for k, e in curve.items()}})
    emit({"row": "reference_completeness", "steps": m, "mean_error": ref_error, "max_error": max(ref_errors),
          "per_pair": ref_errors, "engramlab_left_mean_error": statistics.mean(left_errors),
          "engramlab_left_per_pair": left_errors,
          "per_pair_runs_vs_batch_max_abs_diff": float((ref_sum / n - rgraph.scores).abs().max())})

    # 3. cost
    runs, passes = cost_runs(eattr, egraph, ht, loader, lm, cgraph, b, m, equal)
    memory = peak_memory(args, equal)
    wall, cpu, _ = interleaved(runs, args.repeats)
    ref = f"reference_eap_ig_{m}"
    for name in runs:
        row = {"row": "cost", "name": name, "wall_s": wall[name], "cpu_s": cpu[name],
               "peak_extra_mib": memory.get(name), "threads": torch.get_num_threads(), "device": args.device}
        if name in passes:
            plain = f"plain_{passes[name]}"
            row.update({"passes": passes[name], "speedup_vs_reference_wall": wall[ref] / wall[name],
                        "speedup_vs_reference_cpu": cpu[ref] / cpu[name],
                        "ratio_to_plain_wall": wall[name] / wall[plain], "ratio_to_plain_cpu": cpu[name] / cpu[plain],
                        "memory_ratio_to_one_plain_pass": memory[name] / memory["plain_1"]})
        emit(row)
    print(f"agreement (left m={m} vs reference ig_steps={m}): Pearson {r:.6f}, max abs diff {diff:.3g} "
          f"(max |score| {top:.3g}) -> {'agree' if agree else 'DISAGREE'}")
    print(f"reference completeness error at m={m}: {100 * ref_error:.3f}% (engramlab left: "
          f"{100 * statistics.mean(left_errors):.3f}%); equal accuracy: midpoint m={equal['midpoint']}, "
          f"gauss-legendre m={equal['gauss-legendre']}")
    for name in passes:
        c = next(x for x in rows if x.get("name") == name)
        print(f"{name:>24}: {c['cpu_s']:.2f} s CPU ({c['wall_s']:.2f} wall), {c['speedup_vs_reference_cpu']:.1f}x "
              f"faster than the reference ({cpu[ref]:.2f} s CPU; goal >= 25x at equal completeness), "
              f"{c['ratio_to_plain_cpu']:.2f}x its {c['passes']} plain passes (goal <= 1.2), "
              f"peak extra {c['peak_extra_mib']:.0f} MiB vs reference {memory[ref]:.0f} MiB")
    if args.json:
        from engramlab.runs import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
