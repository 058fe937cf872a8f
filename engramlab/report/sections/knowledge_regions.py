"""Language vs knowledge regions (``engram regions --facts``, and ``evolve --analysis regions``):
the rule of the ``language_knowledge`` finding, its table, and the regions-over-checkpoints figure.

On facts, ``find_regions`` scores two corpora over the same sentences: the template tokens (the
language the facts are said in) and the answer tokens (the facts). Zeroing each one's top region
then shows whether the model keeps the two apart: a *double dissociation* is the knowledge region
costing the facts far more than the language region does, while the language region costs the
template text more than the knowledge region does.
"""

from __future__ import annotations

from engramlab.report.page import Finding, figure, fmt, is_number, new_figure, note, series, table

#: (summary key suffix, what it is) of the regions zeroed on facts, in table order.
ZEROED = (("base", "nothing"), ("core", "core region (both corpora)"),
          ("top_template", "language region (top of the template tokens)"),
          ("top_value", "knowledge region (top of the answer tokens)"), ("bottom", "bottom region"),
          ("random", "random region"))
#: The rule's thresholds (see ``verdict``).
MIN_BASE_ACCURACY = 0.3   # a model that knows too few facts says nothing about where it keeps them
MIN_DROP = 0.2            # the knowledge region must cost at least this much accuracy ...
DROP_FACTOR = 2.0         # ... and at least this many times what the language region costs
MAX_OVERLAP = 0.5         # Jaccard of the two regions below this


def ppl_ratio(s: dict, corpus: str, region: str, prefix: str = ""):
    """Perplexity ratio to base of ``corpus`` (template | value) with ``region`` zeroed."""
    key = "ppl_top_ratio" if region == "core" else \
        f"ppl_{region}_ratio" if region in ("bottom", "random") else f"ppl_without_{region}_ratio"
    return s.get(f"{prefix}{corpus}.{key}")


def numbers(s: dict, prefix: str = "") -> dict | None:
    """The rule's inputs from a summary (``prefix`` "regions." for an evolve row); None when the
    result is not a facts run."""
    if not is_number(s.get(f"{prefix}accuracy.base")):
        return None
    acc = {k: s.get(f"{prefix}accuracy.{k}") for k, _ in ZEROED}
    return {"accuracy": acc, "overlap": s.get(f"{prefix}overlap.top_template.top_value"),
            "template": {k: ppl_ratio(s, "template", k, prefix) for k, _ in ZEROED if k != "base"},
            "value": {k: ppl_ratio(s, "value", k, prefix) for k, _ in ZEROED if k != "base"},
            "n_facts": s.get(f"{prefix}n_facts")}


def verdict(n: dict | None) -> tuple[str, str]:
    """(verdict, measured text) of the ``language_knowledge`` rule on ``numbers``."""
    if n is None:
        return "inconclusive", "no regions run on facts"
    acc, tpl = n["accuracy"], n["template"]
    needed = [acc.get("base"), acc.get("top_template"), acc.get("top_value"), tpl.get("top_template"),
              tpl.get("top_value")]
    if not all(is_number(x) for x in needed):
        return "inconclusive", "accuracy or template perplexity with a region zeroed not measured"
    base = float(acc["base"])
    drop_value, drop_template = base - float(acc["top_value"]), base - float(acc["top_template"])
    text = (f"accuracy {fmt(base)} -> {fmt(acc['top_value'])} with the knowledge region zeroed, "
            f"{fmt(acc['top_template'])} with the language region; template ppl x{fmt(tpl['top_template'])} vs "
            f"x{fmt(tpl['top_value'])}; overlap {fmt(n.get('overlap'))}")
    if base < MIN_BASE_ACCURACY:
        return "inconclusive", text + f" (the model knows too few facts: accuracy below {MIN_BASE_ACCURACY})"
    knowledge = drop_value >= MIN_DROP and drop_value >= DROP_FACTOR * max(drop_template, 0.0)
    language = float(tpl["top_template"]) > float(tpl["top_value"]) and float(tpl["top_template"]) >= 1.5
    apart = is_number(n.get("overlap")) and float(n["overlap"]) < MAX_OVERLAP
    if knowledge and language and apart:
        return "reproduced", text
    if knowledge or language:
        return "partly reproduced", text
    return "not reproduced", text


def finding(s: dict, section: str, prefix: str = "", priority: int = 0) -> Finding | None:
    n = numbers(s, prefix)
    if n is None:
        return None
    v, text = verdict(n)
    return Finding("language_knowledge", text, v, section, priority=priority)


def zeroed_table(n: dict) -> str:
    """Per zeroed region: fact accuracy and the perplexity ratios of the template and answer tokens."""
    rows = []
    for k, what in ZEROED:
        rows.append((what, n["accuracy"].get(k), None if k == "base" else n["template"].get(k),
                     None if k == "base" else n["value"].get(k)))
    return table(["zeroed", "fact accuracy (top-1)", "template-token ppl ratio", "answer-token ppl ratio"], rows)


def over_time_figure(rows: list[dict]) -> str:
    """Regions over checkpoints: Jaccard with the final checkpoint's regions, and fact accuracy
    with each region zeroed."""
    if not any(is_number(r.get("regions.core_jaccard_final")) for r in rows):
        return note("No regions columns (run evolve with --analysis regions).")
    fig, (ax, bx) = new_figure(2, 1, 11.0, 3.3)
    for name, label in (("core", "core"), ("top_template", "language (template)"), ("top_value", "knowledge (answer)")):
        s, v = series(rows, f"regions.{name}_jaccard_final")
        if s:
            ax.plot(s, v, marker="o", ms=3, label=label)
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("Jaccard with the final region")
    ax.set_xlabel("training step")
    ax.legend(fontsize=7)
    ax.set_title("regions over checkpoints", fontsize=10)
    for k, what in ZEROED:
        s, v = series(rows, f"regions.accuracy.{k}")
        if s:
            bx.plot(s, v, marker="o", ms=3, label=f"{what.split(' (')[0]} zeroed" if k != "base" else "nothing zeroed")
    bx.set_ylim(-0.02, 1.05)
    bx.set_ylabel("fact accuracy (top-1)")
    bx.set_xlabel("training step")
    bx.legend(fontsize=7)
    bx.set_title("fact accuracy with a region zeroed", fontsize=10)
    fig.tight_layout()
    return figure(fig, "Left: Jaccard overlap of each checkpoint's core region and its top regions of the template "
                       "tokens and of the answer tokens with the final checkpoint's. Right: top-1 accuracy on the "
                       "evolve facts at each checkpoint with each region zeroed (the weights restored after).")


__all__ = ["finding", "numbers", "over_time_figure", "verdict", "zeroed_table"]
