"""Deterministic fault injection, for interruption tests of the commands that must survive a kill.

``TRIMIX_FAULTS="eval.row:4,cpt.step:3"`` makes the 4th call of ``fault_point("eval.row")`` (and the
3rd of ``cpt.step``) report that the process should die there; the caller then simulates what a kill
at that point leaves behind (a half-written line, a checkpoint cut short) and raises
:class:`SimulatedKill`. Unset, every point is a no-op. Points: ``eval.row`` (appending a prediction
row), ``generate.row`` (appending a generation), ``cpt.step`` (after an optimizer step: behaves as
Ctrl-C), ``cpt.checkpoint`` (while a checkpoint is written), ``ray.unit`` (a Ray worker process exits
while computing a unit).
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "TRIMIX_FAULTS"
ONCE = (
    "TRIMIX_FAULTS_ONCE"  # a file path: the first process to reach a firing point creates it; no other fires
)
_calls: Counter[str] = Counter()


class SimulatedKill(KeyboardInterrupt):
    """The process 'dies' at a fault point (a KeyboardInterrupt, so nothing catches it by accident)."""


def fault_point(name: str) -> bool:
    """Whether the process should die at this call of point ``name`` (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    _calls[name] += 1
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point == name and count.isdigit() and _calls[name] == int(count):
            return _claim_once()
    return False


def _claim_once() -> bool:
    """With ``TRIMIX_FAULTS_ONCE`` set, only the first process (of several: Ray workers) fires."""
    path = os.environ.get(ONCE)
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def reset() -> None:
    """Forget the counts (each test or run starts from zero)."""
    _calls.clear()
