"""Report sections for ``engram train`` and ``engram sweep`` runs (the fact-learning findings).

Each collected train run is classified by its config and world:

* from scratch (no ``init``, no ``patch_attention_from``): one section per run (order 10) with the
  learning curves (baseline, plateau, the evaluations near the baseline), accuracy, the held-out
  population (hallucination), attention statistics and a summary table; findings ``three_phases``
  and ``hallucination``;
* continued training of a model (``init`` set): a fine-tuning run when its world is not a
  continual world; all fine-tuning runs of one parent share one section (order 30) comparing the
  old population's accuracy with and without replay (finding ``finetune_collapse``). A continual
  pre-training run gets an ordinary run section without findings;
* attention-patching twins (``patch_attention_from`` RUN:STEP): a section (order 25) overlaying the
  twin's and the source run's curves (finding ``attention_patching``).

A sweep (order 20) shows plateau end against N with its power-law fit, its runs' loss curves and,
when the grid varies ``sampler``, the per-sampler plateau ends (findings ``plateau_scaling``,
``imbalance_warmup``). Every verdict applies the rule of ``report.findings`` to the numbers shown;
missing data gives a note (and an ``inconclusive`` verdict), never a crash.
"""

from __future__ import annotations

from pathlib import Path

from engramlab.report.page import (Finding, Section, anchor, figure, fmt, is_number, kv_table, new_figure, note,
                                   para, series, table)
from engramlab.report.runs import Report, RunView, collect
from engramlab.report.sections import renderer

#: The fact-learning paper's fit of plateau end against N (Zucchet et al. 2025, Fig. 2), for reference.
PAPER_FIT = (0.43, 0.81)
#: "Near the baseline": an evaluation whose loss is within this fraction of the no-knowledge loss.
NEAR = 0.10
#: The most points a curve keeps on the page (longer curves are thinned evenly).
MAX_POINTS = 400


# ---------------------------------------------------------------- data


def thin(rows: list[dict], limit: int = MAX_POINTS) -> list[dict]:
    """At most ``limit`` rows, evenly spaced, always keeping the first and the last."""
    if len(rows) <= limit:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def baseline_of(run: RunView, rows: list[dict]):
    b = run.summary.get("baseline_loss")
    if not is_number(b):
        b = next((r["baseline_loss"] for r in rows if is_number(r.get("baseline_loss"))), None)
    return b


def summary_of(run: RunView, rows: list[dict]) -> dict:
    """The run's summary; for a run that never wrote one (interrupted), the same curve analysis
    recomputed from its metrics."""
    if "plateau_end_step" in run.summary or not rows:
        return run.summary
    from engramlab.dynamics.knowledge import summarize_training

    base = baseline_of(run, rows)
    if base is None:
        return run.summary
    cfg = run.config
    try:
        return {**summarize_training(rows, base, float(cfg.get("plateau_reach", 0.05)),
                                     float(cfg.get("plateau_exit", 0.10))), **run.summary}
    except (KeyError, TypeError, ValueError):
        return run.summary


def near_baseline(rows: list[dict], baseline, end) -> list[int]:
    """Steps of the evaluations whose eval loss is within ``NEAR`` of ``baseline`` before step ``end``."""
    if not is_number(baseline):
        return []
    return [s for s, v in zip(*series(rows, "eval.attr_loss"))
            if abs(v - baseline) <= NEAR * baseline and (end is None or s < end)]


def split_spec(spec) -> str:
    """The RUN of a recorded ``RUN:STEP`` (a checkpoint reference)."""
    text = str(spec or "")
    head, sep, tail = text.rpartition(":")
    return head if sep and head and "/" not in tail and "\\" not in tail else text


def _short(spec) -> str:
    """A recorded run path as its directory name (``/x/base:2000`` -> ``base:2000``)."""
    return Path(str(spec or "")).name or str(spec)


def is_continual(run: RunView, report: Report) -> bool:
    kind = report.world_kind(run)
    if kind:
        return kind == "continual"
    names = (run.name, Path(str(run.config.get("world") or "")).name)
    return any("continual" in n.lower() for n in names)


def classify(run: RunView, report: Report) -> str:
    """``scratch``, ``patched``, ``finetune`` or ``continued`` (continual pre-training, or continued
    training from a pretrained model without an old population)."""
    cfg = run.config
    if cfg.get("patch_attention_from"):
        return "patched"
    if not cfg.get("init"):
        return "scratch"
    if is_continual(run, report):
        return "continued"
    parent = report.follow(split_spec(cfg["init"]))
    rows = run.jsonl("metrics.jsonl")
    if (parent is not None and parent.command == "train") or any("old.attr_acc" in r for r in rows[-1:]):
        return "finetune"
    return "continued"


