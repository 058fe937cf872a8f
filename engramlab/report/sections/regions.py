"""Report section of ``engram regions`` (Zhang et al., ACL 2024): perplexity of every corpus with
the core, bottom and random regions zeroed, the ratios, the overlaps of the regions, where the core
region sits in the model, the region sizes and the run's settings; the ``core_region`` finding.

Everything is read from the run directory (``summary.json``, ``records.jsonl``, ``overlap.json``,
``config.json``, ``core.safetensors``), so the page is the same wherever it is built. The core
density per matrix is counted on the bit-packed mask bytes (a popcount; the padding bits of
``save_masks`` are zero), so a large model's mask is never unpacked.
"""

from __future__ import annotations

import re

from engramlab.models.param_masks import mask_fractions
from engramlab.report.page import (Finding, Section, figure, fmt, is_number, kv_table, new_figure, note, para, shown_path,
                                   table)
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import dimension_regions as dimensions
from engramlab.report.sections import knowledge_regions as knowledge
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import locator_config, model_name, records_of, verb_section

#: The thresholds of the ``core_region`` rule (``report/findings.py``).
CORE_MIN = 10.0  # zeroing the core raises every corpus's perplexity at least this many times
CONTROL_MAX = 1.5  # a control changes it by less than this factor, up or down
REGIONS = (("base", "nothing zeroed"), ("top", "core zeroed"), ("bottom", "bottom zeroed"),
           ("random", "random zeroed"))
COLORS = {"base": "#5f6368", "top": "#b3261e", "bottom": "#1a73e8", "random": "#e8a33d"}
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


# -- the finding ------------------------------------------------------------------------------------
def change(ratio: float) -> float:
    """How many times a ratio to base changes perplexity, up or down (0.5 and 2 are both 2x)."""
    return max(ratio, 1.0 / ratio) if ratio > 0 else float("inf")


def ratios(summary: dict, corpora: list[str]) -> dict[str, tuple[float, float, float]]:
    """{corpus: (core, bottom, random) ratio to base} for the corpora with all three measured."""
    out = {}
    for c in corpora:
        r = tuple(summary.get(f"{c}.ppl_{k}_ratio") for k in ("top", "bottom", "random"))
        if all(is_number(x) for x in r):
            out[c] = tuple(float(x) for x in r)
    return out


def core_verdict(measured: dict[str, tuple[float, float, float]]) -> str:
    """The ``core_region`` rule on {corpus: (core, bottom, random) perplexity ratio to base}."""
    if len(measured) < 2:
        return "inconclusive"
    if min(core for core, _, _ in measured.values()) < CORE_MIN:
        return "not reproduced"
    controls_quiet = all(change(b) < CONTROL_MAX and change(r) < CONTROL_MAX for _, b, r in measured.values())
    return "reproduced" if controls_quiet else "partly reproduced"


def times(x: float) -> str:
    """A ratio as the findings table writes it: 2 decimals below 1000, else 1.9e5."""
    if x >= 1000:
        mant, exp = f"{x:.1e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{x:.2f}"


def span(values) -> str:
    lo, hi = times(min(values)), times(max(values))
    return f"x{lo}" if lo == hi else f"x{lo}-{hi}"


def measured_text(measured: dict[str, tuple[float, float, float]], corpora: list[str]) -> str:
    if not measured:
        return f"no perplexity ratios measured (corpora: {', '.join(corpora) or 'none'})"
    vals = list(measured.values())
    text = (f"core {span([v[0] for v in vals])}, bottom {span([v[1] for v in vals])}, random "
            f"{span([v[2] for v in vals])} on {', '.join(measured)}")
    missing = [c for c in corpora if c not in measured]
    if missing:
        text += f" (not measured: {', '.join(missing)})"
    if len(measured) < 2:
        text += "; the rule needs at least two corpora"
    return text


# -- reading the run --------------------------------------------------------------------------------
def corpora_of(run: RunView, records: list[dict] | None) -> list[str]:
    """Corpus names in run order: from records.jsonl, else the summary's ``<corpus>.ppl_base`` keys."""
    names = [str(r["corpus"]) for r in records or [] if r.get("corpus") is not None]
    if not names:
        names = [k[: -len(".ppl_base")] for k in run.summary if k.endswith(".ppl_base")]
    return list(dict.fromkeys(names))


def perplexities(run: RunView, records: list[dict] | None, corpora: list[str]) -> dict[str, dict[str, float]]:
    """{corpus: {base|top|bottom|random: perplexity}} from the summary, else records.jsonl."""
    rows = {str(r.get("corpus")): r for r in records or []}
    out = {}
    for c in corpora:
        got = {}
        for k, _ in REGIONS:
            v = run.summary.get(f"{c}.ppl_{k}", rows.get(c, {}).get(f"ppl_{k}"))
            if is_number(v):
                got[k] = float(v)
        out[c] = got
    return out


