"""Figures 3 and 4: 32-bit register accesses through vfio_impl's Region, mapped and trapped.

3: the mmap fast path on ivshmem's RAM BAR against a raw memoryview of the same pages: through
   a Register handle (3r/3w), by address through Region (3ar/3aw), and a method that does
   nothing but index the view (3f), what any Python call with arguments in front of it costs.
4: the trapped path (pread/pwrite): what vfio_impl adds to the syscall under it. On Linux it
   runs over RealHost with a memfd standing in for the device fd, against os.pread/os.pwrite
   on that fd; on the fake it reaches edu's registers, against FakeKernel.pread/pwrite of the
   same register (4fr/4fw). 4kr/4kw put that fake syscall against the real one: what a test
   pays for a register the fake emulates.
"""

from __future__ import annotations

import mmap
import os
from types import SimpleNamespace

from vfio_impl import uapi
from vfio_impl.core.host import RealHost
from vfio_impl.core.region import Region, RegionInfo

from .fake import EDU, IVSHMEM, attached, memfd
from .harness import Figure, Side, Target, compare, loop
from .scale import Scale

ADDR = 0x40
VALUE = 0x12345678
EDU_ID, EDU_LIVENESS = 0x00, 0x04
READ_WRITE = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE


class _Floor:
    """The least a method in front of the view can do: index it, with no check at all."""

    def __init__(self, words):
        self.words = {4: words}

    def read(self, addr: int, size: int) -> int:
        return self.words[size][addr // size]


def figure_3(scale: Scale) -> list[Figure]:
    with attached(IVSHMEM) as (kernel, device):
        bar2 = device.region(2)
        bar2.mmap()
        register = bar2.register(ADDR)
        raw = kernel.mmap(device.fd, mmap.PAGESIZE, bar2.info.offset)
        words = memoryview(raw).cast("I")
        try:
            view_read = loop("words[i]", words=words, i=ADDR // 4)
            view_write = loop("words[i] = VALUE", words=words, i=ADDR // 4, VALUE=VALUE)
            reads = compare(loop("register.read()", register=register), view_read, scale.ops, scale.repeats)
            writes = compare(loop("register.write(VALUE)", register=register, VALUE=VALUE), view_write,
                             scale.ops, scale.repeats)
            any_reads = compare(loop("read(ADDR, 4)", read=bar2.read, ADDR=ADDR), view_read, scale.ops, scale.repeats)
            any_writes = compare(loop("write(ADDR, VALUE, 4)", write=bar2.write, ADDR=ADDR, VALUE=VALUE), view_write,
                                 scale.ops, scale.repeats)
            floor = compare(loop("read(ADDR, 4)", read=_Floor(words).read, ADDR=ADDR), view_read,
                            scale.ops, scale.repeats)
        finally:
            words.release()
            raw.close()
            bar2.munmap()
    baseline = "a memoryview cast 'I' of the same pages"
    handle = "Register.{} of ivshmem BAR2+0x40, mmapped (Region.register(0x40))"
    any_addr = "Region.{} of ivshmem BAR2+0x40, mmapped, every check made per access"
    return [Figure("3r", "mmapped 32-bit read through vfio_impl", handle.format("read()"), baseline, reads,
                   Target("<=", 3)),
            Figure("3w", "mmapped 32-bit write through vfio_impl", handle.format("write(value)"), baseline, writes,
                   Target("<=", 3)),
            Figure("3ar", "the same read by address", any_addr.format("read(addr, 4)"), baseline, any_reads,
                   note="no handle: area, alignment and switch looked up on each access"),
            Figure("3aw", "the same write by address", any_addr.format("write(addr, value, 4)"), baseline, any_writes,
                   note="no handle: area, alignment and switch looked up on each access"),
            Figure("3f", "a bare Python method indexing the view", "read(addr, size) returning "
                   "words[size][addr // size], no check", baseline, floor, note="the floor under 3ar and 3aw")]


def figure_4(scale: Scale) -> list[Figure]:
    fd = memfd(mmap.PAGESIZE)
    try:
        device = SimpleNamespace(host=RealHost(), fd=fd, name="memfd")
        region = Region(device, RegionInfo(0, READ_WRITE, mmap.PAGESIZE, 0, ()))
        value = VALUE.to_bytes(4, "little")
        pread = loop("pread(fd, 4, ADDR)", pread=os.pread, fd=fd, ADDR=ADDR)
        pwrite = loop("pwrite(fd, DATA, ADDR)", pwrite=os.pwrite, fd=fd, DATA=value, ADDR=ADDR)

        def trapped(region: Region, read_at: int, write_at: int, raw_read: Side, raw_write: Side):
            return (compare(loop("read(at, 4)", read=region.read, at=read_at), raw_read, scale.ops, scale.repeats),
                    compare(loop("write(at, VALUE, 4)", write=region.write, at=write_at, VALUE=VALUE), raw_write,
                            scale.ops, scale.repeats))

        real = trapped(region, ADDR, ADDR, pread, pwrite)
        with attached(EDU) as (kernel, edu):
            bar0 = edu.region(0)
            fake_pread = loop("pread(fd, 4, at)", pread=kernel.pread, fd=edu.fd, at=bar0.info.offset + EDU_ID)
            fake_pwrite = loop("pwrite(fd, DATA, at)", pwrite=kernel.pwrite, fd=edu.fd, DATA=value,
                               at=bar0.info.offset + EDU_LIVENESS)
            fake = trapped(bar0, EDU_ID, EDU_LIVENESS, fake_pread, fake_pwrite)
            kernel_cost = (compare(fake_pread, pread, scale.ops, scale.repeats),
                           compare(fake_pwrite, pwrite, scale.ops, scale.repeats))
    finally:
        os.close(fd)
    linux = "Region.{} over RealHost, a memfd as the device fd"
    on_fake = "Region.{} of edu's BAR0 register on the fake (no mmap)"
    kernel_side = "FakeKernel.{} of edu's BAR0 register: the fake's syscall and edu's emulation"
    return [Figure("4r", "trapped 32-bit read, vfio_impl on Linux", linux.format("read"), "os.pread of 4 bytes",
                   real[0], Target("<=", 2)),
            Figure("4w", "trapped 32-bit write, vfio_impl on Linux", linux.format("write"), "os.pwrite of 4 bytes",
                   real[1], Target("<=", 2)),
            Figure("4fr", "trapped 32-bit read, vfio_impl on the fake", on_fake.format("read"),
                   "FakeKernel.pread of the same register", fake[0], Target("<=", 2)),
            Figure("4fw", "trapped 32-bit write, vfio_impl on the fake", on_fake.format("write"),
                   "FakeKernel.pwrite of the same register", fake[1], Target("<=", 2)),
            Figure("4kr", "the fake's pread of a register vs a syscall", kernel_side.format("pread"),
                   "os.pread of 4 bytes of a memfd", kernel_cost[0], note="4fr x 4kr is the whole read against os.pread"),
            Figure("4kw", "the fake's pwrite of a register vs a syscall", kernel_side.format("pwrite"),
                   "os.pwrite of 4 bytes of a memfd", kernel_cost[1], note="4fw x 4kw is the whole write against os.pwrite")]
