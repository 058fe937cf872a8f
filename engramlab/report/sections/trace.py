"""Report section of ``engram trace``: causal tracing (Meng et al. 2022) heat maps, the peak layers
and the ``trace_mlp_peak`` finding; ``draw_trace`` also writes the run's ``trace.png``.

Read from the run directory: ``trace.safetensors`` (``mean_maps`` (3, L, 6): the mean indirect
effect per kind (resid, mlp, attn), layer and token kind), ``summary.json`` and ``records.jsonl``.
``trace_checkpoint_table`` renders an evolve run's ``trace.*`` columns (peak MLP layer and mean max
effect per checkpoint) for the evolve section.
"""

from __future__ import annotations

from engramlab.locate.trace.config import KINDS, TOKEN_KINDS
from engramlab.report.page import Finding, figure, fmt, is_number, new_figure, note, para, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import n_layers_of, verb_section

KIND_TITLES = (("resid", "hidden state (residual)", "Purples"), ("mlp", "MLP output", "Greens"),
               ("attn", "attention output", "Reds"))
# Axis labels of TOKEN_KINDS, in its order.
TOKEN_LABELS = tuple({"further": "further tokens", "last": "last token"}.get(k, k) for k in TOKEN_KINDS)
EARLY_MIDDLE = 0.6   # the peak counts as early-to-middle at layer <= 0.6 (L - 1)
MIN_TOTAL = 0.01     # below this mean total effect the noise did not remove the answer: nothing to trace
PEAK_SHARE = 0.25    # reproduced: the MLP peak holds at least this share of the mean total effect


