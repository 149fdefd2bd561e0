"""How much each run measures: the full run behind the README's figures, a quicker one for
development, and a smoke scale that only proves every figure executes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Scale:
    name: str
    repeats: int
    ops: int            # operations per side and repeat, for the per-call figures
    pings: int          # interrupt round trips per side and repeat
    ping_repeats: int   # more of them: a hand-off between processes on 2 CPUs is noisy, and cheap
    mappings: tuple[int, int]   # (few, many) IOMMU mappings for figure 5
    dma_bytes: int      # one bulk DMA transfer, figure 6
    peers: int          # ivshmem peers joining, figure 7
    suite_runs: int     # conformance suite runs, figure 8 (0: not run)
    vm: bool            # figure 9 boots the real-runner VM


FULL = Scale("full", repeats=11, ops=100_000, pings=5_000, ping_repeats=33, mappings=(10_000, 1_000_000),
             dma_bytes=1 << 20, peers=1000, suite_runs=3, vm=True)
QUICK = Scale("quick", repeats=5, ops=20_000, pings=1_000, ping_repeats=9, mappings=(10_000, 1_000_000),
              dma_bytes=1 << 20, peers=200, suite_runs=1, vm=True)
SMOKE = Scale("smoke", repeats=1, ops=20, pings=5, ping_repeats=1, mappings=(10, 100), dma_bytes=1 << 16, peers=3,
              suite_runs=0, vm=False)
SCALES = {s.name: s for s in (FULL, QUICK, SMOKE)}
