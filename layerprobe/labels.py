"""Default names of models in tables and figures: unique, and as short as they can be.

``runs/demo/it1/ckpt.pt`` and ``runs/p5/it1/ckpt.pt`` become ``demo/it1`` and ``p5/it1``: the
shortest trailing part of each path that no other spec shares, after dropping the file suffix
and a generic file name (``ckpt``, ``checkpoint``, ``model``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

GENERIC_NAMES = frozenset({"ckpt", "checkpoint", "checkpoint_best", "checkpoint_last", "model",
                           "pytorch_model", "profile", "probe", "results"})
FILE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json"})


def _name_parts(spec: str) -> tuple[str, ...]:
    """Meaningful path components: no suffix on the file, no generic file name, no '.'/'/'."""
    parts = [p for p in PurePath(spec).parts if p not in ("/", ".", "")]
    if not parts:
        return (spec,)
    last = PurePath(parts[-1])
    if last.suffix.lower() in FILE_SUFFIXES:
        parts[-1] = last.stem
    if len(parts) > 1 and parts[-1].lower() in GENERIC_NAMES:
        parts.pop()
    return tuple(parts)


def unique_labels(specs: Sequence[str]) -> list[str]:
    """One label per spec: the shortest path suffix that tells it apart from every other spec.

    Identical specs get `` (2)``, `` (3)``... after the first.
    """
    parts = [_name_parts(str(s)) for s in specs]
    labels = []
    for i, mine in enumerate(parts):
        others = {p for j, p in enumerate(parts) if j != i and p != mine}
        k = 1
        while k < len(mine) and any(p[-k:] == mine[-k:] for p in others):
            k += 1
        labels.append("/".join(mine[-k:]))
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out
