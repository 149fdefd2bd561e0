"""The probe's ccw section: a vfio-ccw mdev as the s390x CI guest has it (QEMU's virtio-blk-ccw on
subchannel 0.0.0001, bound to vfio_ccw), every answer recorded there and replayed on the fake's
ccw topology: type1 with the mdev's emulated group, the device's info, regions and IRQs, the
schib and CRW regions, SENSE ID and a chained NOOP, TIC, READ_CONF program through the I/O
region with their IRBs and data, clear and halt through the async region, the reset, and the
misuse of every region.

What the kernel makes up is recorded only as what the user can rely on: the schib's interruption
parameter (the kernel's subchannel pointer) as whether it is set, and the address a clear or halt
reports once the program is freed (where the kernel copied it) as whether it differs from the
program's IOVAs.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, IRB, ORB, SCHIB, SCSW

from .backends import is_ccw_name

if TYPE_CHECKING:
    from .probe import Probe

TYPE1, TYPE1v2 = uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU
TRIGGER, MASK = uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_MASK
# 64 KiB of guest memory at IOVA 0x100000, as the guest's C test mapped it: the programs at its
# start, their data a page or two in.
IOVA, PAGES = 0x100000, 16
SENSE_ID_DATA, READ_CONF_PROGRAM, READ_CONF_TARGET, READ_CONF_DATA = 0x1000, 0x100, 0x200, 0x2000
# The ORB the guest used: format 1, prefetch, 64-bit IDAWs, the one path.
ORB_CTRL0 = css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH | css.ORB_CTRL0_MASK_C64
LPM = 0x80
IO, ASYNC, SCHIB_AT, CRW_AT = (index << 10 for index in range(4))
RET_CODE = struct.Struct("=i")
IO_RET_CODE = uapi.ccw_io_region.offsetof("ret_code")
IRB_AT = uapi.ccw_io_region.offsetof("irb_area")
SCSW_AT = uapi.ccw_io_region.offsetof("scsw_area")


def known(devices: list) -> list:
    """The vfio-ccw mdevs the section reads."""
    return [d for d in devices if d.bus == "ccw"]


def fake_topology(names: list[str]):
    """The fake's ccw topology with the guest's mirror under the UUID a recording names, if the
    recording's mdev is not already one of the topology's."""
    from fakekernel.topology import GUEST_MDEV_UUID, Topology

    topology = Topology.named("ccw")
    uuids = [n.rstrip("/").rsplit("/", 1)[-1] for n in names if is_ccw_name(n)]
    unknown = [u for u in uuids if u not in {spec.uuid for spec in topology.ccw}]
    if unknown:
        mirror = next(i for i, spec in enumerate(topology.ccw) if spec.uuid == GUEST_MDEV_UUID)
        topology.ccw[mirror] = dataclasses.replace(topology.ccw[mirror], uuid=unknown[0])
    return topology


def info(probe: "Probe", fd: int, request: int, layout, kind: str, argsz: int, **fields) -> dict:
    """A GET_INFO answer by value, its capability chain decoded: the struct is in the kernel's
    byte order, so a hex dump recorded on the big-endian guest would not compare with a replay
    on a little-endian host."""
    buf = bytearray(max(argsz, layout.size))
    layout.pack_into(buf, 0, argsz=argsz, **fields)
    probe.ioctl(fd, request, buf)
    answer = layout.unpack(buf)._asdict()
    if answer["cap_offset"] and answer["argsz"] <= argsz:
        answer["caps"] = [{"cap": type(c).__name__} | dataclasses.asdict(c)
                          for c in uapi.parse_chain(buf, answer["cap_offset"], kind)]
    return answer


class CcwScript:
    def __init__(self, probe: "Probe", devices: list):
        self.probe = probe
        self.devices = sorted(devices, key=lambda d: d.bdf)

    def run(self) -> None:
        for dev in self.devices:
            self.mdev(dev)

    def mdev(self, dev) -> None:
        p, pre = self.probe, f"{dev.bdf} "
        c, g = self.container(dev)
        fd = self.device(g, dev)
        pages = p.pages(PAGES)
        p.rec(pre + "MAP_DMA 64 KiB at IOVA 0x100000", lambda: p.map_dma(c, IOVA, PAGES * 4096, pages.addr))
        p.rec(pre + "IOMMU_GET_INFO after MAP_DMA", lambda: self.iommu_info(c, 512))
        io, crw = p.eventfd(), p.eventfd()
        for index, efd in ((uapi.VFIO_CCW_IO_IRQ_INDEX, io), (uapi.VFIO_CCW_CRW_IRQ_INDEX, crw)):
            p.rec(pre + f"SET_IRQS TRIGGER eventfd index {index}",
                  lambda index=index, efd=efd: p.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(index, 0, [efd])))
        p.rec(pre + "schib region after open", lambda: self.schib(fd, scsw=False, lpum=False))
        p.rec(pre + "CRW region", lambda: p.host.pread(fd, uapi.ccw_crw_region.size, CRW_AT).hex())
        self.programs(fd, io, pages, pre)
        self.halt_and_clear(fd, io, pre)
        p.rec(pre + "DEVICE_RESET", lambda: p.ioctl(fd, uapi.VFIO_DEVICE_RESET))
        self.misuse(fd, crw, pre)
        p.rec(pre + "UNMAP_DMA the 64 KiB", lambda: p.unmap_dma(c, IOVA, PAGES * 4096))
        p.session.close_fd(fd)

    def container(self, dev) -> tuple[int, int]:
        """type1 around an mdev's group, which has no IOMMU domain behind it."""
        p, ioctl, pre = self.probe, self.probe.ioctl, f"{dev.bdf} "
        c = p.open("/dev/vfio/vfio")
        p.rec("ccw container.GET_API_VERSION", lambda: ioctl(c, uapi.VFIO_GET_API_VERSION))
        p.extensions(c, "ccw, before a group")
        g = p.open(dev.group_path)
        p.rec(pre + "group.GET_STATUS initially", lambda: p.status(g))
        p.rec(pre + "group.GET_DEVICE_FD before SET_CONTAINER", lambda: p.get_device(g, dev.bdf) and "fd")
        p.rec(pre + "group.SET_CONTAINER", lambda: p.set_container(g, c))
        p.rec(pre + "group.GET_STATUS after SET_CONTAINER", lambda: p.status(g))
        p.extensions(c, "ccw, mdev group attached")
        p.rec("ccw container.SET_IOMMU(TYPE1v2)", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1v2))
        p.rec("ccw container.SET_IOMMU(TYPE1) after v2", lambda: ioctl(c, uapi.VFIO_SET_IOMMU, TYPE1))
        p.extensions(c, "ccw, type1v2 set")
        for argsz in (16, 24, 512):
            p.rec(f"ccw container.IOMMU_GET_INFO argsz={argsz}", lambda argsz=argsz: self.iommu_info(c, argsz))
        return c, g

    def device(self, g: int, dev) -> int:
        """The device fd and what it says of itself."""
        p, pre = self.probe, f"{dev.bdf} "
        p.rec(pre + "group.GET_DEVICE_FD the subchannel's name", lambda: p.get_device(g, "0.0.0001") and "fd")
        fd = p.get_device(g, dev.bdf)
        info = p.rec(pre + "DEVICE_GET_INFO", lambda: p.device_info(fd, 16))["ok"]
        p.rec(pre + "DEVICE_GET_INFO argsz=12 (too small)", lambda: p.device_info(fd, 12))
        for i in range(info["num_regions"] + 1):
            for argsz in (16, 32, 64):
                p.rec(pre + f"REGION_INFO[{i}] argsz={argsz}", lambda i=i, argsz=argsz: self.region_info(fd, i, argsz))
        p.rec(pre + "REGION_INFO[0xffffffff]", lambda: self.region_info(fd, 0xFFFFFFFF, 64))
        for i in range(info["num_irqs"] + 1):
            p.rec(pre + f"IRQ_INFO[{i}]", lambda i=i: p.irq_info(fd, i))
        return fd

    def iommu_info(self, c: int, argsz: int) -> dict:
        return info(self.probe, c, uapi.VFIO_IOMMU_GET_INFO, uapi.vfio_iommu_type1_info, "iommu", argsz)

    def region_info(self, fd: int, index: int, argsz: int) -> dict:
        return info(self.probe, fd, uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.vfio_region_info, "region", argsz,
                    index=index)

    # -- regions and programs ---------------------------------------------------------------------
    def schib(self, fd: int, scsw: bool = True, lpum: bool = True) -> dict:
        """The schib region, its interruption parameter only as set or not, its program address
        only as the guest's or not. What earlier I/O may have left is left out where the probe's
        own I/O has not yet set it: the status word, and the last path used (which only a clear
        or halt sets, and the conformance run before the probe does both)."""
        schib = SCHIB.unpack(self.probe.host.pread(fd, SCHIB.SIZE, SCHIB_AT))
        pmcw = dataclasses.asdict(schib.pmcw) | {"chpid": schib.pmcw.chpid.hex(), "intparm": bool(schib.pmcw.intparm)}
        answer = {"pmcw": pmcw if lpum else {k: v for k, v in pmcw.items() if k != "lpum"}}
        if scsw:
            answer["scsw"] = dataclasses.asdict(schib.scsw) | {"cpa": self._cpa(schib.scsw.cpa)}
        return answer

    def _cpa(self, cpa: int):
        """A channel-program address inside the mapped IOVAs as it is, any other as "elsewhere"."""
        return hex(cpa) if IOVA <= cpa < IOVA + PAGES * 4096 or not cpa else "elsewhere"

    def start(self, fd: int, io: int, cpa: int, ctrl0: int = ORB_CTRL0) -> dict:
        """One start request through the I/O region, its interrupt and IRB."""
        p = self.probe
        region = bytearray(uapi.ccw_io_region.size)
        region[:SCSW_AT] = ORB(0x12345678, ctrl0, LPM, 0, cpa).pack()
        region[SCSW_AT:SCSW_AT + SCSW.STRUCT.size] = SCSW(ctrl=css.SCSW_FCTL_START_FUNC).pack()
        written = p.host.pwrite(fd, bytes(region), IO)
        ret_code = RET_CODE.unpack(p.host.pread(fd, 4, IO + IO_RET_CODE))[0]
        return {"written": written, "ret_code": ret_code, "interrupts": p.fired(io, wait=True), "irb": self.irb(fd)}

    def irb(self, fd: int) -> dict:
        irb = IRB.unpack(self.probe.host.pread(fd, uapi.ccw_io_region.size, IO), IRB_AT)
        return {"scsw": dataclasses.asdict(irb.scsw) | {"cpa": self._cpa(irb.scsw.cpa)},
                "esw": [hex(w) for w in irb.esw], "ecw": irb.ecw.hex(), "emw": irb.emw.hex()}

    def programs(self, fd: int, io: int, pages, pre: str) -> None:
        """SENSE ID, then NOOP chained to a TIC to READ_CONF, each with what it stored."""
        p, view = self.probe, pages.view

        def put(at: int, *ccws: CCW1) -> None:
            for i, ccw in enumerate(ccws):
                view[at + 8 * i:at + 8 * i + 8] = ccw.pack()

        put(0, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, 0x100, IOVA + SENSE_ID_DATA))
        p.rec(pre + "SENSE ID", lambda: self.start(fd, io, IOVA) | {
            "data": bytes(view[SENSE_ID_DATA:SENSE_ID_DATA + 16]).hex()})
        put(READ_CONF_PROGRAM, CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0),
            CCW1(css.CCW_CMD_TIC, 0, 0, IOVA + READ_CONF_TARGET))
        put(READ_CONF_TARGET, CCW1(css.CCW_CMD_READ_CONF, 0, 8, IOVA + READ_CONF_DATA))
        p.rec(pre + "NOOP, TIC, READ_CONF 8", lambda: self.start(fd, io, IOVA + READ_CONF_PROGRAM) | {
            "data": bytes(view[READ_CONF_DATA:READ_CONF_DATA + 8]).hex()})
        p.rec(pre + "schib region after the programs", lambda: self.schib(fd, lpum=False))

    def async_command(self, fd: int, io: int, command: int) -> dict:
        p = self.probe
        written = p.host.pwrite(fd, bytes(uapi.ccw_cmd_region.pack(command=command)), ASYNC)
        back = p.host.pread(fd, uapi.ccw_cmd_region.size, ASYNC)
        return {"written": written, "ret_code": RET_CODE.unpack_from(back, 4)[0],
                "interrupts": p.fired(io, wait=True), "irb": self.irb(fd)}

    def halt_and_clear(self, fd: int, io: int, pre: str) -> None:
        """Clear, then halt, of the idle subchannel: the address each reports is the freed
        program's kernel copy's, which nothing translates."""
        p = self.probe
        p.rec(pre + "CSCH through the async region", lambda: self.async_command(fd, io, uapi.VFIO_CCW_ASYNC_CMD_CSCH))
        p.rec(pre + "schib region after CSCH", lambda: self.schib(fd))
        p.rec(pre + "HSCH through the async region", lambda: self.async_command(fd, io, uapi.VFIO_CCW_ASYNC_CMD_HSCH))

    def misuse(self, fd: int, crw: int, pre: str) -> None:
        """Every region used wrongly; the I/O region's function cleared first, so no write that
        reaches the state machine starts anything."""
        p, host = self.probe, self.probe.host
        nothing = bytearray(uapi.ccw_io_region.size)

        def io_write(ret_code: int = 0, ctrl: int = 0, ctrl0: int = ORB_CTRL0):
            region = bytearray(nothing)
            region[:SCSW_AT] = ORB(0, ctrl0, LPM, 0, IOVA).pack()
            region[SCSW_AT:SCSW_AT + SCSW.STRUCT.size] = SCSW(ctrl=ctrl).pack()
            RET_CODE.pack_into(region, IO_RET_CODE, ret_code)
            return host.pwrite(fd, bytes(region), IO)

        p.rec(pre + "I/O region write, no function", io_write)
        p.rec(pre + "I/O region short write (8 bytes), no function", lambda: host.pwrite(fd, bytes(8), IO))
        p.rec(pre + "I/O region write, no function, ret_code -E2BIG", lambda: io_write(-7))
        p.rec(pre + "I/O region write, no function, ret_code 7", lambda: io_write(7))
        p.rec(pre + "I/O region write, halt function", lambda: io_write(ctrl=css.SCSW_FCTL_HALT_FUNC))
        p.rec(pre + "I/O region write, clear function", lambda: io_write(ctrl=css.SCSW_FCTL_CLEAR_FUNC))
        p.rec(pre + "I/O region write, transport-mode ORB",
              lambda: io_write(ctrl=css.SCSW_FCTL_START_FUNC, ctrl0=ORB_CTRL0 | css.ORB_CTRL0_MASK_INVALID))
        p.rec(pre + "I/O region write, no function, after the misuse", io_write)
        for name, at, size in (("I/O", IO, uapi.ccw_io_region.size), ("async", ASYNC, uapi.ccw_cmd_region.size),
                               ("schib", SCHIB_AT, uapi.ccw_schib_region.size),
                               ("CRW", CRW_AT, uapi.ccw_crw_region.size)):
            p.rec(pre + f"{name} region pread one byte past",
                  lambda at=at, size=size: host.pread(fd, size + 1, at).hex())
            p.rec(pre + f"{name} region pwrite one byte past",
                  lambda at=at, size=size: host.pwrite(fd, bytes(size + 1), at))
        p.rec(pre + "async region short write (command 0x80 only)",
              lambda: host.pwrite(fd, struct.pack("=I", 0x80), ASYNC))
        p.rec(pre + "async region unknown command",
              lambda: host.pwrite(fd, bytes(uapi.ccw_cmd_region.pack(command=3)), ASYNC))
        p.rec(pre + "schib region pwrite", lambda: host.pwrite(fd, bytes(4), SCHIB_AT))
        p.rec(pre + "CRW region pwrite", lambda: host.pwrite(fd, bytes(4), CRW_AT))
        p.rec(pre + "pread at region index 4", lambda: host.pread(fd, 4, 4 << 10).hex())
        p.rec(pre + "pwrite at region index 4", lambda: host.pwrite(fd, bytes(4), 4 << 10))
        p.rec(pre + "mmap the I/O region", lambda: p.mmap_ok(fd, 4096, IO))
        p.rec(pre + "SET_IRQS MASK", lambda: p.set_irqs(fd, uapi.VFIO_IRQ_SET_DATA_NONE | MASK, 0, 0, 1))
        p.rec(pre + "SET_IRQS index 3", lambda: p.set_irqs(fd, uapi.VFIO_IRQ_SET_DATA_NONE | TRIGGER, 3, 0, 1))
        p.rec(pre + "SET_IRQS start 1", lambda: p.set_irqs(fd, uapi.VFIO_IRQ_SET_DATA_NONE | TRIGGER, 0, 1, 1))
        p.rec(pre + "SET_IRQS eventfd -2", lambda: p.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(1, 0, [-2])))
        p.rec(pre + "SET_IRQS CRW loopback signals its eventfd",
              lambda: (host.ioctl(fd, uapi.VFIO_DEVICE_SET_IRQS, irq.data_none(1, 0, 1, TRIGGER)), p.fired(crw))[1])