# ---------------------------------------------------------------- figure helpers


def _mark_steps(ax, marks, ymax=None):
    """Vertical lines at (step, label, color) marks, labelled at the top of the axes."""
    for step, label, color in marks:
        if is_number(step):
            ax.axvline(step, color=color, ls=":", lw=1.2)
            ax.text(step, 0.98, f" {label}", rotation=90, va="top", ha="right", fontsize=7, color=color,
                    transform=ax.get_xaxis_transform())


def _finish(fig, axes):
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()


def _loss_ylim(ax, base, ys):
    top = 2.5 * base if is_number(base) else (1.05 * max(ys) if ys else 1.0)
    ax.set_ylim(0, top)


def status_note(run: RunView) -> str:
    st = run.manifest.get("status")
    if st and st != "complete":
        return note(f"Run {run.name} is {st}, not complete: the curves and numbers stop at its last evaluation.")
    return ""


# ---------------------------------------------------------------- from-scratch runs


def learning_figure(run: RunView, rows: list[dict], s: dict) -> str:
    base = baseline_of(run, rows)
    start, end = s.get("plateau_start_step"), s.get("plateau_end_step")
    fig, (ax, ax2) = new_figure(2, 1, width=11, height=3.4)
    all_y = []
    for key, label in (("eval.attr_loss", "trained people, held-out templates"),
                       ("train.attr_loss", "trained people, training templates"),
                       ("dist.attr_loss", "training distribution (as sampled)"),
                       ("old.attr_loss", "old population")):
        xs, ys = series(rows, key)
        if xs:
            train = key == "train.attr_loss"
            ax.plot(xs, ys, lw=1.0 if train else 1.5, ls="--" if train else "-", label=label)
            all_y += ys
    if is_number(base):
        ax.axhline(base, color="k", ls="--", lw=0.9, label=f"no-knowledge baseline {base:.3g}")
        ax.axhspan(base * (1 - NEAR), base * (1 + NEAR), color="0.85", alpha=0.5, lw=0)
        near = set(near_baseline(rows, base, end))
        xs, ys = series(rows, "eval.attr_loss")
        pts = [(x, y) for x, y in zip(xs, ys) if x in near]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, mfc="none", color="C3",
                    label=f"{len(pts)} evaluations within {NEAR:.0%} of baseline")
    _mark_steps(ax, [(start, "plateau start", "0.35"), (end, "plateau end", "C2")])
    _loss_ylim(ax, base, all_y)
    ax.set(xlabel="training step", ylabel="attribute loss (nats)", title="Attribute loss")
    for key, label in (("eval.attr_acc", "held-out templates"), ("train.attr_acc", "training templates"),
                       ("dist.attr_acc", "training distribution"), ("old.attr_acc", "old population"),
                       ("eval.attr_acc.kind.rel", "K_rel people (known, updated)"),
                       ("eval.attr_acc.kind.compl", "K_compl people (new)")):
        xs, ys = series(rows, key)
        if xs:
            ax2.plot(xs, ys, lw=1.3, label=label)
    _mark_steps(ax2, [(start, "plateau start", "0.35"), (end, "plateau end", "C2")])
    ax2.set(xlabel="training step", ylabel="accuracy (all value tokens right)", title="Attribute accuracy",
            ylim=(0, 1.02))
    _finish(fig, [ax, ax2])
    return figure(fig, "Learning curves. Dashed: the no-knowledge loss (log of the number of possible values, "
                       f"averaged over attributes); grey band: within {NEAR:.0%} of it; circles: the evaluations in "
                       "that band before the plateau ends.")


