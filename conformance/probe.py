"""The probe: a fixed script of raw VFIO calls, recorded once on a real kernel and replayed on
the fake, which must give the same answer to every call.

Conformance tests state what a driver may rely on; the probe pins down everything else the
kernel says, misuse included, so the fake cannot drift from Linux unnoticed.

    python3 -m conformance.probe record OUT.json [BDF...]   # on Linux with devices on vfio-pci
    python3 -m conformance.probe compare RECORDING.json     # replays on FakeKernel('vm') with
                                                            # the profile of the recording's kernel

Each answer is {"ok": value} or {"errno": "ENAME"}. Nothing timing-dependent is recorded.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import select
import struct
import sys
import time
from typing import TYPE_CHECKING

from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.core.pciaddr import parse_host

from .backends import describe, fake_kernel, is_ccw_name, vfio_bound
from .probe_ccw import CcwScript, fake_topology
from .probe_ccw import known as known_ccw
from .probe_platform import PlatformScript
from .probe_platform import known as known_platform
from .raw import RawSession

if TYPE_CHECKING:
    from fakekernel.profile import Profile

CFG = uapi.VFIO_PCI_CONFIG_REGION_INDEX
INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
ERR, REQ = uapi.VFIO_PCI_ERR_IRQ_INDEX, uapi.VFIO_PCI_REQ_IRQ_INDEX
TRIGGER, MASK, UNMASK = (uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_MASK,
                         uapi.VFIO_IRQ_SET_ACTION_UNMASK)
NONE, BOOL, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_BOOL, uapi.VFIO_IRQ_SET_DATA_EVENTFD
RW = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE
TYPE1, TYPE1v2 = uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class Pages:
    """Anonymous memory at a known address, for MAP_DMA; munmap of a part makes a hole."""

    def __init__(self, count: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE):
        self.size = count * PAGE
        self.addr = _libc.mmap(None, self.size, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if self.addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.view = (ctypes.c_char * self.size).from_address(self.addr) if prot & mmap.PROT_WRITE else None

    def release(self, offset: int = 0, size: int | None = None) -> None:
        _libc.munmap(self.addr + offset, self.size - offset if size is None else size)


class Probe:
    def __init__(self, host, bdfs: list[str], settle: float):
        self.host = host
        self.devices = [describe(host, b) for b in bdfs]
        self.settle = settle
        self.answers: dict[str, dict] = {}
        self.session = RawSession(host, None)
        self.track = self.session.track
        self.eventfd = self.session.eventfd
        self._pages: list[Pages] = []

    # -- recording ------------------------------------------------------------------------------
    def rec(self, key: str, fn):
        try:
            answer = {"ok": fn()}
        except OSError as e:
            answer = {"errno": errno.errorcode.get(e.errno, str(e.errno))}
        self.answers[key] = json.loads(json.dumps(answer))
        return answer

    def pages(self, count: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> Pages:
        p = Pages(count, prot)
        self._pages.append(p)
        return p

    def close(self) -> None:
        self.session.close()
        for p in self._pages:
            p.release()

    # -- raw calls ------------------------------------------------------------------------------
    def ioctl(self, fd, request, arg=0):
        return self.host.ioctl(fd, request, arg)

    def open(self, path: str) -> int:
        return self.track(self.host.open(path, os.O_RDWR))

    def status(self, group: int) -> int:
        buf = uapi.vfio_group_status.pack()
        self.ioctl(group, uapi.VFIO_GROUP_GET_STATUS, buf)
        return uapi.vfio_group_status.unpack(buf).flags

    def set_container(self, group: int, container: int):
        return self.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))

    def get_device(self, group: int, name: str) -> int:
        return self.track(self.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0")))

    def device_info(self, fd: int, argsz: int) -> dict:
        layout = uapi.vfio_device_info
        buf = bytearray(max(argsz, layout.size) + 64)
        layout.pack_into(buf, 0, argsz=argsz)
        ret = self.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, buf)
        info = layout.unpack(buf)
        return dict(ret=ret, argsz=info.argsz, flags=info.flags, num_regions=info.num_regions,
                    num_irqs=info.num_irqs, cap_offset=info.cap_offset)

    def region(self, fd: int, index: int, argsz: int = 32) -> dict:
        layout = uapi.vfio_region_info
        buf = bytearray(max(argsz, layout.size))
        layout.pack_into(buf, 0, argsz=argsz, index=index)
        self.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
        info = layout.unpack(buf)
        out = dict(argsz=info.argsz, flags=info.flags, cap_offset=info.cap_offset, size=info.size,
                   offset=hex(info.offset))
        if info.cap_offset and argsz > layout.size:
            out["caps_hex"] = bytes(buf[info.cap_offset:min(info.argsz, argsz)]).hex().rstrip("0")
        return out

    def region_place(self, fd: int, index: int) -> tuple[int, int]:
        buf = uapi.vfio_region_info.pack(index=index)
        self.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
        info = uapi.vfio_region_info.unpack(buf)
        return info.size, info.offset

    def irq_info(self, fd: int, index: int, argsz: int = 16) -> dict:
        layout = uapi.vfio_irq_info
        buf = bytearray(max(argsz, layout.size))
        layout.pack_into(buf, 0, argsz=argsz, index=index)
        self.ioctl(fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf)
        info = layout.unpack(buf)
        return dict(argsz=info.argsz, flags=info.flags, count=info.count)

    def set_irqs(self, fd: int, flags: int, index: int, start: int, count: int, data: bytes = b"",
                 argsz: int | None = None):
        buf = irq.irq_set(index, start, count, flags, data)
        if argsz is not None:
            uapi.vfio_irq_set.pack_into(buf, 0, argsz=argsz, flags=flags, index=index, start=start, count=count)
        return self.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, buf)

    def fired(self, efd: int, wait: bool = False) -> int:
        """Waits only where Linux is asynchronous, and only as long as the backend needs."""
        if wait and self.settle:
            select.select([efd], [], [], self.settle)
        return self.host.eventfd_read(efd)

    def iommu_info(self, container: int, argsz: int) -> dict:
        layout = uapi.vfio_iommu_type1_info
        buf = bytearray(max(argsz, layout.size))
        layout.pack_into(buf, 0, argsz=argsz)
        self.ioctl(container, uapi.VFIO_IOMMU_GET_INFO, buf)
        info = layout.unpack(buf)
        out = dict(argsz=info.argsz, flags=info.flags, iova_pgsizes=hex(info.iova_pgsizes), cap_offset=info.cap_offset)
        if argsz >= layout.size and info.cap_offset:
            out["caps_hex"] = bytes(buf[info.cap_offset:min(info.argsz, argsz)]).hex().rstrip("0")
        return out

    def map_dma(self, container: int, iova: int, size: int, vaddr: int, flags: int = RW, argsz: int = 32):
        buf = uapi.vfio_iommu_type1_dma_map.pack(argsz=argsz, flags=flags, vaddr=vaddr, iova=iova, size=size)
        return self.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, buf)

    def unmap_dma(self, container: int, iova: int, size: int, flags: int = 0, argsz: int = 24) -> dict:
        layout = uapi.vfio_iommu_type1_dma_unmap
        buf = bytearray(max(argsz, layout.size))
        layout.pack_into(buf, 0, argsz=argsz, flags=flags, iova=iova, size=size)
        self.ioctl(container, uapi.VFIO_IOMMU_UNMAP_DMA, buf)
        return dict(size_returned=hex(layout.unpack(buf).size))

    def hot_reset_info(self, fd: int, argsz: int) -> dict:
        head, dep = uapi.vfio_pci_hot_reset_info, uapi.vfio_pci_dependent_device
        buf = bytearray(max(argsz, head.size))
        head.pack_into(buf, 0, argsz=argsz)
        try:
            self.ioctl(fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
            result = "ok"
        except OSError as e:
            result = errno.errorcode[e.errno]
        info = head.unpack(buf)
        devices = []
        if result == "ok":
            for i in range(info.count):
                d = dep.unpack(buf, head.size + i * dep.size)
                devices.append(dict(group=d.group_id, seg=d.segment, bus=d.bus, devfn=hex(d.devfn)))
        return dict(result=result, argsz=info.argsz, flags=info.flags, count=info.count, devices=devices)

    # -- the script -----------------------------------------------------------------------------
    def find(self, model: str):
        return next((d for d in self.devices if d.model == model), None)

    def run(self) -> dict:
        try:
            self.answers["devices"] = {"ok": {d.bdf: d.model for d in self.devices}}
            platform, ccw = known_platform(self.devices), known_ccw(self.devices)
            if platform:
                PlatformScript(self, platform).run()
            if ccw:
                CcwScript(self, ccw).run()
            if not (platform or ccw) or any(d.bus == "pci" for d in self.devices):
                self.pci_script()
        finally:
            self.close()
        return self.answers

    def pci_script(self) -> None:
        """The vfio-pci and type1 script, around an edu device."""
        edu = self.find("edu")
        if edu is None:
            raise SystemExit("probe: needs an edu device bound to vfio-pci")
        c, g, d = self.container_and_group(edu)
        fds = {edu.bdf: d}
        groups = {edu.bdf: g}
        for dev in self.devices:
            if dev is not edu:
                groups[dev.bdf], fds[dev.bdf] = self.join(c, dev)
        for dev in self.devices:
            self.device_regions(dev.bdf, fds[dev.bdf])
        self.edu_set_irqs(d)
        self.edu_interrupts(d)
        self.type1(c)
        self.edu_dma(c, d)
        self.resets(fds)
        self.teardown(c, g, fds, groups)
        self.type1_v1(g, edu)
        e1000e = self.find("e1000e")
        if e1000e:
            self.e1000e_msix(groups[e1000e.bdf], e1000e.bdf)

    def container_and_group(self, edu):
        rec, ioctl = self.rec, self.ioctl
        c = self.open("/dev/vfio/vfio")
        rec("container.GET_API_VERSION", lambda: ioctl(c, uapi.VFIO_GET_API_VERSION))
        self.extensions(c, "before SET_IOMMU")
        rec("container.SET_IOMMU(TYPE1v2) with no group", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))
        rec("container.IOMMU_GET_INFO before SET_IOMMU", lambda: self.iommu_info(c, 24))
        rec("container.MAP_DMA before SET_IOMMU", lambda: self.map_dma(c, 0, PAGE, 0))
        rec("container unknown ioctl nr 50 before SET_IOMMU", lambda: ioctl(c, uapi.VFIO_GET_API_VERSION + 50))
        g = self.open(f"/dev/vfio/{edu.group}")
        rec("group.GET_STATUS flags initially", lambda: self.status(g))
        rec("group.GET_STATUS argsz=4",
            lambda: ioctl(g, uapi.VFIO_GROUP_GET_STATUS, uapi.vfio_group_status.pack(argsz=4)))
        rec("group open twice", lambda: self.open(f"/dev/vfio/{edu.group}") and "opened")
        rec("group.GET_DEVICE_FD before SET_CONTAINER", lambda: self.get_device(g, edu.bdf) and "fd")
        rec("group.UNSET_CONTAINER when not set", lambda: ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER))
        devnull = self.track(os.open("/dev/null", os.O_RDWR))
        rec("group.SET_CONTAINER(fd of /dev/null)", lambda: self.set_container(g, devnull))
        rec("group.SET_CONTAINER(-1)", lambda: self.set_container(g, -1))
        rec("group.SET_CONTAINER", lambda: self.set_container(g, c))
        rec("group.GET_STATUS flags after SET_CONTAINER", lambda: self.status(g))
        rec("group.SET_CONTAINER again (same container)", lambda: self.set_container(g, c))
        c2 = self.open("/dev/vfio/vfio")
        rec("group.SET_CONTAINER again (other container)", lambda: self.set_container(g, c2))
        rec("group.GET_DEVICE_FD before SET_IOMMU", lambda: self.get_device(g, edu.bdf) and "fd")
        rec("container.IOMMU_GET_INFO after group attached, before SET_IOMMU", lambda: self.iommu_info(c, 24))
        self.extensions(c, "group attached, before SET_IOMMU")
        rec("container.SET_IOMMU(99) invalid type", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, 99))
        rec("container.SET_IOMMU(2 SPAPR)", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU))
        rec("container.SET_IOMMU(8 NOIOMMU)", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_NOIOMMU_IOMMU))
        rec("container.SET_IOMMU(3 TYPE1v2)", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))
        rec("container.SET_IOMMU(3) twice", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))
        rec("container.SET_IOMMU(1) after v2", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1))
        rec("group.GET_STATUS flags after SET_IOMMU", lambda: self.status(g))
        self.extensions(c, "after SET_IOMMU")
        rec("container.GET_API_VERSION after SET_IOMMU", lambda: ioctl(c, uapi.VFIO_GET_API_VERSION))
        rec("group.GET_DEVICE_FD bad name", lambda: self.get_device(g, "0000:00:1f.0") and "fd")
        rec("group.GET_DEVICE_FD empty name", lambda: self.get_device(g, "") and "fd")
        rec("group.GET_DEVICE_FD name w/o domain", lambda: self.get_device(g, edu.bdf[5:]) and "fd")
        d = self.get_device(g, edu.bdf)
        second: list[int] = []
        rec("group.GET_DEVICE_FD right name second time (while open)",
            lambda: second.append(self.get_device(g, edu.bdf)) or "fd")
        for fd in second:
            self.session.close_fd(fd)
        rec("group.UNSET_CONTAINER while device fd open", lambda: ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER))
        rec("device fd: container ioctl GET_API_VERSION on device fd", lambda: ioctl(d, uapi.VFIO_GET_API_VERSION))
        rec("group fd: DEVICE_GET_INFO on group fd",
            lambda: ioctl(g, uapi.VFIO_DEVICE_GET_INFO, uapi.vfio_device_info.pack()))
        return c, g, d

    def extensions(self, c: int, when: str) -> None:
        for ext in range(12):
            self.rec(f"container.CHECK_EXTENSION({ext}) {when}",
                     lambda ext=ext: self.ioctl(c, uapi.VFIO_CHECK_EXTENSION, ext))

    def join(self, c: int, dev) -> tuple[int, int]:
        p = f"{dev.bdf} "
        g = self.open(f"/dev/vfio/{dev.group}")
        self.rec(p + "group.GET_STATUS initially", lambda: self.status(g))
        self.rec(p + "group.SET_CONTAINER into container with iommu set", lambda: self.set_container(g, c))
        self.rec(p + "group.GET_STATUS after", lambda: self.status(g))
        return g, self.get_device(g, dev.bdf)

    def device_regions(self, bdf: str, fd: int) -> None:
        rec, host, p = self.rec, self.host, f"{bdf} "
        info = rec(p + "DEVICE_GET_INFO argsz=20", lambda: self.device_info(fd, 20))["ok"]
        for argsz in (16, 256, 12):
            rec(p + f"DEVICE_GET_INFO argsz={argsz}", lambda argsz=argsz: self.device_info(fd, argsz))
        for i in range(info["num_regions"] + 1):
            for argsz in (32, 256):
                rec(p + f"REGION_INFO[{i}] argsz={argsz}", lambda i=i, argsz=argsz: self.region(fd, i, argsz))
        rec(p + "REGION_INFO[0] argsz=16 (too small)", lambda: self.region(fd, 0, 16))
        rec(p + "REGION_INFO[0xffffffff]", lambda: self.region(fd, 0xFFFFFFFF))
        for i in range(info["num_irqs"] + 2):
            rec(p + f"IRQ_INFO[{i}]", lambda i=i: self.irq_info(fd, i))
        rec(p + "IRQ_INFO[0] argsz=12 (too small)", lambda: self.irq_info(fd, 0, 12))
        rec(p + "IRQ_INFO[0] argsz=64", lambda: self.irq_info(fd, 0, 64))
        csize, coff = self.region_place(fd, CFG)
        rec(p + "config pread full", lambda: host.pread(fd, csize, coff).hex())
        rec(p + "config pread at 0x100 (4 bytes)", lambda: host.pread(fd, 4, coff + 0x100).hex())
        rec(p + "config pread at size-2, 4 bytes", lambda: host.pread(fd, 4, coff + csize - 2).hex())
        rec(p + "config pread 3 bytes at 0x1", lambda: host.pread(fd, 3, coff + 1).hex())
        rec(p + "BAR sizing via config (LE value as hex)", lambda: self.bar_sizing(fd, coff))
        rec(p + "config write vendor id (0x0) then read",
            lambda: (host.pwrite(fd, b"\0\0", coff), host.pread(fd, 2, coff)[::-1].hex())[1])
        bsize, boff = self.region_place(fd, 0)
        rec(p + "BAR0 pread at offset == size", lambda: host.pread(fd, 4, boff + bsize).hex())
        rec(p + "BAR0 pread at size-2 (4 bytes)", lambda: host.pread(fd, 4, boff + bsize - 2).hex())
        rec(p + "pread at region index 9 offset 0", lambda: host.pread(fd, 4, 9 << 40).hex())
        rec(p + "pread at region index 6 (ROM) offset 0", lambda: host.pread(fd, 4, 6 << 40).hex())
        rec(p + "mmap BAR0", lambda: self.mmap_ok(fd, min(bsize, PAGE), boff))
        rec(p + "mmap config", lambda: self.mmap_ok(fd, PAGE, coff, mmap.PROT_READ))
        rec(p + "mmap ROM", lambda: self.mmap_ok(fd, PAGE, 6 << 40, mmap.PROT_READ))
        rec(p + "mmap BAR0 length > size", lambda: self.mmap_ok(fd, bsize + PAGE, boff, mmap.PROT_READ))
        for argsz in (8, 12, 76):
            rec(p + f"GET_PCI_HOT_RESET_INFO argsz={argsz}", lambda argsz=argsz: self.hot_reset_info(fd, argsz))

    def mmap_ok(self, fd: int, length: int, offset: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> str:
        self.host.mmap(fd, length, offset, prot).close()
        return "ok"

    def bar_sizing(self, fd: int, coff: int) -> dict:
        host, out = self.host, {}
        for name, at, ones in [(f"bar{i}", 0x10 + 4 * i, b"\xff\xff\xff\xff") for i in range(6)] + \
                              [("rom", 0x30, b"\xfe\xff\xff\xff")]:
            orig = host.pread(fd, 4, coff + at)
            host.pwrite(fd, ones, coff + at)
            sized = host.pread(fd, 4, coff + at)
            host.pwrite(fd, orig, coff + at)
            out[name] = dict(orig=orig[::-1].hex(), sized=sized[::-1].hex(),
                             restored=host.pread(fd, 4, coff + at)[::-1].hex())
        return out

    def edu_set_irqs(self, d: int) -> None:
        rec, s, p = self.rec, self.set_irqs, "edu SET_IRQS "

        def efds(*fds):
            return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)

        rec(p + "argsz=16 (too small)", lambda: s(d, NONE | TRIGGER, INTX, 0, 0, argsz=16))
        rec(p + "unknown flag bit 6", lambda: s(d, NONE | TRIGGER | (1 << 6), INTX, 0, 0))
        rec(p + "two DATA types", lambda: s(d, NONE | BOOL | TRIGGER, INTX, 0, 1, b"\x01"))
        rec(p + "two ACTION types", lambda: s(d, NONE | MASK | UNMASK, INTX, 0, 1))
        rec(p + "no DATA type", lambda: s(d, TRIGGER, INTX, 0, 0))
        rec(p + "no ACTION type", lambda: s(d, NONE, INTX, 0, 0))
        rec(p + "index 5", lambda: s(d, NONE | TRIGGER, 5, 0, 0))
        rec(p + "index 9", lambda: s(d, NONE | TRIGGER, 9, 0, 0))
        rec(p + "INTx start=0 count=2", lambda: s(d, NONE | TRIGGER, INTX, 0, 2))
        rec(p + "INTx start=1 count=1", lambda: s(d, NONE | TRIGGER, INTX, 1, 1))
        rec(p + "INTx start=1 count=0", lambda: s(d, NONE | TRIGGER, INTX, 1, 0))
        rec(p + "INTx DATA_NONE TRIGGER count=0 while disabled", lambda: s(d, NONE | TRIGGER, INTX, 0, 0))
        rec(p + "INTx DATA_NONE TRIGGER count=1 while disabled (loopback)", lambda: s(d, NONE | TRIGGER, INTX, 0, 1))
        rec(p + "INTx MASK count=1 while disabled", lambda: s(d, NONE | MASK, INTX, 0, 1))
        rec(p + "INTx EVENTFD argsz short of data",
            lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(self.eventfd()), argsz=20))
        e1, e2 = self.eventfd(), self.eventfd()
        rec(p + "INTx TRIGGER EVENTFD count=1", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(e1)))
        rec(p + "INTx TRIGGER EVENTFD count=1 again (other efd)", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(e2)))
        rec(p + "INTx TRIGGER EVENTFD count=1 again (same efd)", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(e2)))
        loop_intx = (lambda: (s(d, NONE | TRIGGER, INTX, 0, 1), self.fired(e2))[1])
        rec(p + "INTx loopback DATA_NONE fires e2", loop_intx)
        rec(p + "INTx loopback did not fire e1 (old)", lambda: self.fired(e1))
        rec(p + "INTx MASK DATA_NONE count=1", lambda: s(d, NONE | MASK, INTX, 0, 1))
        rec(p + "INTx loopback while masked fires", loop_intx)
        rec(p + "INTx MASK count=2", lambda: s(d, NONE | MASK, INTX, 0, 2))
        rec(p + "INTx MASK count=0", lambda: s(d, NONE | MASK, INTX, 0, 0))
        rec(p + "INTx MASK DATA_BOOL 0", lambda: s(d, BOOL | MASK, INTX, 0, 1, b"\x00"))
        rec(p + "INTx MASK DATA_EVENTFD", lambda: s(d, EVENTFD | MASK, INTX, 0, 1, efds(self.eventfd())))
        rec(p + "INTx UNMASK DATA_NONE", lambda: s(d, NONE | UNMASK, INTX, 0, 1))
        rec(p + "INTx UNMASK DATA_EVENTFD (virqfd)", lambda: s(d, EVENTFD | UNMASK, INTX, 0, 1, efds(self.eventfd())))
        rec(p + "INTx UNMASK DATA_EVENTFD -1 (de-assign)", lambda: s(d, EVENTFD | UNMASK, INTX, 0, 1, efds(-1)))
        rec(p + "INTx UNMASK DATA_BOOL 1", lambda: s(d, BOOL | UNMASK, INTX, 0, 1, b"\x01"))
        rec(p + "INTx TRIGGER DATA_BOOL 1 (loopback) fires",
            lambda: (s(d, BOOL | TRIGGER, INTX, 0, 1, b"\x01"), self.fired(e2))[1])
        rec(p + "INTx TRIGGER DATA_BOOL 0 fires", lambda: (s(d, BOOL | TRIGGER, INTX, 0, 1, b"\x00"), self.fired(e2))[1])
        rec(p + "MSI TRIGGER EVENTFD while INTx enabled", lambda: s(d, EVENTFD | TRIGGER, MSI, 0, 1, efds(self.eventfd())))
        rec(p + "MSI DATA_NONE count=0 while INTx enabled", lambda: s(d, NONE | TRIGGER, MSI, 0, 0))
        rec(p + "INTx TRIGGER EVENTFD 12345 (bad fd)", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(12345)))
        devnull = self.track(os.open("/dev/null", os.O_RDONLY))
        rec(p + "INTx TRIGGER EVENTFD of /dev/null fd", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(devnull)))
        rec(p + "INTx still enabled after bad fd? (loopback fires e2)", loop_intx)
        rec(p + "INTx TRIGGER EVENTFD -1 (de-assign)", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(-1)))
        rec(p + "INTx loopback after -1", loop_intx)
        rec(p + "INTx disable DATA_NONE count=0", lambda: s(d, NONE | TRIGGER, INTX, 0, 0))
        rec(p + "INTx disable again", lambda: s(d, NONE | TRIGGER, INTX, 0, 0))
        m1 = self.eventfd()
        rec(p + "MSI count=2 (1 vector)", lambda: s(d, EVENTFD | TRIGGER, MSI, 0, 2, efds(m1, self.eventfd())))
        rec(p + "MSI TRIGGER 1 eventfd", lambda: s(d, EVENTFD | TRIGGER, MSI, 0, 1, efds(m1)))
        rec(p + "MSI loopback DATA_NONE fires", lambda: (s(d, NONE | TRIGGER, MSI, 0, 1), self.fired(m1))[1])
        rec(p + "MSI loopback DATA_BOOL fires", lambda: (s(d, BOOL | TRIGGER, MSI, 0, 1, b"\x01"), self.fired(m1))[1])
        rec(p + "MSI MASK", lambda: s(d, NONE | MASK, MSI, 0, 1))
        rec(p + "MSI UNMASK", lambda: s(d, NONE | UNMASK, MSI, 0, 1))
        rec(p + "INTx TRIGGER EVENTFD while MSI enabled", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(self.eventfd())))
        rec(p + "INTx MASK while MSI enabled", lambda: s(d, NONE | MASK, INTX, 0, 1))
        rec(p + "MSI TRIGGER EVENTFD -1 (de-assign vector)", lambda: s(d, EVENTFD | TRIGGER, MSI, 0, 1, efds(-1)))
        rec(p + "MSI loopback after -1", lambda: (s(d, NONE | TRIGGER, MSI, 0, 1), self.fired(m1))[1])
        rec(p + "MSI TRIGGER eventfd 12345", lambda: s(d, EVENTFD | TRIGGER, MSI, 0, 1, efds(12345)))
        rec(p + "MSI disable count=0", lambda: s(d, NONE | TRIGGER, MSI, 0, 0))
        rec(p + "MSIX TRIGGER on edu", lambda: s(d, EVENTFD | TRIGGER, MSIX, 0, 1, efds(self.eventfd())))
        rec(p + "MSIX DATA_NONE count=0 on edu", lambda: s(d, NONE | TRIGGER, MSIX, 0, 0))
        rec(p + "ERR TRIGGER on edu", lambda: s(d, EVENTFD | TRIGGER, ERR, 0, 1, efds(self.eventfd())))
        req = self.eventfd()
        rec(p + "REQ TRIGGER eventfd", lambda: s(d, EVENTFD | TRIGGER, REQ, 0, 1, efds(req)))
        rec(p + "REQ loopback DATA_NONE fires", lambda: (s(d, NONE | TRIGGER, REQ, 0, 1), self.fired(req))[1])
        rec(p + "REQ MASK", lambda: s(d, NONE | MASK, REQ, 0, 1))
        rec(p + "REQ TRIGGER -1", lambda: s(d, EVENTFD | TRIGGER, REQ, 0, 1, efds(-1)))
        rec(p + "REQ DATA_NONE count=0", lambda: s(d, NONE | TRIGGER, REQ, 0, 0))

    def edu_interrupts(self, d: int) -> None:
        """edu raising INTx and MSI itself: automask, unmask re-delivery, and what config shows."""
        rec, s, host = self.rec, self.set_irqs, self.host
        _, boff = self.region_place(d, 0)
        _, coff = self.region_place(d, CFG)

        def rd(at):
            return int.from_bytes(host.pread(d, 4, boff + at), "little")

        def wr(at, value):
            host.pwrite(d, value.to_bytes(4, "little"), boff + at)

        def config16(at):
            return hex(int.from_bytes(host.pread(d, 2, coff + at), "little"))

        def efds(fd):
            return fd.to_bytes(4, sys.byteorder, signed=True)

        def edu_mmio_ident():
            m = host.mmap(d, PAGE, boff)
            try:
                return hex(int.from_bytes(m[0:4], "little"))
            finally:
                m.close()

        def factorial():
            wr(8, 5)
            end = time.monotonic() + 5
            while rd(0x20) & 1 and time.monotonic() < end:
                pass
            return rd(8)

        def set_command():
            cmd = int(config16(4), 16)
            host.pwrite(d, ((cmd | 0x6) & ~0x400).to_bytes(2, "little"), coff + 4)
            return config16(4)

        rec("edu BAR0 pread 4 at 0", lambda: hex(rd(0)))
        rec("edu COMMAND before", lambda: config16(4))
        rec("edu mmio ident (mmap)", edu_mmio_ident)
        rec("edu liveness ~0x12345678", lambda: (wr(4, 0x12345678), hex(rd(4)))[1])
        rec("edu factorial(5)", factorial)
        rec("edu COMMAND |= MEM|BM, clear INTxDIS", set_command)
        ie = self.eventfd()
        unmask = (lambda: s(d, NONE | UNMASK, INTX, 0, 1))
        rec("edu INTx TRIGGER eventfd", lambda: s(d, EVENTFD | TRIGGER, INTX, 0, 1, efds(ie)))
        rec("edu status word (config 0x06) before irq", lambda: config16(6))
        rec("edu raise irq (0x60=1) eventfd fires", lambda: (wr(0x60, 1), self.fired(ie, True))[1])
        rec("edu irq status 0x24", lambda: hex(rd(0x24)))
        rec("edu COMMAND after irq (INTxDIS visible?)", lambda: config16(4))
        rec("edu status word (config 0x06) after irq", lambda: config16(6))
        rec("edu raise again while automasked, fires?", lambda: (wr(0x60, 2), self.fired(ie, True))[1])
        rec("edu ack 0x64", lambda: (wr(0x64, 3), hex(rd(0x24)))[1])
        rec("edu UNMASK", unmask)
        rec("edu fires after unmask (nothing pending)", lambda: self.fired(ie, True))
        rec("edu raise after unmask fires", lambda: (wr(0x60, 4), self.fired(ie, True))[1])
        rec("edu ack 2", lambda: (wr(0x64, 0xFFFFFFFF), hex(rd(0x24)))[1])
        rec("edu loopback while automasked fires", lambda: (s(d, NONE | TRIGGER, INTX, 0, 1), self.fired(ie))[1])
        rec("edu UNMASK 2", unmask)
        rec("edu loopback after unmask fires", lambda: (s(d, NONE | TRIGGER, INTX, 0, 1), self.fired(ie))[1])
        rec("edu loopback again (no unmask) fires", lambda: (s(d, NONE | TRIGGER, INTX, 0, 1), self.fired(ie))[1])
        rec("edu user MASK then raise: fires?",
            lambda: (s(d, NONE | MASK, INTX, 0, 1), wr(0x60, 8), self.fired(ie, True))[2])
        rec("edu COMMAND while user-masked", lambda: config16(4))
        rec("edu UNMASK with irq pending: fires?", lambda: (unmask(), self.fired(ie, True))[1])
        rec("edu ack 3", lambda: (wr(0x64, 0xFFFFFFFF), unmask(), hex(rd(0x24)))[2])
        me = self.eventfd()
        rec("edu INTx off, MSI on",
            lambda: (s(d, NONE | TRIGGER, INTX, 0, 0), s(d, EVENTFD | TRIGGER, MSI, 0, 1, efds(me)))[1])
        rec("edu config MSI cap bytes after MSI enable", lambda: host.pread(d, 24, coff + 0x40).hex())
        rec("edu raise irq with MSI: fires", lambda: (wr(0x60, 0x10), self.fired(me, True))[1])
        rec("edu raise again with MSI (no ack): fires", lambda: (wr(0x60, 0x20), self.fired(me, True))[1])
        rec("edu MSI off", lambda: (wr(0x64, 0xFFFFFFFF), s(d, NONE | TRIGGER, MSI, 0, 0))[1])

    def type1(self, c: int) -> None:
        rec, m, u, p = self.rec, self.map_dma, self.unmap_dma, "type1 "
        for argsz in (16, 24, 512, 12):
            rec(p + f"GET_INFO argsz={argsz}", lambda argsz=argsz: self.iommu_info(c, argsz))
        buf = self.pages(17)
        buf.release(16 * PAGE, PAGE)
        va = buf.addr
        rec(p + "MAP 1 page iova 0x200000", lambda: m(c, 0x200000, PAGE, va))
        rec(p + "MAP same iova again", lambda: m(c, 0x200000, PAGE, va))
        rec(p + "MAP same iova, same vaddr, other size", lambda: m(c, 0x200000, 2 * PAGE, va))
        rec(p + "MAP overlapping (0x1ff000, 2 pages)", lambda: m(c, 0x1FF000, 2 * PAGE, va))
        rec(p + "MAP adjacent (0x201000) same vaddr", lambda: m(c, 0x201000, PAGE, va))
        rec(p + "MAP unaligned iova", lambda: m(c, 0x300800, PAGE, va))
        rec(p + "MAP unaligned size", lambda: m(c, 0x300000, 0x800, va))
        rec(p + "MAP unaligned vaddr", lambda: m(c, 0x300000, PAGE, va + 0x800))
        rec(p + "MAP size 0", lambda: m(c, 0x300000, 0, va))
        rec(p + "MAP vaddr 0", lambda: m(c, 0x300000, PAGE, 0))
        rec(p + "MAP vaddr unmapped (0x1000)", lambda: m(c, 0x300000, PAGE, 0x1000))
        rec(p + "MAP flags 0", lambda: m(c, 0x300000, PAGE, va, flags=0))
        rec(p + "MAP flags READ only", lambda: m(c, 0x310000, PAGE, va, flags=uapi.VFIO_DMA_MAP_FLAG_READ))
        rec(p + "MAP flags WRITE only", lambda: m(c, 0x320000, PAGE, va + PAGE, flags=uapi.VFIO_DMA_MAP_FLAG_WRITE))
        rec(p + "MAP flags bit 3", lambda: m(c, 0x330000, PAGE, va, flags=RW | 8))
        rec(p + "MAP flags VADDR (4) without prior invalidate",
            lambda: m(c, 0x200000, PAGE, va, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR))
        rec(p + "MAP iova+size overflow", lambda: m(c, 0xFFFFFFFFFFFFF000, 2 * PAGE, va))
        rec(p + "MAP iova 1<<60", lambda: m(c, 1 << 60, PAGE, va))
        rec(p + "MAP iova 1<<47 (beyond 39/48-bit aperture?)", lambda: m(c, 1 << 47, PAGE, va))
        rec(p + "MAP iova 0xfee00000 (MSI window)", lambda: m(c, 0xFEE00000, PAGE, va))
        rec(p + "MAP argsz=16", lambda: m(c, 0x340000, PAGE, va, argsz=16))
        rec(p + "MAP argsz=31", lambda: m(c, 0x340000, PAGE, va, argsz=31))
        rec(p + "MAP argsz=64 (bigger)", lambda: m(c, 0x350000, PAGE, va, argsz=64))
        rec(p + "MAP 17 pages of a 16-page vma", lambda: m(c, 0x400000, 17 * PAGE, va))
        rec(p + "UNMAP covering nothing", lambda: u(c, 0x10000000, PAGE))
        rec(p + "MAP 2 pages at 0x500000", lambda: m(c, 0x500000, 2 * PAGE, va + 2 * PAGE))
        rec(p + "UNMAP first half of 2-page map", lambda: u(c, 0x500000, PAGE))
        rec(p + "UNMAP second half of 2-page map", lambda: u(c, 0x501000, PAGE))
        rec(p + "UNMAP range starting mid-mapping covering past", lambda: u(c, 0x501000, 0x10000))
        rec(p + "UNMAP range covering whole 2-page map + more", lambda: u(c, 0x4FF000, 0x10000))
        rec(p + "UNMAP bad flags (bit 7)", lambda: u(c, 0x200000, PAGE, flags=0x80))
        rec(p + "UNMAP size 0", lambda: u(c, 0x200000, 0))
        rec(p + "UNMAP unaligned iova", lambda: u(c, 0x200800, PAGE))
        rec(p + "UNMAP unaligned size", lambda: u(c, 0x200000, 0x800))
        rec(p + "UNMAP argsz=16", lambda: u(c, 0x200000, PAGE, argsz=16))
        rec(p + "UNMAP DIRTY_BITMAP flag w/o data",
            lambda: u(c, 0x200000, PAGE, flags=uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP))
        all_ = uapi.VFIO_DMA_UNMAP_FLAG_ALL
        rec(p + "UNMAP ALL with iova!=0", lambda: u(c, 0x200000, 0, flags=all_))
        rec(p + "UNMAP ALL with size!=0", lambda: u(c, 0, PAGE, flags=all_))
        rec(p + "UNMAP ALL with iova/size 0", lambda: u(c, 0, 0, flags=all_))
        rec(p + "UNMAP again after ALL (0x200000)", lambda: u(c, 0x200000, PAGE))
        rec(p + "MAP after UNMAP ALL", lambda: m(c, 0x200000, PAGE, va))
        rec(p + "UNMAP exact", lambda: u(c, 0x200000, PAGE))
        rec(p + "UNMAP iova+size overflow", lambda: u(c, 0xFFFFFFFFFFFFF000, 2 * PAGE))

    def edu_dma(self, c: int, d: int) -> None:
        host = self.host
        _, boff = self.region_place(d, 0)
        _, coff = self.region_place(d, CFG)

        def wr(at, value):
            host.pwrite(d, value.to_bytes(4, "little"), boff + at)

        def run(src, dst, count, to_ram):
            for at, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, 1 | to_ram << 1)):
                wr(at, value)
            end = time.monotonic() + 5
            while int.from_bytes(host.pread(d, 4, boff + 0x98), "little") & 1:
                if time.monotonic() > end:
                    return "timeout"
                time.sleep(0.005)
            return "done"

        def round_trip():
            cmd = int.from_bytes(host.pread(d, 2, coff + 4), "little")
            host.pwrite(d, ((cmd | 0x6) & ~0x400).to_bytes(2, "little"), coff + 4)
            src, dst = self.pages(1), self.pages(1)
            pattern = bytes((i * 7 + 3) & 0xFF for i in range(64))
            src.view[0:64] = pattern
            self.map_dma(c, 0x100000, PAGE, src.addr)
            self.map_dma(c, 0x101000, PAGE, dst.addr)
            out = dict(to_device=run(0x100000, 0x40000, 64, 0), to_ram=run(0x40000, 0x101000, 64, 1),
                       match=dst.view[0:64] == pattern, dst_head=dst.view[0:16].hex())
            self.unmap_dma(c, 0x100000, 2 * PAGE)
            return out

        self.rec("edu DMA round trip through IOMMU", round_trip)

    def resets(self, fds: dict[str, int]) -> None:
        for bdf, fd in fds.items():
            self.rec(f"{bdf} RESET", lambda fd=fd: self.ioctl(fd, uapi.VFIO_DEVICE_RESET))

    def teardown(self, c: int, g: int, fds: dict[str, int], groups: dict[str, int]) -> None:
        for fd in fds.values():
            self.session.close_fd(fd)
        rec, unset = self.rec, uapi.VFIO_GROUP_UNSET_CONTAINER
        rec("group.UNSET_CONTAINER after device closed", lambda: self.ioctl(g, unset))
        rec("group.GET_STATUS after UNSET", lambda: self.status(g))
        rec("container.IOMMU_GET_INFO while other groups still attached", lambda: self.iommu_info(c, 24))
        for bdf, group in groups.items():
            if group != g:
                rec(f"{bdf} UNSET_CONTAINER", lambda group=group: self.ioctl(group, unset))
        rec("container.IOMMU_GET_INFO after last group left", lambda: self.iommu_info(c, 24))
        rec("container.CHECK_EXTENSION(3) after last group left", lambda: self.ioctl(c, uapi.VFIO_CHECK_EXTENSION, 3))
        rec("container.SET_IOMMU after last group left (no group)", lambda: self.ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))

    def type1_v1(self, g: int, edu) -> None:
        rec, m, u, p = self.rec, self.map_dma, self.unmap_dma, "v1: "
        c = self.open("/dev/vfio/vfio")
        self.set_container(g, c)
        va = self.pages(16).addr
        rec(p + "SET_IOMMU(1 TYPE1)", lambda: self.ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1))
        rec(p + "CHECK_EXTENSION(3) on v1 container", lambda: self.ioctl(c, uapi.VFIO_CHECK_EXTENSION, 3))
        rec(p + "CHECK_EXTENSION(9) on v1 container", lambda: self.ioctl(c, uapi.VFIO_CHECK_EXTENSION, 9))
        rec(p + "GET_INFO argsz=24", lambda: self.iommu_info(c, 24))
        rec(p + "MAP 2 pages at 0x500000", lambda: m(c, 0x500000, 2 * PAGE, va))
        rec(p + "UNMAP first half", lambda: u(c, 0x500000, PAGE))
        rec(p + "UNMAP second half after", lambda: u(c, 0x501000, PAGE))
        rec(p + "MAP 2 pages at 0x600000", lambda: m(c, 0x600000, 2 * PAGE, va))
        rec(p + "UNMAP second half first", lambda: u(c, 0x601000, PAGE))
        rec(p + "UNMAP rest", lambda: u(c, 0x600000, 0x10000))
        rec(p + "UNMAP ALL", lambda: u(c, 0, 0, flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL))
        p = "type1 "
        rec(p + "GET_INFO argsz=116 (exact)", lambda: self.iommu_info(c, 116))
        rec(p + "GET_INFO argsz=100 (short of caps)", lambda: self.iommu_info(c, 100))
        rec(p + "UNMAP argsz=32", lambda: u(c, 0x200000, PAGE, argsz=32))
        hole = self.pages(8)
        hole.release(4 * PAGE, 4 * PAGE)
        rec(p + "MAP 8 pages whose upper 4 are unmapped", lambda: m(c, 0x700000, 8 * PAGE, hole.addr))
        rec(p + "MAP the 4 mapped pages", lambda: m(c, 0x700000, 4 * PAGE, hole.addr))
        rec(p + "MAP same vaddr at another iova (aliasing)", lambda: m(c, 0x800000, 4 * PAGE, hole.addr))
        readonly = self.pages(1, mmap.PROT_READ).addr
        rec(p + "MAP read-only (PROT_READ) memory with READ|WRITE", lambda: m(c, 0x900000, PAGE, readonly))
        rec(p + "MAP read-only (PROT_READ) memory with READ only",
            lambda: m(c, 0x910000, PAGE, readonly, flags=uapi.VFIO_DMA_MAP_FLAG_READ))
        rec(p + "MAP PROT_NONE memory", lambda: m(c, 0x920000, PAGE, self.pages(1, 0).addr))
        rec(p + "GET_INFO 512 after these maps", lambda: self.iommu_info(c, 512))
        rec(p + "UNMAP ALL end", lambda: u(c, 0, 0, flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL))
        self.v1_container = c

    def e1000e_msix(self, g: int, bdf: str) -> None:
        rec, s, host, p = self.rec, self.set_irqs, self.host, "e1000e SET_IRQS "
        rec("e1000e re-attach group to v1 container", lambda: self.set_container(g, self.v1_container))
        x = self.get_device(g, bdf)
        xe = [self.eventfd() for _ in range(6)]

        def efds(*fds):
            return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)

        def fired_all():
            return [self.fired(e) for e in xe[:5]]

        rec(p + "MSIX count=6 (5 vectors)", lambda: s(x, EVENTFD | TRIGGER, MSIX, 0, 6, efds(*xe)))
        rec(p + "MSIX start=4 count=2", lambda: s(x, EVENTFD | TRIGGER, MSIX, 4, 2, efds(*xe[:2])))
        rec(p + "MSIX count=2", lambda: s(x, EVENTFD | TRIGGER, MSIX, 0, 2, efds(*xe[:2])))
        rec(p + "MSIX then start=2 count=3 (grow while enabled)",
            lambda: s(x, EVENTFD | TRIGGER, MSIX, 2, 3, efds(*xe[2:5])))
        rec(p + "MSIX loopback vector 1 (DATA_NONE start=1 count=1)",
            lambda: (s(x, NONE | TRIGGER, MSIX, 1, 1), fired_all())[1])
        rec(p + "MSIX loopback vector 3 (not enabled?)", lambda: (s(x, NONE | TRIGGER, MSIX, 3, 1), fired_all())[1])
        rec(p + "MSIX DATA_BOOL [1,0] start=0", lambda: (s(x, BOOL | TRIGGER, MSIX, 0, 2, b"\x01\x00"), fired_all())[1])
        rec(p + "MSIX disable, re-enable count=5",
            lambda: (s(x, NONE | TRIGGER, MSIX, 0, 0), s(x, EVENTFD | TRIGGER, MSIX, 0, 5, efds(*xe[:5])))[1])
        rec(p + "MSIX fd -1 for vector 2 only", lambda: s(x, EVENTFD | TRIGGER, MSIX, 2, 1, efds(-1)))
        rec(p + "MSI while MSIX enabled", lambda: s(x, EVENTFD | TRIGGER, MSI, 0, 1, efds(xe[5])))
        rec(p + "MSIX MASK", lambda: s(x, NONE | MASK, MSIX, 0, 1))
        rec(p + "MSIX disable", lambda: s(x, NONE | TRIGGER, MSIX, 0, 0))
        ee = self.eventfd()
        rec(p + "ERR TRIGGER (PCIe)", lambda: s(x, EVENTFD | TRIGGER, ERR, 0, 1, efds(ee)))
        rec(p + "ERR loopback fires", lambda: (s(x, NONE | TRIGGER, ERR, 0, 1), self.fired(ee))[1])
        rec(p + "ERR count=0 DATA_NONE", lambda: s(x, NONE | TRIGGER, ERR, 0, 0))
        rec(p + "ERR fd -1", lambda: s(x, EVENTFD | TRIGGER, ERR, 0, 1, efds(-1)))
        bsize, boff = self.region_place(x, 3)
        rec("e1000e BAR3 (MSI-X table) pread 16 at 0", lambda: host.pread(x, 16, boff).hex())
        rec("e1000e BAR3 (MSI-X) pread 16 at 0x2000 (PBA)", lambda: host.pread(x, 16, boff + 0x2000).hex())
        rec("e1000e BAR3 pwrite at 0 then pread",
            lambda: (host.pwrite(x, b"\x11\x22\x33\x44", boff), host.pread(x, 4, boff).hex()))

        def table_entry_via_mmap():
            m = host.mmap(x, bsize, boff, mmap.PROT_READ)
            try:
                return bytes(m[0:16]).hex()
            finally:
                m.close()

        rec("e1000e BAR3 mmap, read table entry 0", table_entry_via_mmap)
        _, coff = self.region_place(x, CFG)
        rec("e1000e config MSI-X cap (0xa0) 12 bytes", lambda: host.pread(x, 12, coff + 0xA0).hex())


def record(host, bdfs: list[str], settle: float = 0.5) -> dict:
    return Probe(host, bdfs, settle).run()


def replay_on_fake(bdfs: list[str] | None = None, profile: Profile | str | None = None) -> dict:
    """The same script on the fake's mirror of the CI guest the names come from (the x86 VM's
    'vm' topology, the arm64 guest's 'platform' one, or the s390x guest's 'ccw' one, its mdev
    under the UUID recorded), modelling `profile`'s kernel (the fake's default when None)."""
    if any(is_ccw_name(name) for name in bdfs or ()):
        from fakekernel import FakeKernel

        mirror = FakeKernel(fake_topology(bdfs), profile)
    else:
        mirror = fake_kernel("vm" if all(_is_pci(name) for name in bdfs or ()) else "platform", profile)
    with mirror as kernel:
        names = bdfs or [spec.bdf for spec in kernel.topology.devices]
        return record(kernel, names, settle=0.0)


def _is_pci(name: str) -> bool:
    try:
        parse_host(name)
    except ValueError:
        return False
    return True


def disagreements(recorded: dict, replayed: dict) -> list[tuple[str, object, object]]:
    """Every key whose answer differs, in the recording's order, keys missing on either side included."""
    keys = list(recorded) + [k for k in replayed if k not in recorded]
    return [(k, recorded.get(k), replayed.get(k)) for k in keys if recorded.get(k) != replayed.get(k)]


