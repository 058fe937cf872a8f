"""Memory sizes as people write them: ``parse_bytes("24GB")``, ``format_bytes(n)``."""

from __future__ import annotations

import math

from engramlab.errors import EngramError

# Decimal units (GB = 10^9, as disks and cloud prices count) and binary ones (GiB = 2^30, as
# memory is); a bare K/M/G is binary, as in `free -h` and torch's memory summaries.
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, flag: str) -> int:
    """"24GB" -> 24 x 10^9 bytes, "512MiB" -> 512 x 2^20, "1.5GiB", "2G" (binary), "1000" (bytes);
    anything else (or not > 0) is an ``EngramError`` naming ``flag``."""
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):] or "b"
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not value > 0 or math.isinf(value):
        raise EngramError(f"{flag} {text!r}: give a size like 24GB, 512MiB or 1.5GiB")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """1536 * 2**20 -> "1.50 GiB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