def hallucination_figure(run: RunView, rows: list[dict], s: dict) -> str:
    if not series(rows, "heldout.attr_loss")[0]:
        return note("No held-out (never trained) population was evaluated in this run: no hallucination curves.")
    base = baseline_of(run, rows)
    fig, (ax, ax2) = new_figure(2, 1, width=11, height=3.2)
    all_y = []
    for key, label, c in (("heldout.attr_loss", "never-seen people", "C3"),
                          ("eval.attr_loss", "trained people", "C0")):
        xs, ys = series(rows, key)
        ax.plot(xs, ys, lw=1.3, color=c, label=label)
        all_y += ys
    if is_number(base):
        ax.axhline(base, color="k", ls="--", lw=0.9, label="no-knowledge baseline")
        ax.axhline(base * (1 + NEAR), color="C3", ls=":", lw=0.9, label=f"{1 + NEAR:.1f}x baseline")
    _mark_steps(ax, [(s.get("plateau_start_step"), "plateau start", "0.35"),
                     (s.get("heldout_rise_step"), "held-out rise", "C3")])
    top = max(all_y) if all_y else 1.0
    ax.set_ylim(0, min(top * 1.05, max(4 * base, top * 0.3)) if is_number(base) else top * 1.05)
    ax.set(xlabel="training step", ylabel="attribute loss (nats)", title="Loss on people never trained on")
    for key, label, c in (("heldout.first_token_top1_prob", "never-seen people", "C3"),
                          ("eval.first_token_top1_prob", "trained people", "C0")):
        xs, ys = series(rows, key)
        if xs:
            ax2.plot(xs, ys, lw=1.3, color=c, label=label)
    ax2.set(xlabel="training step", ylabel="top-1 probability", ylim=(0, 1.02),
            title="Confidence on the first value token")
    _finish(fig, [ax, ax2])
    return figure(fig, "Hallucination: as individuals are learned, the loss on people the model never saw rises "
                       "above the no-knowledge baseline while its top-1 confidence keeps growing (confidently wrong). "
                       "The loss axis is cut at 4x the baseline.")


def attention_figure(rows: list[dict], s: dict) -> str:
    last = rows[-1] if rows else {}
    per_layer = last.get("eval.attn.attr_to_name")
    if not isinstance(per_layer, list) or not per_layer:
        return note("No attention statistics in this run's metrics (trained with attention_stats off, or an "
                    "older run).")
    fig, (ax, ax2) = new_figure(2, 1, width=11, height=3.3)
    for layer in range(len(per_layer)):
        xs, ys = series(rows, "eval.attn.attr_to_name", layer)
        ax.plot(xs, ys, lw=1.3, label=f"layer {layer}")
    for key, label, ls in (("eval.attn.last_name_to_name_layer0", "last name token -> rest of the name", "-"),
                           ("eval.attn.name_to_name_layer0", "name token -> all earlier name tokens", "--")):
        xs, ys = series(rows, key)
        if xs:
            ax2.plot(xs, ys, "k", ls=ls, lw=1.2, label=label)
    marks = [(s.get("plateau_start_step"), "plateau start", "0.35"), (s.get("plateau_end_step"), "plateau end", "C2")]
    _mark_steps(ax, marks)
    _mark_steps(ax2, marks)
    ax.set(xlabel="training step", ylabel="attention mass (mean over heads)", ylim=(0, 1.02),
           title="Value position -> name, per layer")
    ax2.set(xlabel="training step", ylabel="attention mass (mean over heads)", ylim=(0, 1.02),
            title="Name -> name, layer 0")
    _finish(fig, [ax, ax2])
    return figure(fig, "Attention statistics on the evaluation sentences: how much the position that predicts a "
                       "value's first token attends to the person's name tokens, per layer (left), and the name "
                       "tokens' attention to each other in the first layer (right).")


def summary_rows(run: RunView, rows: list[dict], s: dict) -> list[tuple[str, object]]:
    base = baseline_of(run, rows)
    near = near_baseline(rows, base, s.get("plateau_end_step"))
    pairs = [("people trained on", s.get("n_people")), ("sampler", s.get("sampler", run.config.get("sampler"))),
             ("evaluations", len(rows)), ("last step", s.get("final_step")),
             ("no-knowledge baseline loss", base), ("empirical-marginal loss", s.get("baseline_loss_empirical")),
             ("plateau start step", s.get("plateau_start_step")), ("plateau end step", s.get("plateau_end_step")),
             (f"evaluations within {NEAR:.0%} of baseline before the plateau end", len(near)),
             ("final attribute loss", s.get("final_attr_loss")), ("final accuracy (held-out templates)",
                                                                  s.get("final_attr_acc")),
             ("final accuracy (training templates)", s.get("final_train_template_acc")),
             ("held-out population: rise step", s.get("heldout_rise_step")),
             ("held-out population: final loss", s.get("heldout_loss_final")),
             ("held-out population: final top-1 prob.", s.get("heldout_top1_prob_final")),
             ("parameters (non-embedding)", s.get("n_params_non_embedding")),
             ("tokens / second", s.get("tokens_per_second"))]
    always = {"plateau start step", "plateau end step"}  # "—": the curve never got there
    return [(k, "—" if v is None else v) for k, v in pairs if v is not None or k in always]


