"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), as a locator.

``find_trace(lm, facts, config)`` corrupts each fact's subject embeddings with Gaussian noise
(``noise``), restores one clean state at a time (the residual stream at one layer; the MLP or
attention output over a window of layers) at every token and layer, and records the indirect
effect IE = P_restored(answer) - P_corrupt(answer) on the answer's first token (``grid``). Per fact
the grids are kept (``p_restored`` (n, 3, L, T_max), NaN past a prompt's end); averaged over
facts, the heat maps by token kind (``token_kind_maps``: first / middle / last subject token, the
first subsequent token, further tokens, the last token, as the paper plots them).

Headline numbers (``TraceResult.summary``)::

    trace.peak_mlp_layer            argmax_l  mean_facts IE_mlp[l, last subject token]
    trace.peak_attn_layer           argmax_l  mean_facts IE_attn[l, last token]
    trace.mean_max_indirect_effect  mean_facts max_{l, i} IE_resid[l, i]
    trace.mean_max_mlp_effect       mean_facts max_{l, i} IE_mlp[l, i]   (and attn)
    trace.mean_total_effect         mean_facts (P_clean - P_corrupt)

Files: ``trace.safetensors`` (the per-fact grids and probabilities, the averaged maps) and
``skipped.jsonl`` (facts whose subject is not in the prompt's tokens, with the reason), next to the
shared three. See docs/trace.md for the definitions and the differences from ROME.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engramlab.config import to_dict
from engramlab.data.facts import target_token_ids
from engramlab.errors import EngramError
from engramlab.locate.base import fact_record, model_facts, read_result, short, write_result
from engramlab.locate.trace.config import KINDS, NOISE_SAMPLES, TOKEN_KINDS, TraceConfig  # noqa: F401
from engramlab.locate.trace.grid import trace_grid
from engramlab.locate.trace.noise import embedding_std, fact_noise
from engramlab.locate.trace.span import subject_span
from engramlab.models.scoring import encode
from engramlab.progress import progress_bar

TENSORS = "trace.safetensors"


def token_kind_map(effect: torch.Tensor, span: tuple[int, int], n_tokens: int) -> torch.Tensor:
    """(3, L, 6) from one fact's (3, L, T) grid: the columns of ``TOKEN_KINDS``.

    first = b, middle = mean over b+1..e-2, last subject = e-1, first subsequent = e, further =
    mean over e+1..T-2, last = T-1 (b, e the subject span, T the prompt's tokens). A kind the prompt
    lacks (no middle token for a subject of 1-2 tokens, no token after the subject) is NaN; a token
    can be of two kinds (a one-token subject is first and last; the token after the subject can
    be the last token)."""
    b, e = span
    T = n_tokens
    grid = effect[..., :T].float()
    nan = torch.full(grid.shape[:2], float("nan"))

    def mean_over(lo, hi):
        return grid[..., lo:hi].mean(-1) if hi > lo else nan

    cols = [grid[..., b], mean_over(b + 1, e - 1), grid[..., e - 1],
            grid[..., e] if e < T else nan, mean_over(e + 1, T - 1), grid[..., T - 1]]
    return torch.stack(cols, dim=-1)


def _argmax(values: torch.Tensor) -> int | None:
    if values.numel() == 0 or torch.isnan(values).all():
        return None
    return int(torch.nan_to_num(values, nan=-math.inf).argmax())


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else None


@dataclass
class TraceResult:
    """What ``find_trace`` found. Traced facts (rows without ``skipped``) index the tensors in order."""

    rows: list[dict]                  # one per fact of the selection, in order
    p_restored: torch.Tensor          # (n, 3, L, T_max) float32: P(answer) with one state restored, NaN-padded
    p_clean: torch.Tensor             # (n,) float32
    p_corrupt: torch.Tensor           # (n,) float32, mean over the noise draws
    spans: torch.Tensor               # (n, 2) int64: the subject's tokens [b, e)
    n_tokens: torch.Tensor            # (n,) int64: T, tokens of each prompt
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    NAME = "trace"

    # -- what was found --------------------------------------------------------------------------------
    @property
    def effects(self) -> torch.Tensor:
        """(n, 3, L, T_max) the indirect effects P_restored - P_corrupt (NaN past each prompt's end)."""
        return self.p_restored - self.p_corrupt[:, None, None, None]

    @property
    def skipped(self) -> list[dict]:
        return [r for r in self.rows if "skipped" in r]

    def kind_maps(self) -> torch.Tensor:
        """(n, 3, L, 6) each fact's grid by token kind (``token_kind_map``)."""
        eff = self.effects
        if eff.shape[0] == 0:
            return torch.zeros(0, len(KINDS), int(self.model.get("n_layers") or 0), len(TOKEN_KINDS))
        return torch.stack([token_kind_map(eff[k], tuple(self.spans[k].tolist()), int(self.n_tokens[k]))
                            for k in range(eff.shape[0])])

    def mean_maps(self) -> torch.Tensor:
        """(3, L, 6) the average heat maps: mean over the facts that have each token kind."""
        m = self.kind_maps()
        have = ~torch.isnan(m)
        total = torch.nan_to_num(m, nan=0.0).sum(0)
        count = have.sum(0)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    def records(self) -> list[dict]:
        return self.rows

    def summary(self) -> dict:
        n = int(self.p_clean.shape[0])
        out: dict = {"n_facts": n, "n_skipped": len(self.skipped)}
        maps = self.mean_maps() if n else None
        mlp, attn = KINDS.index("mlp"), KINDS.index("attn")
        out["trace.peak_mlp_layer"] = _argmax(maps[mlp, :, TOKEN_KINDS.index("last subject")]) if n else None
        out["trace.peak_attn_layer"] = _argmax(maps[attn, :, TOKEN_KINDS.index("last")]) if n else None
        for key, kind in (("indirect", "resid"), ("mlp", "mlp"), ("attn", "attn")):
            name = "trace.mean_max_indirect_effect" if key == "indirect" else f"trace.mean_max_{key}_effect"
            out[name] = _mean(r.get(f"max_{kind}_effect") for r in self.rows if "skipped" not in r)
        out["trace.mean_p_clean"] = _mean(self.p_clean.tolist())
        out["trace.mean_p_corrupt"] = _mean(self.p_corrupt.tolist())
        out["trace.mean_total_effect"] = _mean((self.p_clean - self.p_corrupt).tolist())
        out["trace.noise_std"] = self.stats.get("noise_std")
        for k in ("seconds", "seconds_per_fact"):
            out[k] = self.stats.get(k)
        return out

    # -- files -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save

        from engramlab.runs import atomic_write_bytes, atomic_write_jsonl

        d = write_result(directory, self.NAME, self)
        tensors = {"p_restored": self.p_restored.float().contiguous(), "p_clean": self.p_clean.float().contiguous(),
                   "p_corrupt": self.p_corrupt.float().contiguous(), "spans": self.spans.long().contiguous(),
                   "n_tokens": self.n_tokens.long().contiguous(), "mean_maps": self.mean_maps().float().contiguous()}
        atomic_write_bytes(d / TENSORS, save(tensors, metadata={"kinds": ",".join(KINDS),
                                                                "token_kinds": ",".join(TOKEN_KINDS)}))
        atomic_write_jsonl(d / "skipped.jsonl", self.skipped)

    @classmethod
    def load(cls, directory: str | Path) -> "TraceResult":
        from safetensors.torch import load

        got = read_result(directory, cls.NAME)
        path = Path(directory) / TENSORS
        if not path.is_file():
            raise EngramError(f"{path}: missing; is this a complete `engram trace` result directory?")
        t = load(path.read_bytes())
        return cls(got.records, t["p_restored"], t["p_clean"], t["p_corrupt"], t["spans"], t["n_tokens"],
                   got.config, got.stats, got.model)


def check_window(lm, config: TraceConfig) -> None:
    n = lm.adapter.n_layers
    if config.window > n:
        raise EngramError(f"TraceConfig.window={config.window} (--window): larger than the model's {n} layers; "
                          f"use --window {n} or less")


def find_trace(lm, facts, config: TraceConfig | None = None, *, progress: bool = False) -> TraceResult:
    """Causal tracing of every fact (module docstring); facts whose subject is not in the prompt's
    tokens are skipped with the reason. A window larger than the model is refused."""
    config = config or TraceConfig()
    check_window(lm, config)
    t0 = time.perf_counter()
    a = lm.adapter
    prepared, rows = [], []
    for k, fact in enumerate(facts):
        prompt = fact.prompt(config.template)
        ids = encode(lm, prompt)
        span, reason = subject_span(lm.tokenizer, ids, prompt, fact.subject, fact.template(config.template))
        if span is None:
            rows.append(fact_record(fact, prompt, skipped=reason))
            continue
        answer = target_token_ids(lm.tokenizer, prompt, fact.object)[0]
        rows.append(None)
        prepared.append((k, len(rows) - 1, fact, prompt, ids, span, answer))
    sigma = config.noise * embedding_std(lm, config.noise_sample, [ids[s[0]:s[1]] for *_, ids, s, _ in prepared])
    n, L = len(prepared), a.n_layers
    t_max = max((len(p[4]) for p in prepared), default=0)
    p_restored = torch.full((n, len(KINDS), L, t_max), float("nan"))
    p_clean, p_corrupt = torch.zeros(n), torch.zeros(n)
    spans, n_tokens = torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for j, (k, where, fact, prompt, ids, (b, e), answer) in enumerate(progress_bar(prepared, "trace",
                                                                                   enabled=progress)):
        noise = fact_noise(config.seed, k, config.samples, e - b, a.d_model, sigma)
        tr = trace_grid(lm, ids, (b, e), answer, noise, config.window, config.batch_size)
        T = len(ids)
        p_restored[j, :, :, :T] = tr.restored
        p_clean[j], p_corrupt[j] = tr.p_clean, tr.p_corrupt
        spans[j] = torch.tensor([b, e])
        n_tokens[j] = T
        eff = tr.restored - p_corrupt[j]  # the stored float32 numbers, so a loaded result re-derives these
        rows[where] = fact_record(
            fact, prompt, tokens=[lm.tokenizer.decode([i]) for i in ids], subject_span=[b, e],
            answer=lm.tokenizer.decode([answer]), p_clean=short(float(p_clean[j])),
            p_corrupt=short(float(p_corrupt[j])), total_effect=short(float(p_clean[j] - p_corrupt[j])),
            **{f"max_{kind}_effect": short(float(eff[ki].max())) for ki, kind in enumerate(KINDS)},
            peak_mlp_layer=int(eff[KINDS.index("mlp"), :, e - 1].argmax()))
    seconds = time.perf_counter() - t0
    stats = {"n_facts": len(rows), "n_traced": n, "n_skipped": len(rows) - n,
             "noise_std": None if math.isnan(sigma) else float(sigma),
             "seconds": seconds, "seconds_per_fact": seconds / n if n else None}
    return TraceResult(rows, p_restored, p_clean, p_corrupt, spans, n_tokens, to_dict(config), stats,
                       model_facts(lm))


__all__ = ["TraceConfig", "TraceResult", "check_window", "find_trace", "token_kind_map"]