def heatmap_figure(maps, title: str = "", window: int | None = None):
    """A matplotlib figure of three panels (resid, mlp, attn): token kind (rows) x layer (columns)
    of ``maps`` (3, L, 6), the mean indirect effect on P(answer)."""
    import numpy as np

    m = np.asarray(maps, dtype=float)
    n_layers = m.shape[1]
    fig, axes = new_figure(3, 1, 13.0, 3.0)
    for ax, (k, (kind, label, cmap)) in zip(axes, enumerate(KIND_TITLES)):
        grid = np.ma.masked_invalid(m[k].T)   # (6, L)
        low = float(np.nanmin(m[k])) if np.isfinite(m[k]).any() else 0.0
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=min(0.0, low), interpolation="nearest")
        ax.set_yticks(range(len(TOKEN_LABELS)), TOKEN_LABELS, fontsize=7)
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 8)))
        ax.set_xlabel("layer" if kind == "resid" else f"centre of a {window or '?'}-layer window", fontsize=8)
        ax.set_title(f"restoring the {label}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_trace(result, path) -> None:
    """Write ``path`` (PNG): the three average heat maps of a ``TraceResult``, atomically."""
    import io

    from engramlab.report.page import _matplotlib
    from engramlab.runs import atomic_write_bytes

    fig = heatmap_figure(result.mean_maps().numpy(), f"causal tracing: mean indirect effect on P(answer) over "
                         f"{result.p_clean.shape[0]} facts", result.config.get("window"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _matplotlib().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def verdict(s: dict, n_layers: int | None, mlp_peak_effect: float | None) -> tuple[str, str]:
    """(verdict, measured text) of the ``trace_mlp_peak`` rule on a trace summary."""
    peak, total = s.get("trace.peak_mlp_layer"), s.get("trace.mean_total_effect")
    if not is_number(peak) or not n_layers or not is_number(total):
        return "inconclusive", "no facts traced"
    depth = peak / max(n_layers - 1, 1)
    text = (f"MLP effect at the last subject token peaks at layer {peak} of {n_layers} (depth {depth:.2f}, "
            f"mean effect {fmt(mlp_peak_effect)}; corruption removes {fmt(total)} of P(answer))")
    if total < MIN_TOTAL:
        return "inconclusive", text + ": the noise barely changes P(answer)"
    if depth > EARLY_MIDDLE:
        return "not reproduced", text
    if is_number(mlp_peak_effect) and mlp_peak_effect >= PEAK_SHARE * total:
        return "reproduced", text
    return "partly reproduced", text


def _maps(run: RunView):
    if not run.has("trace.safetensors"):
        return None
    from safetensors.numpy import load_file

    return load_file(str(run.path / "trace.safetensors")).get("mean_maps")


def trace_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    if not s:
        return note("No summary.json: the run did not finish."), []
    maps = _maps(run)
    n_layers = n_layers_of(run) or (maps.shape[1] if maps is not None else None)
    cfg = (run.json("config.json") or {}).get("config", {})
    peak_effect = None
    if maps is not None and is_number(s.get("trace.peak_mlp_layer")):
        peak_effect = float(maps[KINDS.index("mlp"), int(s["trace.peak_mlp_layer"]), TOKEN_KINDS.index("last subject")])
    v, text = verdict(s, n_layers, peak_effect)
    body = para(f"Finding trace_mlp_peak: {v} ({text}).")
    if maps is None:
        body += note("No trace.safetensors: no heat maps.")
    else:
        import numpy as np

        body += figure(heatmap_figure(maps, window=cfg.get("window")),
                       "Mean indirect effect on P(answer) of restoring one clean state into the run with a noised "
                       "subject, by token kind (rows) and layer (columns): the residual stream at one layer, the "
                       f"MLP and attention outputs over a {cfg.get('window', '?')}-layer window centred there.")
        rows = []
        for k, (kind, label, _) in enumerate(KIND_TITLES):
            for t, tok in ((TOKEN_KINDS.index("last subject"), "last subject"),
                           (TOKEN_KINDS.index("last"), "last token")):
                col = maps[k, :, t]
                if np.isfinite(col).any():
                    at = int(np.nanargmax(col))
                    rows.append((label, tok, at, float(col[at])))
        body += table(["restored", "token", "peak layer", "mean indirect effect there"], rows)
    body += table(["n facts", "skipped", "mean P clean", "mean P corrupt", "mean max IE (resid)", "mean max IE (mlp)",
                   "mean max IE (attn)", "noise std", "seconds"],
                  [(s.get("n_facts"), s.get("n_skipped"), s.get("trace.mean_p_clean"), s.get("trace.mean_p_corrupt"),
                    s.get("trace.mean_max_indirect_effect"), s.get("trace.mean_max_mlp_effect"),
                    s.get("trace.mean_max_attn_effect"), s.get("trace.noise_std"), s.get("seconds"))])
    return body, [Finding("trace_mlp_peak", text, v, sid, priority=int(n_layers or 0))]


def trace_checkpoint_table(rows: list[dict]) -> str:
    """An evolve run's trace columns: per checkpoint the peak MLP layer and the mean max effects
    ("" when the evolve did not run ``trace``)."""
    have = [r for r in rows if "trace.peak_mlp_layer" in r]
    if not have:
        return ""
    n_layers = len([k for k in have[-1] if k.startswith("trace.mlp_last_subject.L")])
    html = "<h3>Causal tracing over checkpoints</h3>"
    if n_layers:
        import numpy as np

        grid = np.array([[r.get(f"trace.mlp_last_subject.L{l}") if is_number(r.get(f"trace.mlp_last_subject.L{l}"))
                          else np.nan for l in range(n_layers)] for r in have], dtype=float)
        fig, (ax,) = new_figure(1, 1, 6.5, 2.8)
        im = ax.imshow(np.ma.masked_invalid(grid.T), aspect="auto", cmap="Greens", origin="lower",
                       interpolation="nearest")
        ax.set_xticks(range(len(have)), [str(r["step"]) for r in have], fontsize=6, rotation=45)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("layer (window centre)")
        ax.set_title("mean MLP indirect effect at the last subject token", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        fig.tight_layout()
        html += figure(fig, "Causal tracing at each checkpoint: the mean MLP indirect effect at the last subject "
                            "token per layer (columns: checkpoints). Where it peaks is the table's first column.")
    return html + table(
        ["step", "peak MLP layer (last subject token)", "mean max IE (resid)", "mean max IE (mlp)", "mean total effect"],
        [(r["step"], r.get("trace.peak_mlp_layer"), r.get("trace.mean_max_effect"), r.get("trace.mean_max_mlp_effect"),
          r.get("trace.mean_total_effect")) for r in have])


@renderer("trace")
def render_trace(runs: list[RunView], report: Report):
    return verb_section("trace", "Causal tracing", 85,
                        "Causal tracing (Meng et al. 2022): the subject's input embeddings get Gaussian noise, then "
                        "one hidden state of the clean run is restored at a time; the indirect effect is how much "
                        "of the answer's probability that one state brings back. The paper finds a strong MLP "
                        "effect at the last subject token in early-to-middle layers and an attention effect at the "
                        "last token in late layers.", runs, trace_body)


__all__ = ["draw_trace", "heatmap_figure", "render_trace", "trace_checkpoint_table", "verdict"]