def three_phases(s: dict, n_near: int, section: str, priority: int = 0) -> Finding:
    """The ``three_phases`` rule on a run's summary and its count of evaluations near the baseline."""
    start, end, acc = s.get("plateau_start_step"), s.get("plateau_end_step"), s.get("final_attr_acc")
    measured = (f"plateau start {fmt(start)}, end {fmt(end)}; {n_near} evaluations within {NEAR:.0%} of the "
                f"baseline before the end; final accuracy {fmt(acc)}")
    if "plateau_end_step" not in s:
        verdict, measured = "inconclusive", "no learning curve to read (no metrics, no summary)"
    elif start is None or end is None:
        verdict = "not reproduced"
    elif n_near >= 4 and is_number(acc) and acc >= 0.5:
        verdict = "reproduced"
    else:
        verdict = "partly reproduced"
    return Finding("three_phases", measured, verdict, section, priority)


def hallucination(s: dict, baseline, section: str, priority: int = 0) -> Finding:
    """The ``hallucination`` rule: rise above 1.1x baseline at/after the plateau start, end above it."""
    rise, start, final = s.get("heldout_rise_step"), s.get("plateau_start_step"), s.get("heldout_loss_final")
    if not is_number(final) or not is_number(baseline):
        return Finding("hallucination", "no held-out population loss in this run", "inconclusive", section, priority)
    measured = (f"held-out loss above {1 + NEAR:.1f}x baseline from step {fmt(rise)} (plateau start {fmt(start)}); "
                f"final {fmt(final)} vs baseline {fmt(baseline)}")
    ok = is_number(rise) and is_number(start) and rise >= start and final > baseline
    return Finding("hallucination", measured, "reproduced" if ok else "not reproduced", section, priority)


def run_section(run: RunView, report: Report, findings: bool = True) -> Section:
    sid = anchor("train", run.name)
    all_rows = run.jsonl("metrics.jsonl")
    rows = thin(all_rows)
    s = summary_of(run, all_rows)
    title = f"Training run {run.name}"
    parts = [status_note(run)]
    if not findings:
        title = f"Continued training {run.name}"
        parts.append(para(f"Continued from {_short(run.config.get('init'))} on a "
                          f"{report.world_kind(run) or 'different'} world: a continual pre-training run, not a "
                          "fine-tuning pair, so it measures no fine-tuning finding here (its knowledge-circuit "
                          "analysis has its own section)."))
    if not all_rows:
        parts.append(note(f"{run.name} has no metrics.jsonl (no evaluation was written): no curves."))
        body = "".join(parts) + (kv_table(summary_rows(run, all_rows, s)) if s else "")
        found = [three_phases(s, 0, sid)] if findings else []
        return Section(sid, title, body, order=10, findings=found)
    base = baseline_of(run, all_rows)
    n_near = len(near_baseline(all_rows, base, s.get("plateau_end_step")))
    parts += ["<h3>Learning curves</h3>", learning_figure(run, rows, s),
              "<h3>Hallucination on unseen people</h3>", hallucination_figure(run, rows, s),
              "<h3>Attention over training</h3>", attention_figure(rows, s),
              "<h3>Numbers</h3>", kv_table(summary_rows(run, all_rows, s))]
    found = []
    if findings:
        found = [three_phases(s, n_near, sid, len(all_rows)), hallucination(s, base, sid, len(all_rows))]
        parts.insert(1, para(_verdict_line(found)))
    return Section(sid, title, "".join(parts), order=10, findings=found)


def _verdict_line(found: list[Finding]) -> str:
    from engramlab.report.findings import FINDINGS

    titles = {f.key: f.title for f in FINDINGS}
    return " ".join(f"{titles.get(f.key, f.key)}: {f.verdict} ({f.measured})." for f in found)


# ---------------------------------------------------------------- fine-tuning


def old_acc(run: RunView, rows: list[dict]) -> dict:
    """old_acc_initial / _min / _final from the summary, or from the ``old.attr_acc`` curve."""
    xs, ys = series(rows, "old.attr_acc")
    out = {}
    for key, fallback in (("initial", ys[0] if ys else None), ("min", min(ys) if ys else None),
                          ("final", ys[-1] if ys else None)):
        v = run.summary.get(f"old_acc_{key}")
        out[key] = v if is_number(v) else fallback
    return out


def is_replay(run: RunView) -> bool:
    return str(run.config.get("sampler") or run.summary.get("sampler") or "").startswith("replay")


