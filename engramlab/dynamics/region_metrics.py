"""How parameter regions change between checkpoints (``engram evolve --analysis regions``).

A region is a set of entries of the block weight matrices, kept as {parameter name: bool mask}
(``RegionResult.regions``). Between two checkpoints of one run the parameter names and shapes
are the same, so regions compare entry by entry::

    jaccard(A, B) = |A & B| / |A | B|                     (1 when both are empty)
    layer_share_l = |A in layer l| / |A|                  (the layer from the parameter's name)

Per checkpoint: ``<region>_jaccard_final`` and ``<region>_jaccard_prev`` for the core region and
each per-corpus top region the result saved (``top_template`` / ``top_value`` on facts), and
``core_share.L{l}``: where in depth the core region sits.
"""

from __future__ import annotations

import re

from engramlab.locate.regions.masks import jaccard, region_size

_LAYER = re.compile(r"\.(\d+)\.")


def compared_regions(result) -> list[str]:
    """The regions of ``result`` followed over time: core, then the per-corpus tops it saved."""
    return ["core", *(n for n in result.regions if n.startswith("top_"))]


def layer_shares(masks: dict, n_layers: int) -> list[float | None]:
    """Share of the region's entries in each layer (None for every layer when it is empty)."""
    counts = [0] * n_layers
    for name, m in masks.items():
        found = _LAYER.search(name)
        if found is None or not 0 <= int(found.group(1)) < n_layers:
            raise ValueError(f"region tensor {name!r}: no layer index 0..{n_layers - 1} in its name")
        counts[int(found.group(1))] += int(m.sum())
    total = sum(counts)
    return [c / total for c in counts] if total else [None] * n_layers


def region_series(results: list[tuple[int, object]]) -> dict[int, dict]:
    """Per step, for (step, RegionResult) pairs in step order (the last is the final): the
    Jaccard columns and layer shares of the module docstring."""
    if not results:
        return {}
    final = results[-1][1]
    names = [n for n in compared_regions(final) if all(n in r.regions for _, r in results)]
    n_layers = int(final.model.get("n_layers") or 0)
    out, prev = {}, None
    for step, r in results:
        row = {}
        for n in names:
            row[f"{n}_jaccard_final"] = jaccard(r.regions[n], final.regions[n])
            row[f"{n}_jaccard_prev"] = None if prev is None else jaccard(r.regions[n], prev.regions[n])
        row["core_size"] = region_size(r.regions["core"])
        if n_layers:
            row.update({f"core_share.L{layer}": v for layer, v in enumerate(layer_shares(r.regions["core"], n_layers))})
        out[step] = row
        prev = r
    return out


__all__ = ["compared_regions", "layer_shares", "region_series"]
