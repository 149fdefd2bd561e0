"""Figures 5 and 6: the fake type1 IOMMU.

5: a translation (a 4-byte DMA read at a random mapped IOVA) among many mappings against the
   same among few, which is how O(log n) shows; then unmapping and mapping back one page at
   the same sizes, reported with the rate at the larger.
6: a bulk DMA by an emulated function (PciFunction.dma_read/dma_write through vfio-pci and
   the IOMMU into guest RAM) against a memoryview slice copy of the same size.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import random
import time
from itertools import cycle

from fakekernel.iommu import Type1IOMMU
from vfio_impl.vmm.machine import Machine

from .fake import EDU, attached, bus_master
from .harness import Figure, Target, compare, loop
from .scale import Scale

PAGE = mmap.PAGESIZE
SEED = 9
RAM_GPA = 1 << 30
# (figure, what, writable, which half of an unmap-and-map-back): a writable mapping also checks
# the process's maps for write permission, as pinning with FOLL_WRITE does.
REMAPS = (("5m-ro", "map (read-only)", False, "map"), ("5m-rw", "map (read-write)", True, "map"),
          ("5u", "unmap", True, "unmap"))


@contextlib.contextmanager
def _page():
    """One page of memory and its address; every mapping points at it, as type1 allows."""
    memory = mmap.mmap(-1, PAGE)
    anchor = ctypes.c_char.from_buffer(memory)
    try:
        yield ctypes.addressof(anchor)
    finally:
        del anchor
        memory.close()


def _filled(count: int, vaddr: int) -> Type1IOMMU:
    """count read-only one-page mappings on every other page of IOVA space."""
    iommu = Type1IOMMU(dma_entry_limit=count + 1)
    for i in range(count):
        iommu.map(2 * i * PAGE, PAGE, vaddr, True, False)
    return iommu


def _remap(iommu: Type1IOMMU, iovas: list[int], vaddr: int, writable: bool, times: dict):
    """Unmap a page and map it back, so the count holds; the two halves are timed apart."""
    def run(n: int) -> float:
        unmap_s = map_s = 0.0
        for iova in iovas[:n]:
            t0 = time.perf_counter()
            iommu.unmap(iova, PAGE)
            t1 = time.perf_counter()
            iommu.map(iova, PAGE, vaddr, True, writable)
            map_s += time.perf_counter() - t1
            unmap_s += t1 - t0
        times.setdefault("map", []).append(map_s / n)
        times.setdefault("unmap", []).append(unmap_s / n)
        return map_s + unmap_s
    return run


def figure_5(scale: Scale) -> list[Figure]:
    few, many = scale.mappings
    rnd = random.Random(SEED)
    with _page() as vaddr:
        small, large = _filled(few, vaddr), _filled(many, vaddr)
        picks = [[2 * rnd.randrange(len(io)) * PAGE for _ in range(scale.ops)] for io in (small, large)]
        figures = [Figure("5", f"IOMMU translate, {many:,} mappings vs {few:,}",
                          f"a 4-byte dma_read at a random IOVA among {many:,} mappings", f"the same among {few:,}",
                          compare(loop("dma_read(next(iovas), 4)", dma_read=large.dma_read, iovas=cycle(picks[1])),
                                  loop("dma_read(next(iovas), 4)", dma_read=small.dma_read, iovas=cycle(picks[0])),
                                  scale.ops, scale.repeats), Target("<=", 3))]
        remaps = max(1, scale.ops // 100)
        times = {}
        for writable in (False, True):
            times[writable] = ({}, {})
            compare(_remap(large, picks[1], vaddr, writable, times[writable][1]),
                    _remap(small, picks[0], vaddr, writable, times[writable][0]), remaps, scale.repeats)
        for number, what, writable, op in REMAPS:
            # Each list starts with compare's untimed warm-up run.
            at_few, at_many = (side[op][1:] for side in times[writable])
            rate = 1 / sorted(at_many)[len(at_many) // 2]
            figures.append(Figure(number, f"IOMMU {what}, {many:,} mappings vs {few:,}",
                                  f"{what} of one page among {many:,} mappings", f"the same among {few:,}",
                                  [m / f for m, f in zip(at_many, at_few)],
                                  note=f"{rate:,.0f} {op}s/s among {many:,}"))
    return figures


def figure_6(scale: Scale) -> list[Figure]:
    size = scale.dma_bytes
    source, target = mmap.mmap(-1, size), bytearray(size)
    src, dst = memoryview(source), memoryview(target)
    data = bytes(size)
    with attached(EDU, Machine()) as (kernel, device):
        device.space.machine.add_ram(RAM_GPA, size)
        bus_master(device)
        edu = kernel.functions[EDU]

        copy = loop("dst[:] = src", dst=dst, src=src)
        reads = compare(loop("dma_read(RAM_GPA, size)", dma_read=edu.dma_read, RAM_GPA=RAM_GPA, size=size), copy,
                        scale.ops // 1000 or 1, scale.repeats, rate=True)
        writes = compare(loop("dma_write(RAM_GPA, data)", dma_write=edu.dma_write, RAM_GPA=RAM_GPA, data=data), copy,
                         scale.ops // 1000 or 1, scale.repeats, rate=True)
    src.release()
    dst.release()
    source.close()
    kib = f"{size // 1024} KiB"
    helper = "PciFunction.dma_{} (edu's) of {} {} guest RAM through vfio-pci and the IOMMU"
    return [Figure("6r", "device DMA read bandwidth", helper.format("read", kib, "from"),
                   f"a memoryview slice copy of {kib}", reads, Target(">=", 0.5)),
            Figure("6w", "device DMA write bandwidth", helper.format("write", kib, "into"),
                   f"a memoryview slice copy of {kib}", writes, Target(">=", 0.5))]