def finetune_collapse(plain: list[tuple[str, dict]], replay: list[tuple[str, dict]], section: str) -> Finding:
    """The ``finetune_collapse`` rule on (name, old_acc) of the plain and the replay runs."""
    if not plain or plain[0][1]["initial"] is None or plain[0][1]["min"] is None:
        return Finding("finetune_collapse", "no plain (non-replay) fine-tuning run with old-population accuracy",
                       "inconclusive", section)
    name, p = plain[0]
    collapsed = p["min"] <= 0.5 * p["initial"]
    measured = f"without replay ({name}) old accuracy {fmt(p['initial'])} -> min {fmt(p['min'])}, final {fmt(p['final'])}"
    good = [(n, r) for n, r in replay if r["final"] is not None]
    if good:
        best_name, best = max(good, key=lambda nr: nr[1]["final"])
        measured += "; with replay: " + ", ".join(f"{n} final {fmt(r['final'])}" for n, r in good)
        benefit = p["final"] is not None and best["final"] >= p["final"] + 0.1
    else:
        measured += "; no replay run"
        benefit = False
    if collapsed and benefit:
        verdict = "reproduced"
    elif collapsed:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    return Finding("finetune_collapse", measured, verdict, section)


def finetune_section(parent_name: str, members: list[RunView]) -> Section:
    sid = anchor("finetune", parent_name)
    data = [(r, r.jsonl("metrics.jsonl")) for r in members]
    parts = [status_note(r) for r in members]
    if any(series(rows, "old.attr_acc")[0] for _, rows in data):
        fig, (ax, ax2) = new_figure(2, 1, width=11, height=3.4)
        for i, (r, rows) in enumerate(data):
            label = f"{r.name} ({r.config.get('sampler', 'uniform')})"
            xs, ys = series(thin(rows), "old.attr_acc")
            if xs:
                ax.plot(xs, ys, lw=1.4, color=f"C{i}", label=label, ls="-" if is_replay(r) else "--")
            xs, ys = series(thin(rows), "eval.attr_acc")
            if xs:
                ax2.plot(xs, ys, lw=1.4, color=f"C{i}", label=label, ls="-" if is_replay(r) else "--")
        first = old_acc(*data[0])["initial"]
        if is_number(first):
            ax.axhline(first, color="k", ls=":", lw=0.8, label="before fine-tuning")
            ax.axhline(first / 2, color="C3", ls=":", lw=0.8, label="half of it")
        ax.set(xlabel="fine-tuning step", ylabel="accuracy", ylim=(0, 1.02), title="Old population (forgetting)")
        ax2.set(xlabel="fine-tuning step", ylabel="accuracy", ylim=(0, 1.02), title="New population (learning)")
        _finish(fig, [ax, ax2])
        parts.append(figure(fig, f"Fine-tuning {parent_name}'s model on new people: accuracy on the people it was "
                                 "trained on before (left) and on the new people (right); dashed: plain fine-tuning, "
                                 "solid: with replay of the old population."))
    else:
        parts.append(note("These runs have no old-population metrics (old.*): no retention curves."))
    rows_t = []
    plain, replay = [], []
    for r, rows in data:
        o = old_acc(r, rows)
        (replay if is_replay(r) else plain).append((r.name, o))
        rows_t.append((r.name, str(r.config.get("sampler", "")), o["initial"], o["min"], o["final"],
                       r.summary.get("old_acc_halved_step"), r.summary.get("final_attr_acc")))
    parts.append(table(["run", "sampler", "old acc. before", "old acc. min", "old acc. final", "halved at step",
                        "new acc. final"], rows_t))
    f = finetune_collapse(plain, replay, sid)
    parts.insert(0, para(f"Fine-tuning erases old facts; replay softens it: {f.verdict} ({f.measured})."))
    return Section(sid, f"Fine-tuning from {parent_name}", "".join(parts), order=30, findings=[f])


# ---------------------------------------------------------------- attention patching


def attention_patching(twin_end, source_end, section: str, priority: int = 0, cadence: str = "") -> Finding:
    """The ``attention_patching`` rule on the twin's and the source run's plateau end steps."""
    measured = f"patched twin's plateau ends at step {fmt(twin_end)} vs {fmt(source_end)} for the run it copies{cadence}"
    if source_end is None:
        verdict = "inconclusive"
        measured += " (the source run has no plateau end or was not found)"
    elif twin_end is not None and twin_end < source_end:
        verdict = "reproduced"
    else:
        verdict = "not reproduced"
    return Finding("attention_patching", measured, verdict, section, priority)


