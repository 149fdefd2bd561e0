"""The probe's platform section: vfio-platform and vfio-amba devices in no-IOMMU mode, as the
arm64 CI guest has them (the virt board's PL031, PL061 and a virtio-mmio slot), every answer
recorded there and replayed on the fake's platform topology. Nothing timing-dependent is
recorded: the PL031's count is never read, only whether its match interrupt came."""

from __future__ import annotations

import mmap
import sys
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .platform_models import PLATFORM_MODELS, RTCICR, RTCIMSC, RTCLR, RTCMIS, RTCMR

if TYPE_CHECKING:
    from .probe import Probe

TRIGGER, MASK, UNMASK = (uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_MASK,
                         uapi.VFIO_IRQ_SET_ACTION_UNMASK)
NONE, EVENTFD = uapi.VFIO_IRQ_SET_DATA_NONE, uapi.VFIO_IRQ_SET_DATA_EVENTFD
TYPE1, TYPE1v2, NOIOMMU = uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_NOIOMMU_IOMMU
# The registers that name each model: PrimeCell IDs at the top of the page, virtio-mmio's
# magic, version, device and vendor at its start.
IDENT_BYTES = {"pl031": (0xFE0, 32), "pl061": (0xFE0, 32), "virtio-mmio": (0x000, 16)}


