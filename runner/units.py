"""Quantities as people read them."""

from __future__ import annotations


def size_text(num_bytes: float) -> str:
    """Bytes in B, kB, MB or GB, as pg_size_pretty does but with one decimal."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(num_bytes) < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