def patched_section(run: RunView, report: Report) -> Section:
    sid = anchor("patched", run.name)
    spec = run.config.get("patch_attention_from")
    source = report.follow(split_spec(spec))
    rows = run.jsonl("metrics.jsonl")
    s = summary_of(run, rows)
    srows = source.jsonl("metrics.jsonl") if source is not None else []
    ss = summary_of(source, srows) if source is not None else {}
    parts = [status_note(run)]
    if source is None:
        parts.append(note(f"The source run {_short(split_spec(spec))} is not in this report and no longer exists: only the "
                          "twin is shown."))
    if rows:
        base = baseline_of(run, rows)
        fig, (ax, ax2) = new_figure(2, 1, width=11, height=3.4)
        all_y = []
        for r_rows, label, summ, c in ((rows, f"patched twin: {run.name}", s, "C1"),
                                       (srows, f"source: {source.name if source else '?'}", ss, "C0")):
            xs, ys = series(thin(r_rows), "eval.attr_loss")
            if xs:
                ax.plot(xs, ys, color=c, lw=1.4, label=label)
                all_y += ys
            xa, ya = series(thin(r_rows), "eval.attr_acc")
            if xa:
                ax2.plot(xa, ya, color=c, lw=1.4, label=label)
            if xs:
                _mark_steps(ax, [(summ.get("plateau_end_step"), "plateau end", c)])
                _mark_steps(ax2, [(summ.get("plateau_end_step"), "plateau end", c)])
        if is_number(base):
            ax.axhline(base, color="k", ls="--", lw=0.9, label="no-knowledge baseline")
        _loss_ylim(ax, base, all_y)
        ax.set(xlabel="training step", ylabel="attribute loss (nats)", title="Loss: twin vs source")
        ax2.set(xlabel="training step", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy: twin vs source")
        _finish(fig, [ax, ax2])
        parts.append(figure(fig, f"The twin is trained from the same initial weights with every head's attention "
                                 f"pattern taken from {_short(spec)}; dotted lines: each run's plateau end."))
    else:
        parts.append(note(f"{run.name} has no metrics.jsonl: no curves."))
    win = run.config.get("patch_window")
    parts.append(table(["run", "role", "plateau start", "plateau end", "final loss", "final accuracy", "eval every"],
                       [(run.name, "patched twin", s.get("plateau_start_step"), s.get("plateau_end_step"),
                         s.get("final_attr_loss"), s.get("final_attr_acc"), run.config.get("eval_every")),
                        (source.name if source else _short(split_spec(spec)), "source", ss.get("plateau_start_step"),
                         ss.get("plateau_end_step"), ss.get("final_attr_loss"), ss.get("final_attr_acc"),
                         source.config.get("eval_every") if source else None)]))
    if win:
        parts.append(para(f"Patch window: updates {win[0]} to {win[1]}." if isinstance(win, list) and len(win) == 2
                          else f"Patch window: {win}."))
    every = run.config.get("eval_every")
    cadence = (f" (evaluated every {every} vs {source.config.get('eval_every')} steps)"
               if source is not None and is_number(every) else "")
    f = attention_patching(s.get("plateau_end_step"), ss.get("plateau_end_step"), sid,
                           -int(every) if is_number(every) else 0, cadence)
    parts.insert(0, para(f"Attention patterns carry the plateau: {f.verdict} ({f.measured})."))
    return Section(sid, f"Attention patching: {run.name}", "".join(parts), order=25, findings=[f])


# ---------------------------------------------------------------- sweeps


def _label(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row.get(k)}" for k in keys)


def scaling_finding(fits: dict, n_sizes: int, section: str) -> Finding | None:
    """The ``plateau_scaling`` rule on fit.json's groups (None when the sweep does not vary N)."""
    if n_sizes < 2 or not fits:
        return None
    name = "all" if "all" in fits else next((k for k in sorted(fits) if "sampler=uniform" in k), sorted(fits)[0])
    fit = fits[name]
    pts = fit.get("points") or []
    a, b, r2 = fit.get("a"), fit.get("b"), fit.get("r2")
    where = "" if name == "all" else f" ({name})"
    measured = (f"plateau_end = {fmt(a)}*N^{fmt(b)}, R^2 {fmt(r2)}, over {len(pts)} population sizes{where}; "
                f"paper {PAPER_FIT[0]}*N^{PAPER_FIT[1]}")
    ok = len({p[0] for p in pts}) >= 3 and is_number(b) and b > 0.3 and is_number(r2) and r2 >= 0.8
    return Finding("plateau_scaling", measured, "reproduced" if ok else "not reproduced", section, len(pts))


def imbalance_finding(rows: list[dict], keys: list[str], section: str) -> Finding | None:
    """The ``imbalance_warmup`` rule: each non-uniform sampler against uniform at the same other keys."""
    if "sampler" not in keys:
        return None
    others = [k for k in keys if k not in ("sampler",)]
    uniform = {tuple(r.get(k) for k in others): r for r in rows if str(r.get("sampler")) == "uniform"}
    cmp = []
    for r in rows:
        if str(r.get("sampler")) == "uniform":
            continue
        u = uniform.get(tuple(r.get(k) for k in others))
        if u is None:
            continue
        dist = "summary.plateau_end_step_train_dist" in r
        mine = r.get("summary.plateau_end_step_train_dist" if dist else "summary.plateau_end_step")
        theirs = u.get("summary.plateau_end_step")
        earlier = mine is not None and (theirs is None or mine < theirs)
        where = f" at {_label(r, others)}" if others else ""
        cmp.append((f"{r.get('sampler')}{where}{' (training distribution)' if dist else ''}", mine, theirs, earlier))
    if not cmp:
        return Finding("imbalance_warmup", "no uniform run at the same grid point to compare with", "inconclusive",
                       section)
    n = sum(c[3] for c in cmp)
    verdict = "reproduced" if n == len(cmp) else "partly reproduced" if n else "not reproduced"
    measured = "; ".join(f"{name}: plateau end {fmt(m)} vs uniform {fmt(t)}" for name, m, t, _ in cmp)
    return Finding("imbalance_warmup", f"{n} of {len(cmp)} earlier: {measured}", verdict, section)


def _plot_scaling(ax, fits: dict) -> bool:
    """Plateau end against N (log-log) with each group's fit and the paper's; False when no point."""
    import numpy as np

    groups = [(k, fits[k]) for k in sorted(fits) if fits[k].get("points")]
    if not groups:
        return False
    xs_all = []
    for i, (name, fit) in enumerate(groups):
        pts = np.array(fit["points"], dtype=float)
        xs_all += list(pts[:, 0])
        ax.loglog(pts[:, 0], pts[:, 1], "o", color=f"C{i}", label=f"{name}: plateau end")
        if is_number(fit.get("a")) and is_number(fit.get("b")):
            xs = np.geomspace(pts[:, 0].min(), pts[:, 0].max(), 50)
            ax.loglog(xs, fit["a"] * xs ** fit["b"], "-", color=f"C{i}",
                      label=f"fit {fit['a']:.3g}*N^{fit['b']:.2f} (R^2 {fmt(fit.get('r2'))})")
    xs = np.geomspace(min(xs_all), max(xs_all), 50)
    ax.loglog(xs, PAPER_FIT[0] * xs ** PAPER_FIT[1], color="0.5", ls="--",
              label=f"paper: {PAPER_FIT[0]}*N^{PAPER_FIT[1]} (its set-up)")
    import matplotlib.ticker

    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # crowded minor labels
    ax.set(xlabel="people N (log)", ylabel="plateau end step (log)", title="Plateau length vs population size")
    return True


def _plot_curves(ax, sweep: RunView, rows: list[dict], keys: list[str]) -> list[str]:
    """Each grid point's eval loss / baseline; returns the runs without a curve."""
    missing = []
    for i, r in enumerate(rows):
        run_dir = sweep.path / str(r.get("run", ""))
        try:
            metrics = collect(run_dir).runs[-1].jsonl("metrics.jsonl") if (run_dir / "manifest.json").is_file() else []
        except Exception:  # a damaged unit is reported as missing
            metrics = []
        base = r.get("summary.baseline_loss")
        xs, ys = series(thin(metrics), "eval.attr_loss")
        if not xs or not is_number(base):
            missing.append(str(r.get("run")))
            continue
        c = f"C{i % 10}"
        ax.plot(xs, [y / base for y in ys], lw=1.2, color=c, label=_label(r, keys))
        end = r.get("summary.plateau_end_step")
        if is_number(end) and end in xs:
            ax.plot([end], [ys[xs.index(end)] / base], "v", color=c, ms=5)
    ax.axhline(1.0, color="k", ls="--", lw=0.9, label="no-knowledge baseline")
    ax.set(xlabel="training step", ylabel="eval loss / baseline", ylim=(0, 2.5), title="Loss curves of the grid's runs")
    return missing


def _plot_samplers(ax, rows: list[dict], keys: list[str]) -> None:
    others = [k for k in keys if k != "sampler"]
    labels, uni, dist = [], [], []
    for r in rows:
        labels.append(str(r.get("sampler")).replace(":", ":\n") + (f"\n{_label(r, others)}" if others else ""))
        u, d = r.get("summary.plateau_end_step"), r.get("summary.plateau_end_step_train_dist")
        uni.append(u if is_number(u) else 0)
        dist.append(d if is_number(d) else 0)
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], uni, 0.4, label="on the uniform population")
    ax.bar([i + 0.2 for i in x], dist, 0.4, label="on the training distribution")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set(ylabel="plateau end step", title="Plateau end by sampler")