class PlatformScript:
    def __init__(self, probe: "Probe", devices: list):
        self.probe = probe
        self.devices = sorted(devices, key=lambda d: d.bdf)

    def run(self) -> None:
        p = self.probe
        c = p.open("/dev/vfio/vfio")
        p.rec("platform container.GET_API_VERSION", lambda: p.ioctl(c, uapi.VFIO_GET_API_VERSION))
        p.extensions(c, "no-IOMMU, before a group")
        first, groups, fds = self.devices[0], {}, {}
        groups[first.bdf] = self.first_group(c, first)
        for dev in self.devices[1:]:
            groups[dev.bdf] = g = p.open(dev.group_path)
            p.rec(f"{dev.bdf} group.GET_STATUS initially", lambda g=g: p.status(g))
            p.rec(f"{dev.bdf} group.SET_CONTAINER into the no-IOMMU container", lambda g=g: p.set_container(g, c))
        for dev in self.devices:
            fds[dev.bdf] = self.device(groups[dev.bdf], dev)
        for dev in self.devices:
            self.irqs(fds[dev.bdf], dev)
        pl031 = next((d for d in self.devices if d.model == "pl031"), None)
        if pl031:
            self.pl031_match(fds[pl031.bdf], pl031.bdf)
        for dev in self.devices:
            p.session.close_fd(fds[dev.bdf])
            p.rec(f"{dev.bdf} group.UNSET_CONTAINER",
                  lambda g=groups[dev.bdf]: p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER))
        p.rec("platform container.SET_IOMMU after the last group left", lambda: p.ioctl(c, uapi.VFIO_SET_IOMMU, NOIOMMU))

    def first_group(self, c: int, dev) -> int:
        """The container's answers before and after its first no-IOMMU group, then with the
        noiommu model set."""
        p, ioctl = self.probe, self.probe.ioctl
        rec = p.rec
        rec(f"{dev.bdf} open /dev/vfio/<group> (not noiommu-<group>)", lambda: p.open(f"/dev/vfio/{dev.group}") and "fd")
        g = p.open(dev.group_path)
        rec(f"{dev.bdf} group.GET_STATUS initially", lambda: p.status(g))
        rec(f"{dev.bdf} group.GET_DEVICE_FD before SET_CONTAINER", lambda: p.get_device(g, dev.bdf) and "fd")
        rec(f"{dev.bdf} group.SET_CONTAINER", lambda: p.set_container(g, c))
        rec(f"{dev.bdf} group.GET_STATUS after SET_CONTAINER", lambda: p.status(g))
        p.extensions(c, "no-IOMMU group attached")
        rec("platform container.SET_IOMMU(TYPE1v2) with a no-IOMMU group", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))
        rec("platform container.SET_IOMMU(TYPE1) with a no-IOMMU group", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1))
        rec(f"{dev.bdf} group.GET_DEVICE_FD before SET_IOMMU", lambda: p.get_device(g, dev.bdf) and "fd")
        rec("platform container.SET_IOMMU(NOIOMMU)", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, NOIOMMU))
        rec("platform container.SET_IOMMU(NOIOMMU) twice", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, NOIOMMU))
        p.extensions(c, "no-IOMMU set")
        rec("platform container.IOMMU_GET_INFO", lambda: p.iommu_info(c, 24))
        pages = p.pages(1)
        rec("platform container.MAP_DMA", lambda: p.map_dma(c, 0, mmap.PAGESIZE, pages.addr))
        rec("platform container.UNMAP_DMA", lambda: p.unmap_dma(c, 0, mmap.PAGESIZE))
        rec(f"{dev.bdf} group.GET_STATUS after SET_IOMMU", lambda: p.status(g))
        return g

    def device(self, g: int, dev) -> int:
        """The device fd and what it says of itself: info, regions, IRQs, what its registers name."""
        p, host, pre = self.probe, self.probe.host, f"{dev.bdf} "
        p.rec(pre + "group.GET_DEVICE_FD unknown name", lambda: p.get_device(g, "0.nothing") and "fd")
        fd = p.get_device(g, dev.bdf)
        info = p.rec(pre + "DEVICE_GET_INFO", lambda: p.device_info(fd, 16))["ok"]
        p.rec(pre + "DEVICE_GET_INFO argsz=12 (too small)", lambda: p.device_info(fd, 12))
        for i in range(info["num_regions"] + 1):
            p.rec(pre + f"REGION_INFO[{i}]", lambda i=i: p.region(fd, i))
        for i in range(info["num_irqs"] + 1):
            p.rec(pre + f"IRQ_INFO[{i}]", lambda i=i: p.irq_info(fd, i))
        size, offset = p.region_place(fd, 0)
        at, n = IDENT_BYTES.get(dev.model, (0, 4))
        p.rec(pre + f"region 0 pread {n} bytes at {at:#x}", lambda: host.pread(fd, n, offset + at).hex())
        p.rec(pre + "region 0 pread at size", lambda: host.pread(fd, 4, offset + size).hex())
        p.rec(pre + "region 0 pread 8 bytes at size-4", lambda: host.pread(fd, 8, offset + size - 4).hex())
        p.rec(pre + "pread at region index 1", lambda: host.pread(fd, 4, 1 << 40).hex())
        p.rec(pre + "mmap region 0", lambda: p.mmap_ok(fd, mmap.PAGESIZE, offset))
        p.rec(pre + "mmap region 0 read-only", lambda: p.mmap_ok(fd, mmap.PAGESIZE, offset, mmap.PROT_READ))
        p.rec(pre + "mmap region 0 two pages", lambda: p.mmap_ok(fd, 2 * mmap.PAGESIZE, offset))
        p.rec(pre + "DEVICE_RESET", lambda: p.ioctl(fd, uapi.VFIO_DEVICE_RESET))
        return fd

    def irqs(self, fd: int, dev) -> None:
        """SET_IRQS on IRQ 0: each action and data type, out-of-range arguments, and the loopback
        trigger, which signals the eventfd (and masks a level line until it is unmasked). Never a
        loopback with no trigger set: Linux's handler would signal a NULL eventfd."""
        p, s, pre = self.probe, self.probe.set_irqs, f"{dev.bdf} SET_IRQS "
        efd = p.eventfd()
        data = efd.to_bytes(4, sys.byteorder, signed=True)
        p.rec(pre + "TRIGGER eventfd", lambda: s(fd, EVENTFD | TRIGGER, 0, 0, 1, data))
        p.rec(pre + "TRIGGER none (loopback)", lambda: s(fd, NONE | TRIGGER, 0, 0, 1))
        p.rec(pre + "loopback signalled the eventfd", lambda: p.fired(efd, wait=True))
        p.rec(pre + "loopback while automasked signals again", lambda: (s(fd, NONE | TRIGGER, 0, 0, 1),
                                                                       p.fired(efd, wait=True))[1])
        p.rec(pre + "UNMASK none", lambda: s(fd, NONE | UNMASK, 0, 0, 1))
        p.rec(pre + "MASK none", lambda: s(fd, NONE | MASK, 0, 0, 1))
        p.rec(pre + "loopback while masked", lambda: (s(fd, NONE | TRIGGER, 0, 0, 1), p.fired(efd, wait=True))[1])
        p.rec(pre + "UNMASK none after MASK", lambda: s(fd, NONE | UNMASK, 0, 0, 1))
        unmask = p.eventfd().to_bytes(4, sys.byteorder, signed=True)
        p.rec(pre + "UNMASK eventfd", lambda: s(fd, EVENTFD | UNMASK, 0, 0, 1, unmask))
        p.rec(pre + "UNMASK eventfd -1", lambda: s(fd, EVENTFD | UNMASK, 0, 0, 1, (-1).to_bytes(4, sys.byteorder, signed=True)))
        p.rec(pre + "index 1", lambda: s(fd, NONE | TRIGGER, 1, 0, 1))
        p.rec(pre + "TRIGGER count 2", lambda: s(fd, NONE | TRIGGER, 0, 0, 2))
        p.rec(pre + "TRIGGER start 1", lambda: s(fd, NONE | TRIGGER, 0, 1, 1))
        p.rec(pre + "two actions", lambda: s(fd, NONE | TRIGGER | MASK, 0, 0, 1))
        p.rec(pre + "TRIGGER eventfd -1 (off)", lambda: s(fd, EVENTFD | TRIGGER, 0, 0, 1, (-1).to_bytes(4, sys.byteorder, signed=True)))
        p.rec(pre + "TRIGGER none count 0 (off)", lambda: s(fd, NONE | TRIGGER, 0, 0, 0))

    def pl031_match(self, fd: int, name: str) -> None:
        """A real interrupt: the RTC matches at once (match and load written with one count),
        the automasked line stays quiet until the status is cleared and the IRQ unmasked."""
        p, host, pre = self.probe, self.probe.host, f"{name} PL031 "
        _, offset = p.region_place(fd, 0)
        efd = p.eventfd()

        def reg(at, value=None):
            if value is None:
                return int.from_bytes(host.pread(fd, 4, offset + at), "little")
            return host.pwrite(fd, value.to_bytes(4, "little"), offset + at)

        p.set_irqs(fd, EVENTFD | TRIGGER, 0, 0, 1, efd.to_bytes(4, sys.byteorder, signed=True))
        p.rec(pre + "match now: interrupts", lambda: (reg(RTCIMSC, 1), reg(RTCMR, 0x10000), reg(RTCLR, 0x10000),
                                                       p.fired(efd, wait=True))[3])
        p.rec(pre + "masked status after the match", lambda: reg(RTCMIS))
        p.rec(pre + "still masked: no second interrupt", lambda: p.fired(efd, wait=True))
        p.rec(pre + "UNMASK with the status still set: interrupts",
              lambda: (p.set_irqs(fd, NONE | UNMASK, 0, 0, 1), p.fired(efd, wait=True))[1])
        p.rec(pre + "status cleared, UNMASK: no interrupt",
              lambda: (reg(RTCICR, 1), p.set_irqs(fd, NONE | UNMASK, 0, 0, 1), p.fired(efd, wait=True))[2])
        p.rec(pre + "masked status after the clear", lambda: reg(RTCMIS))
        reg(RTCIMSC, 0)
        p.set_irqs(fd, NONE | TRIGGER, 0, 0, 0)


def known(devices: list) -> list:
    """The platform devices the section knows how to read."""
    return [d for d in devices if d.bus != "pci" and d.model in PLATFORM_MODELS]
