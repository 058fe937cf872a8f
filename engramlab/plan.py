"""``engram plan``: the peak memory and the pass count of a locator run, predicted before it runs.

Only the model's config (its shapes) and the tokenizer are read, never the weights: a GGUF's
config comes from its metadata, a HF directory's from ``config.json``, a model already in memory
(tests, ``Shapes.from_model``) from its config. The facts are tokenized to get the sequence
lengths. Nothing is run on the model.

Notation: L layers, d = d_model, m = d_mlp, H query heads, K key/value heads, h = d_head, V the
vocabulary, s the bytes of one element of the model's dtype (4 for float32, 2 for bfloat16).

Peak = weights + the activations of the largest batched pass:

    peak = W + A,   W = n_params x s  (counted on the meta device from the config)

What one decoder layer keeps for backward, per batch row, with T positions run and S = the
positions attended to (the T run plus any shared prefix read from a key/value cache), the
weights frozen (``load_model`` turns their gradients off, so no linear layer keeps its input):

    a(T, S) = s x [T (c_d d + c_m m) + 2 S H h + c_mask T S]

the first term the norms' outputs, q and the attention output (d-sized: with H h = d, SmolLM2
keeps 2 d + 2 H h per position) and the MLP's hidden tensors (m-sized: gate, up and act(gate) for
a gated MLP); the second the keys and values read (repeated to H heads for grouped-query
attention); the third the attention mask. SDPA's CPU kernel keeps a log-sum-exp per head and
position, not the attention scores; an ``eager`` attention adds 2 H T S s (scores and
probabilities). The coefficients per family (the adapters' ``saved_for_backward``) were counted
with autograd's saved-tensor hooks: llama-like (4, 3, 1) on SmolLM2-135M, gpt2 (5, 4, 4) and gpt_neox (4.5, 1, 0)
on the tiny models. While a layer's backward runs it also holds the gradients of its tensors,
for r rows about

    g(r, T) = s r T (6 d + 3 m)          (``_TRANSIENT``, fitted on the tiny models)

Knowledge-neuron IG (``locate.neurons.ig``). Per prompt of P tokens and T target tokens, with n
rows per layer (the rule's points of ``steps`` plus the alpha = 1 / alpha = 0 rows it lacks,
``_path``) and B layers per batch (``batch_layers``; automatic: ``auto_batch_layers``), the batch
of the layers l0 .. l0+B-1 holds at layer j >= l0 r_j = n min(B, j - l0 + 1) rows, and runs only
the segment (T positions) on the prefix's keys (S = P - 1 + T):

    A_IG = sum_{j = l0}^{L-1} r_j a(T, P - 1 + T)  +  g(nB, T)  +  nB T V (s + 4)  +  A_clean

the logits of the nB rows (rows x T x vocab: every segment position predicts a target token) in
the model's dtype plus one float32 copy (the log-softmax output, then its gradient: the peak is
at the start of the backward, where the logits themselves are already freed);
A_clean = s L [T d + (P - 1) (m + 2 K h)] the clean run's layer inputs, prefix activations and
prefix keys/values. The first batch (l0 = the first layer) is the largest.
Passes per prompt: 1 + L n ("ig"), 1 + 1 + k n ("screen", k = ``screen_layers``), 1 ("static");
what ``summary()["n_passes"]`` records, if every fact and paraphrase is attributed (a fact the
model does not rank within ``max_rank`` is skipped, so the plan is an upper bound).

EAP-IG (``locate.circuits.attribute``). A batch of b pairs, each padded to N tokens of which the
first P0 are shared by every prompt of the batch (run once, read from a cache), runs its
integration points one after another, each a forward and backward of b rows over T = N - P0
positions with logits at the last token only:

    A_pass = L b a(T, N) + g(b, T) + b V (s + 4)

What stays between passes (float32, n_keep <= b T kept positions, R = H + 2K readers per layer,
p points): the per-reader sums L n_keep R h (head space), p L n_keep (d + R) (each step's
normalised residual and its coefficients), (L + 1) n_keep d (MLP and logit gradients), the clean
writer outputs L n_keep (H h + d) recorded at alpha = 1, and the path gradient b T d. After the
passes the scores are formed in chunks of activation differences (n_writers, chunk, d), at most
32 MiB (``sums.DELTA_CHUNK_BYTES``), times their gradients expanded to (chunk, d, R):

    A_EAP = accumulators + max(A_pass, min(32 MiB, 4 n_writers n_keep d) (1 + R / n_writers))

In ``find_circuit`` the attribution also keeps, when they fit in ``evaluate.CACHE_BYTES``, the
corrupted writer outputs of every discovery batch for the evaluator: n_writers x tokens x d
float32, added to the plan as ``cached runs``. Passes per batch: p gradient passes (p = 1 for
eap, 2 for clean-corrupted) plus one no-grad closing forward (corrupted ablation, or a rule
without alpha = 1), one for the shared prefix, and under zero/mean one more forward when the rule
has no alpha = 0 point (the completeness check); ``find_circuit`` does not record a pass count.

Causal tracing (``locate.trace.grid``). No backward: for a prompt of T tokens with the subject
from token b, per noise draw the restorations of token i run in batches of at most
``batch_size`` of the 3L cells over the T - i positions from i on (the corrupted prefix cached),
so the largest batch is that of token b, rows = min(batch_size, 3L), one layer at a time:

    A_trace = s rows [(T - b) (f_d d + f_m m) + 2 T H h + (T - b) T] + rows V (s + 4)
              + 2 s L K h b + 4 s L T d

(the adapters' ``forward_working_set`` (f_d, f_m): llama-like (3.9, 2.3), gpt2 (5, 3), gpt_neox (3, 1.8), fitted on the
tiny models; the prefix's keys/values; the clean states of the three kinds and their capture).
Passes per fact: 1 + samples (1 + sum_{i=b}^{T-1} [(i > 0) + ceil(3L / batch_size)]), exact
(tests/test_plan.py counts the model's forward calls); ``find_trace`` records no pass count.

What is not modelled: the no-grad stages after the attribution (interventions, circuit
evaluation), which run no backward and are smaller; allocator overhead and the Python process
(``benchmarks/bench_plan.py`` measures the extra resident memory of the attribution over the
loaded model, and compares).

Knobs (``suggest``): where the plan is over ``--budget``, the settings of the locator's own
config that lower the peak, each the largest value that fits: ``batch_layers`` (IG),
``batch_size`` (EAP-IG, causal tracing), and ``steps`` with ``ig_rule gauss-legendre`` (fewer rows for the same
completeness; IG's batch holds n rows per layer). Missing knobs a larger model would want are
listed in docs/plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from engramlab.config import option, validate
from engramlab.errors import EngramError
from engramlab.sizes import parse_bytes

ANALYSES = ("neurons", "circuit", "trace")


@dataclass
class PlanConfig:
    """What ``engram plan`` plans: which locator, and the memory it must fit in. The locator's own
    settings come as ``--set ANALYSIS.FIELD=VALUE`` (``--set neurons.steps=10``), as in evolve."""

    analysis: str = option("neurons", "The locator to plan.", choices=ANALYSES)
    budget: str | None = option(None, "Memory to fit in, e.g. 24GB, 512MiB, 1.5GiB: over it, the plan lists the "
                                "settings that fit.")

    def __post_init__(self):
        validate(self)
        if self.budget is not None:
            parse_budget(self.budget)
MiB = 2**20

# (c_d, c_m, c_mask): elements per row and position a layer keeps for backward (module docstring).
# (t_d, t_m): elements per row and position the backward of one layer holds besides what was saved.
_TRANSIENT = (6.0, 3.0)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DELTA_CHUNK_BYTES = 32 * MiB  # sums.DELTA_CHUNK_BYTES (not imported: that pulls in torch)


def parse_budget(text: str, flag: str = "--budget") -> int:
    """``--budget`` in bytes (``engramlab.sizes.parse_bytes``)."""
    return parse_bytes(text, flag)


# -- shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """What the plan reads from a model config."""

    saved: tuple         # (c_d, c_m, c_mask): the adapter's ``saved_for_backward``
    forward: tuple       # (f_d, f_m): the adapter's ``forward_working_set``
    model_type: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    n_params: int
    attention: str = "sdpa"

    @classmethod
    def from_config(cls, config) -> "Shapes":
        """From a HF config; the parameters are counted on the meta device (no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
        return cls._of(config, n_params)

    @classmethod
    def from_model(cls, lm) -> "Shapes":
        """From a loaded model (``LoadedModel``): its config and its own parameter count."""
        return cls._of(lm.model.config, sum(p.numel() for p in lm.model.parameters()))

    @classmethod
    def _of(cls, c, n_params: int) -> "Shapes":
        get = lambda *names: next(getattr(c, n) for n in names if getattr(c, n, None) is not None)  # noqa: E731
        d = int(get("hidden_size", "n_embd"))
        heads = int(get("num_attention_heads", "n_head"))
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        d_mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
        d_head = int(getattr(c, "head_dim", None) or d // heads)
        model_type = str(getattr(c, "model_type", "llama"))
        from engramlab.models.adapters import adapter_class  # the family's coefficients live there

        adapter = adapter_class(model_type)
        attention = str(getattr(c, "_attn_implementation", None) or "sdpa")
        return cls(adapter.saved_for_backward, adapter.forward_working_set, model_type,
                   int(get("num_hidden_layers", "n_layer")), d, int(d_mlp), heads, kv, d_head,
                   int(c.vocab_size), int(n_params), attention)

    @classmethod
    def from_spec(cls, spec: str) -> "Shapes":
        """From a model SPEC (``models.loading.resolve_spec``): the config only, no weights."""
        from transformers import AutoConfig

        from engramlab.models.loading import _quiet_loading, _one_line, resolve_spec

        directory, gguf = resolve_spec(spec)
        kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
        try:
            with _quiet_loading():
                config = AutoConfig.from_pretrained(directory, **kwargs)
        except Exception as e:
            raise EngramError(f"model {spec!r}: could not read its config from {directory}: {_one_line(e)}") from e
        return cls.from_config(config)

    def backward_bytes(self, item: int, rows: int, positions: int) -> float:
        """The gradients one layer's backward holds at once, for ``rows`` rows (module docstring)."""
        t_d, t_m = _TRANSIENT
        return item * rows * positions * (t_d * self.d_model + t_m * self.d_mlp)

    def layer_bytes(self, item: int, positions: int, attended: int) -> float:
        """a(T, S): what one layer keeps for backward for one row (module docstring)."""
        c_d, c_m, c_mask = self.saved
        elems = positions * (c_d * self.d_model + c_m * self.d_mlp) + 2 * attended * self.n_heads * self.d_head \
            + c_mask * positions * attended
        if self.attention == "eager":
            elems += 2 * self.n_heads * positions * attended
        return item * elems

    @property
    def n_writers(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A prediction: bytes by part (``parts``: weights, activations and what they are made of),
    the pass count, and the settings it was made for."""

    analysis: str
    weights: int
    activations: int
    n_passes: int
    parts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    def row(self) -> dict:
        return {"analysis": self.analysis, "peak_bytes": self.peak, "weights_bytes": self.weights,
                "activation_bytes": self.activations, "n_passes": self.n_passes,
                "parts": {k: int(v) for k, v in self.parts.items()}, "settings": self.settings, "notes": self.notes}


def _item(dtype: str) -> int:
    if dtype not in _DTYPE_BYTES:
        raise EngramError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


def ig_rows(rule: str, steps: int) -> int:
    """n: the rule's points plus the alpha = 1 and alpha = 0 rows it lacks (``neurons.ig._path``)."""
    from engramlab.locate.integration import integration_points

    alphas = [a for a, _ in integration_points(rule, steps)]
    return len(alphas) + (1.0 not in alphas) + (0.0 not in alphas)


def _batch_layers(shapes: Shapes, config, n: int, P: int, T: int, item: int, device: str, budget: int | None) -> int:
    """The layers per IG batch the run will use: ``batch_layers``, else ``auto_batch_layers`` on a
    stand-in model with these shapes (on CUDA its budget is half of what the run leaves free; here
    half of ``budget`` less the weights, or every layer when no budget is given)."""
    if config.batch_layers is not None:
        return min(config.batch_layers, shapes.n_layers)
    if device == "cuda" and budget is None:
        return shapes.n_layers
    import torch

    from engramlab.locate.neurons.ig import auto_batch_layers

    adapter = SimpleNamespace(d_model=shapes.d_model, d_mlp=shapes.d_mlp, n_heads=shapes.n_heads,
                              n_layers=shapes.n_layers, vocab_size=shapes.vocab_size)
    dtype = {4: torch.float32, 2: torch.bfloat16}[item]
    stand_in = SimpleNamespace(adapter=adapter, device=torch.device(device), dtype=dtype)
    free = None if device != "cuda" else max(1, (budget - shapes.n_params * item) // 2)
    return auto_batch_layers(stand_in, n, T, P, budget_bytes=free)


def ig_activation_bytes(shapes: Shapes, P: int, T: int, n: int, size: int, item: int, first: int = 0) -> dict:
    """A_IG of one prompt (P prompt tokens, T targets) for the batch of ``size`` layers from
    layer ``first`` with ``n`` rows per layer, by part (module docstring)."""
    L = shapes.n_layers
    size = min(size, L - first)
    per_row = shapes.layer_bytes(item, T, P - 1 + T)
    layers = sum(n * min(size, j - first + 1) * per_row for j in range(first, L)) \
        + shapes.backward_bytes(item, n * size, T)
    logits = n * size * T * shapes.vocab_size * (item + 4)
    clean = item * L * (T * shapes.d_model + (P - 1) * (shapes.d_mlp + 2 * shapes.n_kv_heads * shapes.d_head))
    return {"layers": layers, "logits": logits, "clean run": clean}


def plan_neurons(shapes: Shapes, prompts: list[tuple[int, int]], config=None, dtype: str = "float32",
                 device: str = "cpu", budget: int | None = None) -> Plan:
    """The plan of ``find_knowledge_neurons``' attribution for prompts given as (P, T) token
    counts (every paraphrase of every fact, the target's tokens after it)."""
    from engramlab.locate.neurons.config import NeuronConfig

    config = config or NeuronConfig()
    if not prompts:
        raise EngramError("plan neurons: no prompts to plan for (check --facts / --relation / --limit)")
    item, L = _item(dtype), shapes.n_layers
    n = ig_rows(config.ig_rule, config.steps)
    best, passes, sizes = None, 0, set()
    for P, T in prompts:
        if config.method == "static":
            parts = {"logits": P * shapes.vocab_size * (item + 4),
                     "clean run": item * L * (P * shapes.d_model + P * shapes.d_mlp)}
            passes += 1
        else:
            size = _batch_layers(shapes, config, n, P, T, item, device, budget)
            k = L if config.method == "ig" else min(config.screen_layers, L)
            size = min(size, k)
            sizes.add(size)
            parts = ig_activation_bytes(shapes, P, T, n, size, item)
            passes += 1 + k * n + (config.method == "screen")
        if best is None or sum(parts.values()) > sum(best.values()):
            best = parts
    settings = {"method": config.method, "steps": config.steps, "ig_rule": config.ig_rule, "rows_per_layer": n,
                "batch_layers": config.batch_layers if config.batch_layers is not None
                else ("auto: " + ",".join(map(str, sorted(sizes))) if sizes else None),
                "n_prompts": len(prompts)}
    notes = ["passes count every paraphrase; facts beyond max_rank are skipped in the run (fewer passes)"]
    return Plan("neurons", shapes.n_params * item, int(sum(best.values())), passes, best, settings, notes)


def eap_passes(method: str, steps: int, rule: str, ablation: str, shared_prefix: bool) -> int:
    """Passes of one ``attribute_batch`` call (module docstring): gradient passes plus forwards."""
    from engramlab.locate.circuits.attribute import integration_points

    alphas = [a for a, _ in integration_points(method, steps, rule)]
    corrupted = ablation == "corrupted"
    closing = corrupted or 1.0 not in alphas
    extra = (not corrupted) and 0.0 not in alphas
    return len(alphas) + int(closing) + int(extra) + int(corrupted and shared_prefix)


def eap_activation_bytes(shapes: Shapes, b: int, N: int, P0: int, points: int, item: int) -> dict:
    """A_EAP of one batch of ``b`` pairs padded to ``N`` tokens, ``P0`` of them shared, with
    ``points`` gradient passes, by part (module docstring)."""
    L, d, H, K, h = shapes.n_layers, shapes.d_model, shapes.n_heads, shapes.n_kv_heads, shapes.d_head
    T = N - P0
    keep, R = b * T, H + 2 * K
    one_pass = L * b * shapes.layer_bytes(item, T, N) + shapes.backward_bytes(item, b, T) \
        + b * shapes.vocab_size * (item + 4)
    sums = 4 * (L * keep * R * h + points * L * keep * (d + R) + (L + 1) * keep * d + b * T * d)
    outputs = 4 * L * keep * (H * h + d)
    scoring = min(DELTA_CHUNK_BYTES, 4 * shapes.n_writers * keep * d) * (1 + R / shapes.n_writers)
    return {"pass": max(one_pass, scoring), "gradient sums": sums, "writer outputs": outputs}


def _shared(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one (``hooks.shared_prefix``)."""
    n = 0
    for column in zip(*rows):
        if len(set(column)) != 1:
            break
        n += 1
    return min(n, min(len(r) for r in rows) - 1)


def plan_circuit(shapes: Shapes, batches: list[list[list[int]]], config=None, dtype: str = "float32",
                 cache_runs: bool = True) -> Plan:
    """The plan of ``find_circuit``'s attribution: ``batches`` holds each attribution batch's
    clean and corrupted prompts' token ids (``config.batch_size`` pairs: 2 b rows)."""
    from engramlab.locate.circuits.attribute import integration_points
    from engramlab.locate.circuits.config import CircuitConfig
    from engramlab.locate.circuits.evaluate import CACHE_BYTES

    config = config or CircuitConfig()
    if not batches:
        raise EngramError("plan circuit: no discovery pairs to plan for (check --facts / --relation / --limit)")
    item = _item(dtype)
    ablation = config.score_ablation or config.ablation
    points = len(integration_points(config.method, config.steps, config.ig_rule))
    best, passes, tokens = None, 0, 0
    for rows in batches:
        b, N = len(rows) // 2, max(len(r) for r in rows)
        P0 = _shared(rows) if ablation == "corrupted" else 0
        parts = eap_activation_bytes(shapes, b, N, P0, points, item)
        passes += eap_passes(config.method, config.steps, config.ig_rule, ablation, P0 > 0)
        tokens += b * N
        if best is None or sum(parts.values()) > sum(best.values()):
            best = parts
    cached = tokens * shapes.n_writers * shapes.d_model * 4
    best = dict(best)
    if cache_runs and config.ablation == ablation == "corrupted" and cached <= CACHE_BYTES:
        best["cached runs"] = cached
    settings = {"method": config.method, "steps": config.steps, "ig_rule": config.ig_rule,
                "batch_size": config.batch_size, "points": points, "n_batches": len(batches),
                "n_pairs": sum(len(r) // 2 for r in batches)}
    notes = ["attribution only; the evaluation stages run no backward", "find_circuit records no pass count"]
    return Plan("circuit", shapes.n_params * item, int(sum(best.values())), passes, best, settings, notes)


def trace_passes(T: int, b: int, n_layers: int, samples: int, batch_size: int) -> int:
    """Forward passes of ``trace_grid`` for a prompt of T tokens, the subject from token b: the
    clean run, then per noise draw the corrupted run and, for each token i = b..T-1, its
    corrupted prefix (i > 0) and ceil(3L / batch_size) batches of restorations."""
    per_token = lambda i: int(i > 0) + math.ceil(3 * n_layers / batch_size)  # noqa: E731
    return 1 + samples * (1 + sum(per_token(i) for i in range(b, T)))


def trace_activation_bytes(shapes: Shapes, T: int, b: int, batch_size: int, item: int) -> dict:
    """What ``trace_grid`` holds at its peak, the restorations of token b (the longest suffix):
    rows = min(batch_size, 3L) rows of T - b positions through one layer at a time, no graph kept
    (s rows T' (f_d d + f_m m), the adapter's ``forward_working_set``, plus the keys/values read and the mask), the
    corrupted prefix's keys/values, the clean states and the logits at the last position."""
    L, d, H, K, h = shapes.n_layers, shapes.d_model, shapes.n_heads, shapes.n_kv_heads, shapes.d_head
    rows, run = min(batch_size, 3 * L), T - b
    f_d, f_m = shapes.forward
    layer = item * rows * (run * (f_d * d + f_m * shapes.d_mlp) + 2 * T * H * h + run * T)
    prefix = item * L * 2 * K * h * b
    clean = item * 4 * L * T * d  # the three kinds' stacked states and the capture they came from
    logits = rows * shapes.vocab_size * (item + 4)
    return {"layer": layer, "prefix cache": prefix, "clean states": clean, "logits": logits}


def plan_trace(shapes: Shapes, prompts: list[tuple[int, int]], config=None, dtype: str = "float32") -> Plan:
    """The plan of ``find_trace`` for prompts given as (T, b): token count and the subject's first
    token (``span.subject_span``)."""
    from engramlab.locate.trace.config import TraceConfig

    config = config or TraceConfig()
    if not prompts:
        raise EngramError("plan trace: no prompts with their subject to plan for (check --facts / --limit)")
    if config.window > shapes.n_layers:
        raise EngramError(f"--window {config.window}: larger than the model's {shapes.n_layers} layers")
    item = _item(dtype)
    best, passes = None, 0
    for T, b in prompts:
        parts = trace_activation_bytes(shapes, T, b, config.batch_size, item)
        passes += trace_passes(T, b, shapes.n_layers, config.samples, config.batch_size)
        if best is None or sum(parts.values()) > sum(best.values()):
            best = parts
    settings = {"samples": config.samples, "window": config.window, "batch_size": config.batch_size,
                "n_prompts": len(prompts)}
    notes = ["no backward: the peak is one layer of one batch at a time", "find_trace records no pass count"]
    return Plan("trace", shapes.n_params * item, int(sum(best.values())), passes, best, settings, notes)


def trace_prompts(tokenizer, facts, config=None) -> list[tuple[int, int]]:
    """(T, b) of every fact ``find_trace`` traces (facts whose subject has no tokens are skipped)."""
    from engramlab.data.facts import _encode
    from engramlab.locate.trace.config import TraceConfig
    from engramlab.locate.trace.span import subject_span

    config = config or TraceConfig()
    out = []
    for fact in facts:
        prompt = fact.prompt(config.template)
        ids = _encode(tokenizer, prompt)
        span, _ = subject_span(tokenizer, ids, prompt, fact.subject, fact.template(config.template))
        if span is not None:
            out.append((len(ids), span[0]))
    return out


# -- inputs from facts ----------------------------------------------------------------------------
def neuron_prompts(tokenizer, facts) -> list[tuple[int, int]]:
    """(P, T) of every paraphrase of every fact, as ``find_knowledge_neurons`` encodes them."""
    from engramlab.data.facts import _encode, target_token_ids

    out = []
    for fact in facts:
        for j in range(len(fact.templates)):
            prompt = fact.prompt(j)
            out.append((len(_encode(tokenizer, prompt)), len(target_token_ids(tokenizer, prompt, fact.object))))
    return out


def circuit_batches(tokenizer, facts, config=None) -> list[list[list[int]]]:
    """The token ids of the discovery batches: the clean/corrupted pairs ``corrupted_pairs``
    makes, the ``split`` share of them (the correctness filter, which needs the model, is not
    applied: an upper bound), longest first, ``batch_size`` pairs per batch."""
    from engramlab.data.facts import _encode, corrupted_pairs
    from engramlab.locate.circuits.config import CircuitConfig

    config = config or CircuitConfig()
    pairs = corrupted_pairs(facts, tokenizer, config.template, config.seed)
    rows = [(_encode(tokenizer, p.clean_prompt), _encode(tokenizer, p.corrupt_prompt)) for p in pairs]
    rows.sort(key=lambda r: -len(r[0]))
    rows = rows[: max(1, math.ceil(config.split * len(rows)))] if rows else []
    k = config.batch_size
    return [[ids for pair in rows[i: i + k] for ids in pair] for i in range(0, len(rows), k)]


def plan_for(analysis: str, shapes: Shapes, tokenizer, facts, config, dtype: str = "float32", device: str = "cpu",
             budget: int | None = None) -> Plan:
    if analysis == "neurons":
        return plan_neurons(shapes, neuron_prompts(tokenizer, facts), config, dtype, device, budget)
    if analysis == "circuit":
        return plan_circuit(shapes, circuit_batches(tokenizer, facts, config), config, dtype)
    if analysis == "trace":
        return plan_trace(shapes, trace_prompts(tokenizer, facts, config), config, dtype)
    raise EngramError(f"--analysis {analysis!r}: choose one of {', '.join(ANALYSES)}")


def config_class(analysis: str) -> type:
    from engramlab.locate.configs import LOCATOR_CONFIGS

    if analysis not in ANALYSES:
        raise EngramError(f"--analysis {analysis!r}: choose one of {', '.join(ANALYSES)}")
    return LOCATOR_CONFIGS[analysis]


# -- knobs ----------------------------------------------------------------------------------------
@dataclass
class Suggestion:
    """One knob setting that brings the plan under the budget, with its plan."""

    changes: dict
    plan: Plan

    def row(self) -> dict:
        return {"changes": self.changes, "peak_bytes": self.plan.peak, "n_passes": self.plan.n_passes}


def suggest(analysis: str, shapes: Shapes, tokenizer, facts, config, budget: int, dtype: str = "float32",
            device: str = "cpu") -> list[Suggestion]:
    """Settings of the locator's config that bring the peak under ``budget``: the largest batch
    (``batch_layers`` / ``batch_size``: the same passes, in smaller batches) that fits; when even a
    batch of one does not, also the most ``steps`` of the Gauss-Legendre rule that fit with it."""
    def trial(**changes) -> Plan:
        return plan_for(analysis, shapes, tokenizer, facts, replace(config, **changes), dtype, device, budget)

    out: list[Suggestion] = []
    if analysis == "neurons":
        for size in range(shapes.n_layers, 0, -1):  # fewer layers per batch: same passes, smaller batches
            got = trial(batch_layers=size)
            if got.peak <= budget:
                out.append(Suggestion({"batch_layers": size}, got))
                break
        for steps in range(config.steps, 0, -1) if not out else ():  # then fewer rows, the most accurate rule
            got = trial(batch_layers=1, ig_rule="gauss-legendre", steps=steps)
            if got.peak <= budget:
                out.append(Suggestion({"batch_layers": 1, "ig_rule": "gauss-legendre", "steps": steps}, got))
                break
    elif analysis in ("circuit", "trace"):
        for size in range(config.batch_size, 0, -1):
            got = trial(batch_size=size)
            if got.peak <= budget:
                out.append(Suggestion({"batch_size": size}, got))
                break
        if analysis == "circuit" and config.method == "eap-ig" and not out:
            for steps in range(config.steps, 0, -1):
                got = trial(batch_size=1, ig_rule="gauss-legendre", steps=steps)
                if got.peak <= budget:
                    out.append(Suggestion({"batch_size": 1, "ig_rule": "gauss-legendre", "steps": steps}, got))
                    break
    return out


def to_json(plan: Plan, budget: int | None, suggestions: list[Suggestion]) -> dict:
    out = plan.row()
    out["budget_bytes"] = budget
    out["fits"] = None if budget is None else plan.peak <= budget
    out["suggestions"] = [s.row() for s in suggestions]
    return out


__all__ = ["ANALYSES", "Plan", "Shapes", "Suggestion", "parse_budget", "plan_circuit", "plan_for", "plan_neurons",
           "suggest"]