def overlap_of(run: RunView) -> tuple[list[str], list[list[float | None]]] | None:
    """(labels, Jaccard matrix) from overlap.json, else rebuilt from the summary's overlap keys."""
    ov = run.json("overlap.json") if run.has("overlap.json") else None
    if isinstance(ov, dict) and isinstance(ov.get("labels"), list) and isinstance(ov.get("matrix"), list):
        return [str(x) for x in ov["labels"]], ov["matrix"]
    pairs = {tuple(k.split(".")[1:]): v for k, v in run.summary.items() if k.startswith("overlap.") and k.count(".") == 2}
    if not pairs:
        return None
    labels = list(dict.fromkeys(x for pair in pairs for x in pair))
    matrix = [[1.0 if a == b else pairs.get((a, b), pairs.get((b, a))) for b in labels] for a in labels]
    return labels, matrix


def split_name(name: str) -> tuple[int, str] | None:
    """(layer index, matrix name) of a block tensor name (``model.layers.3.self_attn.q_proj.weight``
    -> (3, ``self_attn.q_proj``)); None when the name has no layer index."""
    m = _LAYER.match(name)
    if not m:
        return None
    rest = m.group(3)
    return int(m.group(2)), rest[: -len(".weight")] if rest.endswith(".weight") else rest


