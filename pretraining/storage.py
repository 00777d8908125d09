"""Reading a run folder's files: an unreadable file (truncated by a crash or a full disk,
corrupt, or of another format) is named in the error together with what to do about it.

Every file of a run is written atomically (a temporary file renamed into place), so a kill leaves
either the old file or the new one; these errors are for files damaged outside the run (a disk
fault, a copy cut short, a hand edit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class UnreadableFile(ValueError):
    """A run file that cannot be read; the message names it and says what to do."""


def read_json(path: str | Path, what: str, remedy: str) -> Any:
    """The JSON in ``path``, or an :class:`UnreadableFile` naming it, ``what`` it is and the
    ``remedy``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableFile(f"{path}: unreadable {what} ({type(err).__name__}: {err}); "
                             f"{remedy}") from err


def read_torch(path: str | Path, what: str, remedy: str) -> Any:
    """``torch.load(path)`` on the CPU (a file this project wrote), or an
    :class:`UnreadableFile` naming it, ``what`` it is and the ``remedy``."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch and pickle raise many types for damaged files
        raise UnreadableFile(f"{path}: unreadable {what} ({type(err).__name__}: "
                             f"{str(err)[:200]}); {remedy}") from err