def sweep_figures(sweep: RunView, rows: list[dict], keys: list[str], fits: dict, n_sizes: int) -> str:
    """The sweep's panels, two to a figure: scaling (when N varies), loss curves, samplers (when varied)."""
    panels = (["scaling"] if n_sizes >= 2 else []) + ["curves"] + (["sampler"] if "sampler" in keys else [])
    captions = {"scaling": "plateau end against the number of people, log-log, with this sweep's power-law fit and "
                           "the fact-learning paper's for reference (another model, batch and learning rate: compare "
                           "the slopes)",
                "curves": "each grid point's eval attribute loss as a multiple of the no-knowledge baseline, "
                          "triangles at the plateau ends (runs stop there unless the sweep ran --full-runs)",
                "sampler": "the plateau end of each sampler on the uniform population and, for non-uniform "
                           "samplers, on the distribution it draws people from (a missing bar: not measured or "
                           "never ended)"}
    out, notes = [], []
    for i in range(0, len(panels), 2):
        group = panels[i:i + 2]
        fig, axes = new_figure(len(group), 1, width=11 if len(group) == 2 else 7, height=3.6)
        for ax, kind in zip(axes, group):
            if kind == "scaling" and not _plot_scaling(ax, fits):
                ax.text(0.5, 0.5, "no plateau ended", ha="center", transform=ax.transAxes)
                notes.append("No run of this sweep reached its plateau end: no scaling plot.")
            elif kind == "curves":
                missing = _plot_curves(ax, sweep, rows, keys)
                if missing:
                    notes.append("No loss curve for: " + ", ".join(missing) + " (run directory or metrics.jsonl "
                                 "missing).")
            elif kind == "sampler":
                _plot_samplers(ax, rows, keys)
        _finish(fig, axes)
        text = "; ".join(captions[k] for k in group)
        out.append(figure(fig, ("Left: " if len(group) == 2 else "") + text.replace("; ", ". Right: ", 1) + "."))
    return "".join(out) + "".join(note(n) for n in notes)