BAD_FILE = 4  # as vfio-conformance: a file that cannot be read or written


class RecordingError(Exception):
    """A recording that cannot be replayed; the message names the file and what is wrong."""


def load_recording(path: str) -> dict:
    """A probe recording: answers by key, each {"ok": value} or {"errno": name}, with the kernel
    and the devices it was recorded on."""
    try:
        with open(path) as f:
            recorded = json.load(f)
    except OSError as e:
        raise RecordingError(f"{path}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordingError(f"{path}: not JSON: {e}") from None
    if not isinstance(recorded, dict) or not all(k in recorded for k in ("kernel", "devices")):
        raise RecordingError(f"{path}: not a probe recording (needs kernel, devices and answers); "
                             "make one with: python3 -m conformance.probe record FILE")
    for key, answer in recorded.items():
        if not isinstance(answer, dict) or len(answer) != 1 or not {"ok", "errno"} >= set(answer):
            raise RecordingError(f"{path}: answer {key!r} is neither {{\"ok\": ...}} nor {{\"errno\": ...}}")
    return recorded


def recording_profile(path: str, recorded: dict) -> Profile:
    """The fake's profile for the kernel a recording was made on: its release names it."""
    from fakekernel.profile import PROFILES, Profile

    release = recorded["kernel"].get("ok")
    profile = Profile.modelling(release) if isinstance(release, str) else None
    if profile is None:
        raise RecordingError(f"{path}: recorded on kernel {release!r}, which no profile of the fake models; "
                             f"known: {', '.join(PROFILES)}")
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m conformance.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the probe on this machine's /dev/vfio")
    rec.add_argument("out")
    rec.add_argument("device", nargs="*", help="BDFs bound to vfio-pci (default: all of them)")
    cmp = sub.add_parser("compare", help="replay a recording on the fake kernel and list disagreements")
    cmp.add_argument("recording")
    args = parser.parse_args(argv)
    if args.command == "record":
        from vfio_impl.core.host import RealHost

        host = RealHost()
        bdfs = args.device or [d.bdf for d in vfio_bound(host)]
        answers = {"kernel": {"ok": os.uname().release}} | record(host, bdfs)
        with open(args.out, "w") as f:
            json.dump(answers, f, indent=1)
        print(f"probe: recorded {len(answers)} answers from {os.uname().release} into {args.out}")
        return 0
    try:
        recorded = load_recording(args.recording)
        profile = recording_profile(args.recording, recorded)
    except RecordingError as e:
        print(f"probe: {e}", file=sys.stderr)
        return BAD_FILE
    kernel = recorded.pop("kernel")["ok"]
    bdfs = list(recorded.get("devices", {}).get("ok", {}))
    found = disagreements(recorded, replay_on_fake(bdfs, profile))
    for key, real, fake in found:
        print(f"{key}\n  real: {json.dumps(real)}\n  fake: {json.dumps(fake)}")
    print(f"probe: {len(recorded) - len(found)} of {len(recorded)} answers from {kernel} agree with the fake's "
          f"{profile.name} profile; {len(found)} disagree")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
