"""Building blocks of ``report.html``: sections, findings, figures, tables.

A report is a list of :class:`Section` objects (each an ``<section id=...>`` with an ``<h2>``) and
the :class:`Finding` rows they computed. Everything is inline: figures are matplotlib SVG (made
deterministic: fixed id salt, no date), so the same run directories always give the same bytes.
Section renderers (``engramlab.report.sections``) build their HTML from the helpers here and never
write raw ``<style>`` or ``<script>``: the page's one stylesheet and script live in ``html.py``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

#: The verdicts a finding can have; ``rule`` in ``findings.py`` says how each is decided.
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive", "not run")


@dataclass
class Finding:
    """One measured row of the findings table: ``key`` is a ``findings.FINDINGS`` key; ``measured``
    is the number at this scale in words; ``section`` the id of the section with the evidence.
    When several runs measure the same finding, the one with the highest ``priority`` is shown
    (ties: the first)."""

    key: str
    measured: str
    verdict: str
    section: str
    priority: int = 0

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"finding {self.key}: verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass
class Section:
    """``body`` is HTML made with the helpers of this module; ``order`` sorts sections on the page
    (training 10, sweeps 20, fine-tuning 30, evolve 40, continual 50, neurons 60, dkn 70,
    circuits 80, recall 90, regions 100, metadata 1000)."""

    id: str
    title: str
    body: str
    order: int = 500
    findings: list[Finding] = field(default_factory=list)


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def anchor(*parts) -> str:
    """A valid, readable HTML id from ``parts`` (``anchor("train", "run 1")`` -> ``train-run-1``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(str(p) for p in parts)).strip("-").lower() or "section"


def fmt(x, digits: int = 3) -> str:
    """A number as people read it: ints as ints, floats to ``digits`` significant digits, None as —."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e6:
            return str(int(x))
        return f"{x:.{digits}g}"
    return str(x)


def shown_path(text) -> str:
    """A recorded path as the page shows it: absolute paths (of the machine the run was made on)
    shortened to their last two parts (``/scratch/me/study/train`` -> ``study/train``); a model
    alias or a relative path unchanged. Keeps machine paths out of the page."""
    text = str(text)
    if not text.startswith("/"):
        return text
    parts = [p for p in text.split("/") if p]
    return "/".join(parts[-2:])


def is_number(x) -> bool:
    """A finite int or float (not a bool): what a figure can plot."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows: list[dict], key: str, index: int | None = None, x: str = "step") -> tuple[list, list]:
    """(x values, values) of ``key`` over the rows where both are numbers; ``index``: element
    ``index`` of a list-valued column (per-layer statistics)."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if index is not None:
            v = v[index] if isinstance(v, list) and len(v) > index else None
        if is_number(v) and is_number(r.get(x)):
            xs.append(r[x])
            ys.append(v)
    return xs, ys


def para(text: str) -> str:
    """A paragraph of plain text (escaped)."""
    return f"<p>{esc(text)}</p>"


def table(headers: Sequence[str], rows: Iterable[Sequence], *, sortable: bool = True, id: str | None = None,
          raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are HTML). Numbers go through
    :func:`fmt`. ``sortable`` tables get click-to-sort headers from the page's script."""
    cls = ' class="sortable"' if sortable else ""
    ident = f' id="{esc(id)}"' if id else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for c in row:
            text = c if raw and isinstance(c, str) else esc(fmt(c))
            num = isinstance(c, (int, float)) and not isinstance(c, bool)
            cells.append(f'<td data-v="{esc(c)}">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{ident}{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column table of (name, value) without sorting."""
    return table(["", "value"], [(k, v) for k, v in pairs], sortable=False)


def details(summary: str, body: str, open: bool = False) -> str:
    """A collapsible block (works without JavaScript)."""
    return f"<details{' open' if open else ''}><summary>{esc(summary)}</summary>{body}</details>"


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # deterministic SVG: ids from a fixed salt, text as paths (no font lookup at view time)
    plt.rcParams["svg.hashsalt"] = "engramlab"
    plt.rcParams["svg.fonttype"] = "path"
    return plt


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.4):
    """``(fig, axes)`` from matplotlib (Agg, deterministic SVG settings); axes is a flat list."""
    plt = _matplotlib()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def svg_of(fig) -> str:
    """The figure as an inline ``<svg>`` element (no XML header, no date), and closes it."""
    plt = _matplotlib()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)  # an RDF block naming no one
    # scale with the page: drop the fixed pt size, keep the viewBox
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", text, count=1)
    return text


def figure(fig_or_svg, caption: str = "", *, id: str | None = None, extra_class: str = "") -> str:
    """A ``<figure>`` holding an inline SVG (a matplotlib figure, or SVG text) and its caption."""
    svg = fig_or_svg if isinstance(fig_or_svg, str) else svg_of(fig_or_svg)
    ident = f' id="{esc(id)}"' if id else ""
    cls = f' class="{esc(extra_class)}"' if extra_class else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure{ident}{cls}>{svg}{cap}</figure>"


def png_figure(png: bytes, caption: str = "", alt: str = "") -> str:
    """A ``<figure>`` with a PNG inline as a data URI (for pictures that are not matplotlib's)."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt or caption)}" src="data:image/png;base64,{data}">{cap}</figure>'


def slider(frames: Sequence[tuple[str, str]], label: str, id: str) -> str:
    """Several figures of which the page's script shows one at a time with a range input
    (``frames``: (frame label, figure HTML)); without JavaScript all are shown, in order."""
    items = "".join(f'<div class="frame" data-label="{esc(lab)}"><p class="frame-label">{esc(lab)}</p>{body}</div>'
                    for lab, body in frames)
    return f'<div class="slider" id="{esc(id)}" data-label="{esc(label)}">{items}</div>'


def note(text: str) -> str:
    """A highlighted remark (e.g. why a figure is missing)."""
    return f'<p class="note">{esc(text)}</p>'


__all__ = ["Finding", "Section", "VERDICTS", "anchor", "details", "esc", "figure", "fmt", "is_number", "kv_table",
           "new_figure", "series",
           "note", "para", "png_figure", "shown_path", "slider", "svg_of", "table"]
