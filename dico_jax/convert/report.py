"""One format for every "these weights do not fit this network" error.

The DiCo, VAE and FID Inception converters each collect the offending keys (missing,
unexpected, mis-shaped, ...) and report them the same way: a headline naming the source and
the target, then per kind the count and the first keys with their shapes.
"""
from __future__ import annotations

from typing import Sequence

MAX_LISTED = 20


def mismatch_message(headline: str, sections: Sequence[tuple[str, Sequence[str]]],
                     limit: int = MAX_LISTED) -> str | None:
    """None when every section is empty; else the headline and each non-empty section as
    "N title:" followed by its first `limit` items, one per indented line."""
    parts = []
    for title, items in sections:
        if items:
            listed = "\n  ".join(items[:limit])
            more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}:\n  {listed}{more}")
    if not parts:
        return None
    return f"{headline}:\n" + "\n".join(parts)
