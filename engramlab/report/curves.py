"""Learning curves of one training run (``curves.png`` in every ``engram train`` run directory).

Four panels over training steps: attribute loss against the no-knowledge baseline (with the
plateau marked), attribute accuracy, the held-out population (hallucination: loss and the
confidence of the first value token), and the attention mass on the name per layer.
"""

from __future__ import annotations

from pathlib import Path


def plot_training_curves(rows: list[dict], out_png: str | Path, plateau: tuple[int | None, int | None] = (None, None),
                         title: str = "") -> Path:
    """Draw ``rows`` (metrics.jsonl lines) into ``out_png``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    base = rows[0]["baseline_loss"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))

    ax = axes[0]
    for key, label in (("eval.attr_loss", "held-out templates"), ("train.attr_loss", "training templates"),
                       ("old.attr_loss", "old population")):
        if key in rows[-1]:
            ax.plot(steps, [r[key] for r in rows], label=label)
    ax.axhline(base, color="k", ls="--", lw=0.8, label="no-knowledge baseline")
    for s, name in zip(plateau, ("plateau start", "plateau end")):
        if s is not None:
            ax.axvline(s, color="grey", ls=":", lw=1)
            ax.text(s, 1.8 * base, name, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_ylim(0, max(2.5 * base, 1e-3))
    ax.set_title("attribute loss")
    ax.legend(fontsize=7)

    ax = axes[1]
    for key, label in (("eval.attr_acc", "held-out templates"), ("train.attr_acc", "training templates"),
                       ("old.attr_acc", "old population")):
        if key in rows[-1]:
            ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_ylim(0, 1)
    ax.set_title("attribute accuracy")
    ax.legend(fontsize=7)

    ax = axes[2]
    if "heldout.attr_loss" in rows[-1]:
        ax.plot(steps, [r["heldout.attr_loss"] for r in rows], color="C3", label="loss on unseen people")
        ax.axhline(base, color="k", ls="--", lw=0.8)
        twin = ax.twinx()
        twin.plot(steps, [r["heldout.first_token_top1_prob"] for r in rows], color="C4", label="top-1 prob")
        twin.set_ylim(0, 1)
        twin.set_ylabel("top-1 probability, first value token", fontsize=7)
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title("hallucination on unseen people")

    ax = axes[3]
    if "eval.attn.attr_to_name" in rows[-1]:
        n_layers = len(rows[-1]["eval.attn.attr_to_name"])
        for l in range(n_layers):
            ax.plot(steps, [r["eval.attn.attr_to_name"][l] for r in rows], label=f"layer {l}: value -> name")
        ax.plot(steps, [r["eval.attn.name_to_name_layer0"] for r in rows], "k:", label="layer 0: name -> earlier name")
        if "eval.attn.last_name_to_name_layer0" in rows[-1]:  # absent in runs made before 2026-12
            ax.plot(steps, [r["eval.attn.last_name_to_name_layer0"] for r in rows], "k--",
                    label="layer 0: last name token -> name")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    ax.set_title("attention to the name")

    for ax in axes:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
