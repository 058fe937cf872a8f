"""Drawing a circuit: Graphviz DOT always, SVG through ``dot`` when installed, else matplotlib.

Edge width grows with |score| (relative to the largest kept edge); colour says what the edge
feeds: a head's query, key or value input, an MLP, or the logits. Nodes sit by layer (input at the
bottom, logits at the top), heads left to right, the MLP at the right end of its layer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from engramlab.locate.circuits.graph import READER_KINDS, CircuitGraph
from engramlab.locate.circuits.prune import circuit_nodes
from engramlab.runs import atomic_write_bytes, atomic_write_text

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "mlp": "#9467bd", "logits": "#7f7f7f"}


def _edges(scores: torch.Tensor, kept: torch.Tensor, graph: CircuitGraph) -> list[tuple[int, int, str, float]]:
    """(writer node, reader node, kind, |score|) per kept edge; a shared key/value reader is drawn to
    each head of its group that is in the circuit."""
    nodes = circuit_nodes(kept, graph)
    out = []
    for w, r in kept.nonzero().tolist():
        kind = READER_KINDS[int(graph.reader_kind[r])]
        targets = [int(n) for n in graph.reader_nodes[r].nonzero().flatten() if nodes[n]]
        for n in targets or [int(graph.reader_nodes[r].nonzero()[0])]:
            out.append((w, n, kind, float(scores[w, r].abs())))
    return out


def to_dot(scores: torch.Tensor, kept: torch.Tensor, graph: CircuitGraph) -> str:
    names = graph.node_names()
    edges = _edges(scores, kept, graph)
    top = max((e[3] for e in edges), default=1.0) or 1.0
    used = sorted({e[0] for e in edges} | {e[1] for e in edges})
    lines = ["digraph circuit {", "  rankdir=BT; node [shape=box, style=rounded, fontsize=10];"]
    for n in used:
        shape = "ellipse" if names[n] in ("input", "logits") else "box"
        lines.append(f'  "{names[n]}" [shape={shape}];')
    for w, n, kind, s in edges:
        width = 0.5 + 4.5 * s / top
        lines.append(f'  "{names[w]}" -> "{names[n]}" [color="{COLOURS[kind]}", penwidth={width:.2f}, '
                     f'tooltip="{kind} {s:.3g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _position(node: int, graph: CircuitGraph) -> tuple[float, float]:
    if node == 0:
        return (graph.n_heads / 2, -1.0)
    if node == graph.n_writers:
        return (graph.n_heads / 2, graph.n_layers)
    layer, slot = divmod(node - 1, graph.n_heads + 1)
    # the MLP sits above its layer's heads (it reads them), offset to the right
    return (float(slot), layer + (0.5 if slot == graph.n_heads else 0.0))


def draw_circuit(scores: torch.Tensor, kept: torch.Tensor, graph: CircuitGraph, path: str | Path) -> Path:
    """Write ``path`` (SVG) and ``path`` with suffix .dot; returns the SVG path."""
    path = Path(path)
    dot_text = to_dot(scores, kept, graph)
    atomic_write_text(path.with_suffix(".dot"), dot_text)
    dot = shutil.which("dot")
    if dot:
        done = subprocess.run([dot, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=120)
        if done.returncode == 0:
            atomic_write_bytes(path, done.stdout)
            return path
    return _draw_matplotlib(scores, kept, graph, path)


def _draw_matplotlib(scores: torch.Tensor, kept: torch.Tensor, graph: CircuitGraph, path: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = graph.node_names()
    edges = _edges(scores, kept, graph)
    top = max((e[3] for e in edges), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, graph.n_heads * 0.8), max(5.0, graph.n_layers * 0.5)))
    for w, n, kind, s in sorted(edges, key=lambda e: e[3]):
        (x0, y0), (x1, y1) = _position(w, graph), _position(n, graph)
        ax.plot([x0, x1], [y0, y1], color=COLOURS[kind], lw=0.3 + 3.7 * s / top, alpha=0.7, zorder=1)
    for n in sorted({e[0] for e in edges} | {e[1] for e in edges}):
        x, y = _position(n, graph)
        ax.scatter([x], [y], s=60, color="white", edgecolor="black", zorder=2)
        ax.annotate(names[n], (x, y), fontsize=6, ha="center", va="bottom", xytext=(0, 4), textcoords="offset points")
    ax.set_xlabel("head (MLP at the right)")
    ax.set_ylabel("layer")
    ax.legend(handles=[Line2D([], [], color=c, label=k) for k, c in COLOURS.items()], fontsize=7, loc="upper right")
    ax.set_title(f"circuit: {int(kept.sum())} edges")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def circuit_svg(scores: torch.Tensor, kept: torch.Tensor, graph: CircuitGraph, *, title: str | None = None,
                max_edges: int = 1500, width: float = 11.0, height: float = 4.2) -> str:
    """The circuit as inline SVG text for ``report.html``: deterministic (same tensors -> same
    bytes, no ``dot``), layers left to right (input at the left, logits at the right), heads bottom to
    top with the MLP on top of its layer. Colours and widths as :func:`draw_circuit`; only the
    ``max_edges`` strongest edges are drawn (the title says so) to keep the page light."""
    from matplotlib.lines import Line2D

    from engramlab.report.page import new_figure, svg_of

    names = graph.node_names()
    edges = sorted(_edges(scores, kept, graph), key=lambda e: (e[3], e[0], e[1], e[2]))
    n_all = len(edges)
    edges = edges[-max_edges:] if max_edges and n_all > max_edges else edges
    top = max((e[3] for e in edges), default=1.0) or 1.0

    def xy(node: int) -> tuple[float, float]:
        x, y = _position(node, graph)
        return (y, x)  # layer along x, head along y

    fig, axes = new_figure(1, 1, width, height)
    ax = axes[0]
    for w, n, kind, s in edges:
        (x0, y0), (x1, y1) = xy(w), xy(n)
        ax.plot([x0, x1], [y0, y1], color=COLOURS[kind], lw=0.3 + 3.2 * s / top, alpha=0.6, zorder=1)
    used = sorted({e[0] for e in edges} | {e[1] for e in edges})
    if used:
        pts = [xy(n) for n in used]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, color="white", edgecolor="black", lw=0.6, zorder=2)
        small = len(used) <= 160
        for n, (x, y) in zip(used, pts):
            if small or names[n] in ("input", "logits"):
                ax.annotate(names[n], (x, y), fontsize=5, ha="center", va="bottom", xytext=(0, 3),
                            textcoords="offset points", zorder=3)
    else:
        ax.text(0.5, 0.5, "no edge kept", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlim(-1.6, graph.n_layers + 0.6)
    ax.set_ylim(-0.8, graph.n_heads + 0.9)
    ax.set_xlabel("layer (input at the left, logits at the right)")
    ax.set_ylabel("head (MLP on top)")
    ax.set_yticks(list(range(graph.n_heads)) + [graph.n_heads])
    ax.set_yticklabels([str(h) for h in range(graph.n_heads)] + ["MLP"], fontsize=7)
    step = max(1, graph.n_layers // 15)
    ax.set_xticks(list(range(0, graph.n_layers, step)))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(handles=[Line2D([], [], color=c, label=k) for k, c in COLOURS.items()], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), title="edge feeds", title_fontsize=7)
    shown = f"{int(kept.sum())} edges kept"
    if len(edges) < n_all:  # a shared key/value reader is one line per head, so lines can outnumber edges
        shown += f" (the {len(edges)} strongest of {n_all} lines drawn)"
    ax.set_title(f"{title}: {shown}" if title else f"circuit: {shown}", fontsize=9)
    fig.tight_layout()
    return svg_of(fig)
