"""Interleaved A/B rounds and the machine's load, shared by the benchmarks that compare two pipelines.

Sides run in turn (A B A B ...), so a change of load during the run hits both; each side reports its min
and median over the rounds, and the ratio of medians is the headline. The load average is printed at the
start and at the end: above half the cores, the numbers are not comparable with an idle machine.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence

LOADED_FRACTION = 0.5  # load average above this fraction of the cores: a loaded machine


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_line(when: str) -> str:
    """One line with the 1/5/15-minute load averages and the cores; a warning when the machine is loaded."""
    one, five, fifteen = os.getloadavg()
    n = cores()
    line = f"load average at {when}: {one:.2f} {five:.2f} {fifteen:.2f} on {n} cores"
    if one > LOADED_FRACTION * n:
        line += (
            f"\nWARNING: loaded machine (load {one:.2f} > {LOADED_FRACTION:g} x {n} cores): numbers are not comparable"
        )
    return line


def interleave(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every side once per round, in the given order, ``rounds`` times; each call returns its seconds."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, run in sides.items():
            s = run()
            seconds[name].append(s)
            print(f"  round {r + 1}/{rounds}  {name:<34} {s:8.2f} s", flush=True)
    return seconds


def min_median(values: Sequence[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)