def sweep_section(sweep: RunView) -> Section:
    sid = anchor("sweep", sweep.name)
    grid = sweep.config.get("grid") if isinstance(sweep.config.get("grid"), dict) else {}
    keys = list(grid)
    rows = sweep.jsonl("sweep.jsonl")
    fits = sweep.json("fit.json", {}) or {}
    parts = [status_note(sweep)]
    grid_text = "; ".join(f"{k} = {', '.join(str(v) for v in vals)}" for k, vals in grid.items())
    parts.append(para(f"Grid: {grid_text or 'unknown'}; {len(rows)} run(s)."))
    if not rows:
        parts.append(note("This sweep has no sweep.jsonl (no grid point finished): nothing to show."))
        return Section(sid, f"Sweep {sweep.name}", "".join(parts), order=20)
    n_sizes = len({r.get("n_people") for r in rows}) if "n_people" in keys else 0
    found = [f for f in (scaling_finding(fits, n_sizes, sid), imbalance_finding(rows, keys, sid)) if f]
    if found:
        parts.append(para(_verdict_line(found)))
    parts.append(sweep_figures(sweep, rows, keys, fits, n_sizes))
    cols = [("plateau start", "summary.plateau_start_step"), ("plateau end", "summary.plateau_end_step"),
            ("plateau end (training dist.)", "summary.plateau_end_step_train_dist"),
            ("final loss", "summary.final_attr_loss"), ("final accuracy", "summary.final_attr_acc")]
    cols = [(h, k) for h, k in cols if any(r.get(k) is not None for r in rows)]
    parts.append(table([*keys, *(h for h, _ in cols)],
                       [(*(r.get(k) if is_number(r.get(k)) else str(r.get(k)) for k in keys), *(r.get(k) for _, k in cols))
                        for r in rows]))
    return Section(sid, f"Sweep {sweep.name}", "".join(parts), order=20, findings=found)


# ---------------------------------------------------------------- entry point


@renderer("train", "sweep")
def render(runs: list[RunView], report: Report) -> list[Section]:
    """Sections for every train and sweep run (see the module docstring)."""
    sections: list[Section] = []
    parents: dict[str, list[RunView]] = {}
    for run in runs:
        if run.command == "sweep":
            sections.append(sweep_section(run))
            continue
        kind = classify(run, report)
        if kind == "patched":
            sections.append(patched_section(run, report))
        elif kind == "finetune":
            parent = report.follow(split_spec(run.config.get("init")))
            parents.setdefault(parent.name if parent else split_spec(run.config.get("init")), []).append(run)
        else:
            sections.append(run_section(run, report, findings=kind == "scratch"))
    for name, members in parents.items():
        sections.append(finetune_section(Path(name).name or name, members))
    return sections


__all__ = ["attention_patching", "finetune_collapse", "hallucination", "imbalance_finding", "render",
           "scaling_finding", "three_phases", "thin"]
