"""Ratios, never bare times: each figure times a subject against a baseline in the same run.

A repeat times both sides back to back, in alternating order, so load from other processes
on a 2-core machine falls on both; the figure is the median ratio over repeats, with its
min and max.
"""

from __future__ import annotations

import contextlib
import gc
import json
import operator
import os
import platform
import sys
import timeit
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

# A side of a comparison runs n operations and returns the seconds they took, so a side can
# keep its set-up (a batch of ivshmem peers leaving, say) out of its own timing.
Side = Callable[[int], float]

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


@dataclass(slots=True, frozen=True)
class Target:
    op: str
    value: float
    unit: str = "x"

    def met(self, value: float) -> bool:
        return _OPS[self.op](value, self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}{'' if self.unit == 'x' else ' '}{self.unit}"


@dataclass(slots=True)
class Figure:
    """One row of the table. `samples` are the per-repeat ratios; where the issue's target is
    absolute (the suite's wall time), `measured` holds the seconds it is checked against."""

    number: str
    title: str
    subject: str
    baseline: str
    samples: list[float]
    target: Target | None = None
    measured: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float:
        return _median(self.samples)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(_median(self.measured) if self.measured else self.ratio)

    def as_json(self) -> dict:
        out = asdict(self)
        out["ratio"] = {"median": self.ratio, "min": min(self.samples), "max": max(self.samples)}
        out["target"] = None if self.target is None else str(self.target)
        out["met"] = self.met
        return out


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def loop(stmt: str, **names) -> Side:
    """A side that runs `stmt` n times inside timeit's loop, with `names` as its globals: the
    statement is compiled into the loop, so no call wraps an operation on either side."""
    return timeit.Timer(stmt, globals=names).timeit


def compare(subject: Side, baseline: Side, n: int, repeats: int, *, rate: bool = False) -> list[float]:
    """Per-repeat ratios of cost (subject / baseline), or of rate (baseline / subject's time).

    Both sides run once untimed first (imports, caches, lazily built views); the collector is
    held off while a side runs, so a collection lands in neither."""
    subject(max(1, n // 10))
    baseline(max(1, n // 10))
    ratios = []
    for r in range(repeats):
        order = (subject, baseline) if r % 2 == 0 else (baseline, subject)
        took = {}
        for side in order:
            gc.collect()
            gc.disable()
            try:
                took[side] = side(n)
            finally:
                gc.enable()
        s, b = took[subject], took[baseline]
        ratios.append(b / s if rate else s / b)
    return ratios


@contextlib.contextmanager
def one_cpu() -> Iterator[int]:
    """Pins this process, and the processes it forks, to one CPU for a ping-pong between
    processes. Left to the scheduler, a hand-off lands on an idle or a busy CPU by chance, and
    figure 1's per-repeat ratio ranged from 0.2 to 12 on this 2-CPU machine; on one CPU every
    hand-off is one context switch, and the ratio's spread is a few percent."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def machine() -> dict:
    """What the figures were measured under: the load averages before and after matter most."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "loadavg": list(os.getloadavg()),
        "kernel": platform.release(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(figures: list[Figure]) -> str:
    rows = [("#", "figure", "ratio", "min", "max", "target", "met")]
    for f in figures:
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        target = str(f.target) if f.target else "reported"
        if f.measured:
            target += f" (median {_median(f.measured):.3g} {f.target.unit})"
        rows.append((f.number, f.title, f"{f.ratio:.3g}x", f"{min(f.samples):.3g}", f"{max(f.samples):.3g}",
                     target, met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{f.number}: {f.subject} vs {f.baseline}" + (f"; {f.note}" if f.note else "") for f in figures]
    return "\n".join(lines + [""] + notes)


def write_json(path: str, figures: list[Figure], before: dict, scale: str) -> None:
    doc = {"scale": scale, "machine": before, "loadavg_after": list(os.getloadavg()),
           "figures": [f.as_json() for f in figures]}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        json.dump(doc, out, indent=2)
        out.write("\n")
