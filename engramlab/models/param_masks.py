"""Parameter masks on disk: one bool mask per parameter, bit-packed in a safetensors file.

Regions (``engramlab.locate.regions``) write them and training (``--freeze``) reads them, so they
live here, below both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.runs import atomic_write_bytes

Masks = dict[str, torch.Tensor]
FORMAT = "engramlab-masks"


def save_masks(path: str | Path, masks: Masks) -> None:
    """Write a region as safetensors, atomically: one uint8 tensor per parameter holding its mask
    flattened in row-major order and bit-packed (numpy.packbits, most significant bit first); the
    shapes sit in the header's metadata."""
    from safetensors.torch import save

    packed, shapes = {}, {}
    for n, m in masks.items():
        if m.dtype != torch.bool:
            raise EngramError(f"save_masks: mask {n!r} is {m.dtype}, not bool")
        packed[n] = torch.from_numpy(np.packbits(m.detach().cpu().flatten().numpy()))
        shapes[n] = list(m.shape)
    atomic_write_bytes(path, save(packed, metadata={"format": FORMAT, "shapes": json.dumps(shapes)}))


def _packed(path: str | Path, framework: str) -> Iterator[tuple[str, list[int], object]]:
    """(name, shape, packed bytes) of every mask in a ``save_masks`` file, in the order they were
    saved; a missing, foreign or damaged file is a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EngramError(f"{path}: no such mask file; write it with save_masks (engram regions --out)")
    try:
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise EngramError(f"{path}: not an engramlab mask file (no format={FORMAT} in its header)")
            shapes = json.loads(meta["shapes"])
            if set(shapes) != set(f.keys()):
                raise EngramError(f"{path}: its header lists other masks than it holds; write it again")
            items = [(n, shapes[n], f.get_tensor(n)) for n in shapes]
    except EngramError:
        raise
    except Exception as e:
        raise EngramError(f"{path}: cannot read the masks ({' '.join(str(e).split())[:200]}); "
                          "the file is damaged, write it again") from e
    yield from items


def load_masks(path: str | Path) -> Masks:
    """Read a region written by ``save_masks``."""
    out = {}
    for name, shape, packed in _packed(path, "numpy"):
        bits = np.unpackbits(packed, count=int(np.prod(shape))).astype(bool)
        out[name] = torch.from_numpy(bits).view(shape)
    return out


def mask_fractions(path: str | Path) -> dict[str, float]:
    """{parameter name: fraction of its entries in the mask} of a ``save_masks`` file, counted on
    the packed bytes (the bits past the last entry are zero), so a large model's masks are never
    unpacked."""
    ones = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    out = {}
    for name, shape, packed in _packed(path, "numpy"):
        numel = int(np.prod(shape))
        out[name] = float(ones[packed].sum()) / numel if numel else 0.0
    return out


__all__ = ["FORMAT", "load_masks", "mask_fractions", "save_masks"]
