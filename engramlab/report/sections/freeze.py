"""Report section of ``engram freeze``: further training on one corpus with nothing, the core region
or a random region of the same size held fixed (Zhang et al. 2024, §freezing); the freezing curves,
forgetting per arm and the ``freezing`` finding.

Read from the run directory: ``summary.json`` (``<arm>.forgetting``: the geometric mean over the
corpora not trained on of their end / start perplexity, ``<arm>.train_ppl_ratio``,
``<arm>.frozen_max_change``) and ``<arm>/metrics.jsonl`` (``ppl.<corpus>`` per evaluation step).
"""

from __future__ import annotations

import math

from engramlab.report.page import Finding, figure, fmt, is_number, kv_table, new_figure, note, para, series, table
from engramlab.report.runs import Report, RunView
from engramlab.report.sections import renderer
from engramlab.report.sections.locators import verb_section

ARM_STYLE = {"none": ("-", "nothing frozen"), "core": ("--", "core region frozen"),
             "random": (":", "random region frozen")}
MIN_FORGETTING = 1.05  # below this the unfrozen run forgot nothing there is to reduce
SHARE = 0.75           # the core arm keeps at most this share of the unfrozen arm's log forgetting


def verdict(s: dict) -> tuple[str, str]:
    """(verdict, measured text) of the ``freezing`` rule on an ``engram freeze`` summary."""
    f = {a: s.get(f"{a}.forgetting") for a in ARM_STYLE}
    train = s.get("train_corpus", "?")
    if not all(is_number(f[a]) for a in ("none", "core")):
        return "inconclusive", "the unfrozen and core-frozen arms were not both run"
    text = (f"trained on {train} for {fmt(s.get('steps'))} steps: the other corpora's perplexity x{fmt(f['none'])} "
            f"with nothing frozen, x{fmt(f['core'])} with the core frozen"
            + (f", x{fmt(f['random'])} with a random region frozen" if is_number(f["random"]) else ""))
    if float(f["none"]) < MIN_FORGETTING:
        return "inconclusive", text + " (no forgetting to reduce: the unfrozen run's other corpora did not degrade)"
    core_less = math.log(max(float(f["core"]), 1e-12)) <= SHARE * math.log(float(f["none"]))
    beats_random = not is_number(f["random"]) or float(f["core"]) < float(f["random"])
    if core_less and beats_random:
        return "reproduced", text
    if float(f["core"]) < float(f["none"]):
        return "partly reproduced", text
    return "not reproduced", text


def curves_figure(run: RunView, arms: list[str], corpora: list[str], train: str) -> str:
    found = {a: run.jsonl(f"{a}/metrics.jsonl") if run.has(f"{a}/metrics.jsonl") else [] for a in arms}
    if not any(found.values()):
        return note("No <arm>/metrics.jsonl: no freezing curves.")
    fig, (ax,) = new_figure(1, 1, 9.5, 3.6)
    for i, c in enumerate(corpora):
        for a, rows in found.items():
            s, v = series(rows, f"ppl.{c}")
            if s:
                ls, label = ARM_STYLE.get(a, ("-.", a))
                ax.plot(s, v, ls=ls, color=f"C{i}", marker="o", ms=2.5, lw=1.3 if c == train else 1.0,
                        label=f"{c}{' (trained)' if c == train else ''}, {label}")
    ax.set_yscale("log")
    ax.set_xlabel("further-training step")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"perplexity while training on {train}", fontsize=9)
    ax.legend(fontsize=6, ncol=len(arms), loc="best")
    fig.tight_layout()
    return figure(fig, "Held-out perplexity of every corpus (colour) during further training on one of them, with "
                       "nothing (solid), the core region (dashed) or a random region of the same size (dotted) "
                       "held fixed. The held-out chunks are the regions run's, never trained on.")


def freeze_body(run: RunView, sid: str) -> tuple[str, list[Finding]]:
    s = run.summary
    if not s:
        return note("No summary.json: the run did not finish (engram freeze --resume continues it)."), []
    arms = [a for a in ARM_STYLE if f"{a}.forgetting" in s] + \
        sorted({k.split(".")[0] for k in s if k.endswith(".forgetting")} - set(ARM_STYLE))
    corpora = list(dict.fromkeys(k.split(".")[1] for k in s if k.endswith(".ppl_start") and k.count(".") == 2))
    train = str(s.get("train_corpus", "?"))
    v, text = verdict(s)
    body = para(f"Finding freezing: {v} ({text}).")
    body += curves_figure(run, arms, corpora, train)
    body += table(["arm", "forgetting (other corpora, end/start)", f"{train} end/start", "largest change of a frozen "
                   "entry", "seconds per step"],
                  [(ARM_STYLE.get(a, ("", a))[1], s.get(f"{a}.forgetting"), s.get(f"{a}.train_ppl_ratio"),
                    s.get(f"{a}.frozen_max_change"), s.get(f"{a}.seconds_per_step")) for a in arms])
    body += table(["corpus", *[f"{a}: start" for a in arms[:1]], *[f"{a}: end" for a in arms]],
                  [(c, s.get(f"{arms[0]}.{c}.ppl_start") if arms else None,
                    *[s.get(f"{a}.{c}.ppl_end") for a in arms]) for c in corpora])
    cfg = run.config.get("freeze") if isinstance(run.config.get("freeze"), dict) else {}
    body += "<h4>Settings</h4>" + kv_table([("model", run.config.get("model")), ("regions run", run.config.get("regions")),
                                            ("trained on", train),
                                            *[(k, cfg.get(k)) for k in ("steps", "lr", "schedule", "batch_size",
                                                                         "weight_decay", "freeze_mode", "seed")
                                              if k in cfg]])
    return body, [Finding("freezing", text, v, sid, priority=len(arms))]


@renderer("freeze")
def render_freeze(runs: list[RunView], report: Report):
    return verb_section("freeze", "Freezing a region during further training", 101,
                        "Further training on one corpus while a parameter region is held fixed (Zhang et al. 2024): "
                        "does freezing the core region keep the other corpora from being forgotten, compared with "
                        "freezing nothing and freezing a random region of the same size?", runs, freeze_body)


__all__ = ["render_freeze", "verdict"]