# -- figures ----------------------------------------------------------------------------------------
def ppl_figure(ppl: dict[str, dict[str, float]], title: str):
    corpora = list(ppl)
    fig, (ax,) = new_figure(1, 1, 9.0, 3.4)
    width = 0.2
    for j, (k, label) in enumerate(REGIONS):
        xs = [i + (j - 1.5) * width for i, c in enumerate(corpora) if k in ppl[c]]
        ys = [ppl[c][k] for c in corpora if k in ppl[c]]
        ax.bar(xs, ys, width, color=COLORS[k], label=label)
        if k != "base":
            for x, c in zip(xs, [c for c in corpora if k in ppl[c]]):
                if ppl[c].get("base"):
                    ax.text(x, ppl[c][k] * 1.15, "x" + times(ppl[c][k] / ppl[c]["base"]), ha="center",
                            va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    values = [v for p in ppl.values() for v in p.values() if v > 0]
    if values:
        ax.set_ylim(min(values) / 2, max(values) * 20)  # room for the ratio labels
    ax.set_xticks(range(len(corpora)))
    ax.set_xticklabels(corpora)
    ax.set_xlim(-0.6, max(len(corpora), 3) - 0.4)  # few corpora: bars of a readable width
    ax.set_xlabel("held-out corpus")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    return fig


def overlap_figure(labels: list[str], matrix, title: str):
    import numpy as np

    n = len(labels)
    vals = np.array([[float(v) if is_number(v) else np.nan for v in row] for row in matrix], dtype=float)
    fig, (ax,) = new_figure(1, 1, 8.0, min(4.6, 2.2 + 0.25 * n))
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    if n <= 14:
        for i in range(n):
            for j in range(n):
                if not np.isnan(vals[i, j]):
                    ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if vals[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax).set_label("Jaccard overlap", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def density_figure(dens: dict[str, float], ratio, title: str):
    """Core density per (matrix type, layer): rows are the matrix names in model order."""
    import numpy as np

    cells = {}
    for name, d in dens.items():
        key = split_name(name)
        if key is not None:
            cells[key] = d
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(kinds), len(layers)), np.nan)
    for (layer, kind), d in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = d
    fig, (ax,) = new_figure(1, 1, 9.0, min(3.6, 1.4 + 0.3 * len(kinds)))
    hi = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    hi = max(hi, float(ratio) * 1.05) if is_number(ratio) else hi  # the ratio's mark stays on the colour bar
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(hi, 1e-12), interpolation="nearest")
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(kinds, fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("share in core", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if is_number(ratio):
        cb.ax.axhline(float(ratio), color="cyan", lw=1.2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig, cells


# -- the section ------------------------------------------------------------------------------------
def regions_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    records = records_of(run)
    corpora = corpora_of(run, records)
    cfg = locator_config(run).get("config") or run.config.get("regions") or {}
    if not s and not records:
        return note("No summary.json or records.jsonl: the run did not finish, so there are no regions to show."), []
    name = model_name(run)
    body = ""
    if not s:
        body += note("No summary.json: the perplexities below come from records.jsonl, the overlaps from "
                     "overlap.json.")

    ppl = perplexities(run, records, corpora)
    if any(ppl.values()):
        body += figure(ppl_figure(ppl, f"held-out perplexity with a region zeroed ({name})"),
                       "Perplexity of each corpus's held-out chunks (never used for importance) with nothing, the "
                       "core region, the bottom region or a random region of the same size zeroed; log scale, the "
                       "labels are the ratios to nothing zeroed.")
    else:
        body += note("No perplexities recorded.")
    rows = {str(r.get("corpus")): r for r in records or []}
    body += table(["corpus", "ppl base", "ppl core zeroed", "ppl bottom zeroed", "ppl random zeroed", "core ratio",
                   "bottom ratio", "random ratio", "specific region", "importance chunks", "held-out chunks"],
                  [(c, *[ppl[c].get(k) for k, _ in REGIONS],
                    *[s.get(f"{c}.ppl_{k}_ratio", rows.get(c, {}).get(f"ppl_{k}_ratio")) for k in ("top", "bottom", "random")],
                    s.get(f"{c}.specific_size", rows.get(c, {}).get("specific_size")),
                    rows.get(c, {}).get("importance_chunks"), rows.get(c, {}).get("eval_chunks")) for c in corpora])

    ov = overlap_of(run)
    if ov and ov[0]:
        body += figure(overlap_figure(*ov, f"overlap of the regions ({name})"),
                       "Jaccard overlap |A ∩ B| / |A ∪ B| of every two regions: core, bottom and random (the same "
                       "size), each corpus's own top region (top_<corpus>) and its specific region (its top q minus "
                       "every other corpus's top p, specific_<corpus>).")
    else:
        body += note("No overlap.json and no overlap numbers in the summary: no overlap matrix.")

    ratio = cfg.get("ratio")
    if run.has("core.safetensors"):
        try:
            dens = mask_fractions(run.path / "core.safetensors")
        except Exception as e:  # a damaged or foreign file (safetensors raises its own errors): a note, not a crash
            dens = None
            body += note(f"core.safetensors cannot be read ({' '.join(str(e).split())[:160]}): no density map.")
        if dens:
            fig, cells = density_figure(dens, ratio, f"where the core region sits ({name})")
            if cells:
                scope = cfg.get("scope")
                body += figure(fig, "Share of each weight matrix's entries in the core region, per layer and matrix "
                               f"type; the line on the colour bar is the region's ratio ({fmt(ratio)}). "
                               + ("With scope=tensor every matrix holds that share by construction."
                                  if scope == "tensor" else "With scope=global the share varies with importance."))
            else:
                import matplotlib.pyplot as plt

                plt.close(fig)
                body += note("The core mask's tensor names carry no layer index: no density map.")
    else:
        body += note("No core.safetensors (the core mask): no map of where the core region sits.")

    dims = run.json("dimensions.json") if run.has("dimensions.json") else None
    if isinstance(dims, dict):
        body += ("<h4>Dimension dependency</h4>" + dimensions.dims_figure(dims, f"hidden dimensions ({name})")
                 + dimensions.dims_tables(dims))
    sizes = [("entries in the core (= bottom = random) region", s.get("region_size")),
             ("share of the region tensors' entries", s.get("region_fraction")),
             ("region tensors", s.get("n_tensors")),
             *[(f"specific region of {c} (entries)", s.get(f"{c}.specific_size")) for c in corpora]]
    body += "<h4>Region sizes</h4>" + kv_table(sizes)

    corpus_paths = {str(r.get("corpus")): r.get("path") for r in records or []}
    settings = [("model", name), ("corpora", ", ".join(f"{c} ({shown_path(corpus_paths[c])})" if corpus_paths.get(c)
                                                       else c for c in corpora) or None)]
    settings += [(k, cfg.get(k)) for k in ("method", "ratio", "scope", "normalize", "seq_len", "max_chunks",
                                           "eval_chunks", "batch_size", "include_norms", "specific_q", "specific_p",
                                           "ppl_mode", "seed") if k in cfg]
    settings += [(k, run.config.get(k)) for k in ("dtype", "device") if run.config.get(k)]
    body += "<h4>Settings</h4>" + kv_table(settings)

    lk = knowledge.numbers(s)
    if lk is not None:  # a run on facts: language vs knowledge, not languages
        found = knowledge.finding(s, sid, priority=1)
        body = ("<h4>Language vs knowledge</h4>" + knowledge.zeroed_table(lk)
                + para(f"{fmt(lk.get('n_facts'))} facts; the template corpus scores the prompt tokens, the answer "
                       "corpus the answer tokens of the same sentences. Jaccard of the two top regions: "
                       f"{fmt(lk.get('overlap'))}.") + body)
        return para(f"Finding language_knowledge: {found.verdict} ({found.measured}).") + body, [found]
    from_records = {f"{c}.{k}": v for c, r in rows.items() for k, v in r.items() if k.endswith("_ratio")}
    measured = ratios({**from_records, **s}, corpora)
    finding = Finding("core_region", measured_text(measured, corpora), core_verdict(measured), sid,
                      priority=len(measured))
    found = [finding, *([dimensions.finding(dims, sid)] if isinstance(dims, dict) else [])]
    head = "".join(para(f"Finding {f.key}: {f.verdict} ({f.measured}).") for f in found)
    return head + body, found


@renderer("regions")
def render_regions(runs: list[RunView], report: Report) -> list[Section]:
    return verb_section("regions", "Parameter regions", 100,
                        "The core region of a model over several corpora (Zhang et al. 2024): the --ratio most "
                        "important parameters by importance summed over the corpora, with two controls of the same "
                        "size (the least important parameters, and a random set), and what zeroing each does to "
                        "the perplexity of every corpus on held-out text.", runs, regions_body)

__all__ = ["core_verdict", "measured_text", "ratios", "render_regions", "split_name"]
