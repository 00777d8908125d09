"""Named points where a test can kill or interrupt the process, to prove a run resumes from
whatever a crash leaves (``tests/test_faults.py``).

``LAYERPROBE_FAULT=PHASE[@N][:sigint]``: the ``N``-th time (default: the first) the process
reaches :func:`fault_point` ``(PHASE)`` it prints ``fault injection: ...`` to stderr and kills
itself with SIGKILL (no cleanup at all, as the OOM killer or a lost node would), or with
``:sigint`` raises ``KeyboardInterrupt`` (Ctrl-C). Without the variable a fault point does
nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

FAULT_ENV = "LAYERPROBE_FAULT"
_reached: Counter[str] = Counter()


def fault_point(phase: str) -> None:
    """Kill or interrupt here if ``LAYERPROBE_FAULT`` names ``phase`` (module docstring)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    sigint = wanted.endswith(":sigint")
    spec = wanted.removesuffix(":sigint")
    name, _, nth = spec.partition("@")
    if name != phase:
        return
    _reached[phase] += 1
    if _reached[phase] != (int(nth) if nth else 1):
        return
    print(f"fault injection: {'SIGINT' if sigint else 'SIGKILL'} at {phase} "
          f"(#{_reached[phase]})", file=sys.stderr, flush=True)
    if sigint:
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGKILL)
