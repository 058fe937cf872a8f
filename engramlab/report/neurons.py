"""Drawings of knowledge-neuron results."""

from __future__ import annotations

from pathlib import Path


def plot_neuron_layers(records: list[dict], n_layers: int, path: Path) -> None:
    """Where the refined neurons sit: a histogram over layers, stacked by relation (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engramlab.runs import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0] * n_layers
    relations = sorted({r["relation"] for r in records})
    for rel in relations:
        counts = [0] * n_layers
        for r in records:
            if r["relation"] == rel:
                for layer, _, _ in r["neurons"]:
                    counts[layer] += 1
        ax.bar(range(n_layers), counts, bottom=bottom, label=rel)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel("knowledge neurons")
    ax.set_title("refined knowledge neurons per layer")
    if relations:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # like every run file: complete or absent
