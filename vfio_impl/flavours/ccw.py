"""vfio-ccw: an s390 I/O subchannel assigned to a guest, as QEMU's hw/vfio/ccw.c does it.

The guest's start subchannel becomes one write of the I/O region (ORB and SCSW in, ret_code as
the write's errno out) and its halt and clear one write of the async command region; the kernel's
answer becomes a condition code. The I/O eventfd says an IRB is waiting in the I/O region: it is
read, folded into the subchannel's SCSW and the guest gets an I/O interrupt. The schib region
serves store subchannel, the CRW region the channel reports the CRW eventfd announces.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import ExitStack

from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.device import Device
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.iommu import iommu_group
from vfio_impl.core.region import Region
from vfio_impl.core.trace import error_report, trace, warn
from vfio_impl.uapi import css as _css
from vfio_impl.uapi.css import CRW, IRB, SCHIB
from vfio_impl.vmm.css import CSS_DEVICES, ChannelSubsystem, CssDevId, IOInstEnding, SubchDev, sch_gen_unit_exception
from vfio_impl.vmm.machine import Machine

IO_IRQ = uapi.VFIO_CCW_IO_IRQ_INDEX
CRW_IRQ = uapi.VFIO_CCW_CRW_IRQ_INDEX
# sscanf("%2x.%1x.%4x"): the subchannel directory an mdev sits in.
_HOSTID = re.compile(r"([0-9a-fA-F]{1,2})\.([0-9a-fA-F])\.([0-9a-fA-F]{1,4})")
# How many links realpath follows before giving up (the kernel's MAXSYMLINKS).
_MAXSYMLINKS = 40
_CHANNEL_CHECK_END = (_css.SCSW_STCTL_PRIMARY | _css.SCSW_STCTL_SECONDARY | _css.SCSW_STCTL_ALERT
                      | _css.SCSW_STCTL_STATUS_PEND)
_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def realpath(host, path: str) -> str:
    """realpath(3) through the Host: every symlink on the way resolved; OSError as libc gives it."""
    parts, resolved, links = [p for p in path.split("/") if p], "", 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.rsplit("/", 1)[0]
            continue
        candidate = f"{resolved}/{part}"
        try:
            target = host.readlink(candidate)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            resolved = candidate
            continue
        links += 1
        if links > _MAXSYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        if target.startswith("/"):
            resolved = ""
        parts[:0] = [p for p in target.split("/") if p]
    return resolved or "/"


def _gen_channel_check(scsw: _css.SCSW, cstat: int) -> None:
    """A start that ended in a channel-side error: primary, secondary and alert status."""
    scsw.ctrl &= ~_css.SCSW_ACTL_START_PEND
    scsw.cstat = cstat
    scsw.ctrl = scsw.ctrl & ~_css.SCSW_CTRL_MASK_STCTL | _CHANNEL_CHECK_END


class VFIOCCWDevice:
    """A realized vfio-ccw device: its subchannel in the guest's channel subsystem, its regions
    and its notifiers."""

    migratable = False

    def __init__(self, space: AddressSpace, machine: Machine, css: ChannelSubsystem, *,
                 sysfsdev: str | None, force_orb_pfch: bool):
        self.space = space
        self.host = space.host
        self.machine = machine
        self.css = css
        self.sysfsdev = sysfsdev
        self.force_orb_pfch = force_orb_pfch
        self.warned_orb_pfch = False
        self.hostid: CssDevId | None = None
        self.mdevid: str | None = None
        self.sch: SubchDev | None = None
        self.name: str | None = None
        self.balloon_allowed = False
        self.needs_reset = False
        self.vbasedev: Device | None = None
        self.io_region: Region | None = None
        self.async_cmd_region: Region | None = None
        self.schib_region: Region | None = None
        self.crw_region: Region | None = None
        self.notifiers: dict[int, int] = {}

    def _warn_once_pfch(self, msg: str) -> None:
        """One warning for both PFCH messages, whichever comes first."""
        if not self.warned_orb_pfch:
            self.warned_orb_pfch = True
            warn(f"vfio-ccw (devno {self.sch.name}): {msg}")

    def compute_needs_reset(self) -> None:
        self.needs_reset = False

    # -- the functions ---------------------------------------------------------------------------
    def _pwrite_region(self, region: Region, data: bytes, what: str) -> int:
        """Write a whole region, again on EAGAIN: 0 or -errno. vfio-ccw returns a non-zero ret_code
        as the write's errno; a short write sets none, and counts as EFAULT, as newer QEMU has it."""
        while True:
            try:
                n = region.pwrite(0, data)
            except VFIOError as e:
                if e.errno == errno.EAGAIN:
                    trace("vfio_ccw_write_retry", name=self.name, region=what)
                    continue
                err = e.errno
            else:
                if n == len(data):
                    return 0
                err = 0
            error_report(f"vfio-ccw: write {what} failed with errno={err}")
            return -(err or errno.EFAULT)

    def _unit_exception(self) -> None:
        sch_gen_unit_exception(self.sch)
        self.css.inject_io_interrupt(self.sch)

    def handle_request(self) -> IOInstEnding:
        """Start subchannel: the ORB and SCSW go to the kernel in one write of the I/O region."""
        sch = self.sch
        if not sch.orb.ctrl0 & _css.ORB_CTRL0_MASK_PFCH:
            if not self.force_orb_pfch:
                self._warn_once_pfch("requires PFCH flag set")
                self._unit_exception()
                return IOInstEnding.CC_EXPECTED
            sch.orb.ctrl0 |= _css.ORB_CTRL0_MASK_PFCH
            self._warn_once_pfch("PFCH flag forced")
        layout = uapi.ccw_io_region
        region = bytearray(self.io_region.size)
        region[layout.offsetof("orb_area"):layout.offsetof("scsw_area")] = sch.orb.pack()
        region[layout.offsetof("scsw_area"):layout.offsetof("irb_area")] = sch.scsw.pack()
        ret = self._pwrite_region(self.io_region, bytes(region), "I/O region")
        trace("vfio_ccw_handle_request", name=self.name, ret=ret)
        if ret == 0:
            return IOInstEnding.CC_EXPECTED
        if ret == -errno.EBUSY:
            return IOInstEnding.CC_BUSY
        if ret in (-errno.ENODEV, -errno.EACCES):
            return IOInstEnding.CC_NOT_OPERATIONAL
        self._unit_exception()
        return IOInstEnding.CC_EXPECTED

    def handle_store(self) -> IOInstEnding:
        """Store subchannel refreshes the path bits from the schib region; a failed read is only
        reported, as stsch has no condition code for it."""
        if self.schib_region is None:
            return IOInstEnding.CC_EXPECTED
        try:
            data = self.schib_region.pread(0, self.schib_region.size)
        except VFIOError as e:
            error_report(f"vfio-ccw: store region read failed with errno={e.errno}")
            return IOInstEnding.CC_EXPECTED
        s = SCHIB.unpack(data.ljust(SCHIB.SIZE, b"\0"))
        pmcw = self.sch.curr_status.pmcw
        pmcw.pnom, pmcw.lpum, pmcw.pam, pmcw.pom = s.pmcw.pnom, s.pmcw.lpum, s.pmcw.pam, s.pmcw.pom
        if s.scsw.flags & _css.SCSW_FLAGS_MASK_PNO:
            self.sch.scsw.flags |= _css.SCSW_FLAGS_MASK_PNO
        return IOInstEnding.CC_EXPECTED

    def _handle_async(self, command: int, accepted: tuple[int, ...]) -> int:
        """Halt or clear through the async command region; -ENOSYS without one, so the channel
        subsystem emulates it. What the kernel does not accept ends in a unit exception."""
        if self.async_cmd_region is None:
            return -errno.ENOSYS
        region = uapi.ccw_cmd_region.pack(command=command)
        ret = self._pwrite_region(self.async_cmd_region, bytes(region), "cmd region")
        trace("vfio_ccw_handle_async", name=self.name, command=command, ret=ret)
        if ret not in accepted:
            self._unit_exception()
        return 0

    def handle_clear(self) -> int:
        return self._handle_async(uapi.VFIO_CCW_ASYNC_CMD_CSCH, (0, -errno.ENODEV, -errno.EACCES))

    def handle_halt(self) -> int:
        return self._handle_async(uapi.VFIO_CCW_ASYNC_CMD_HSCH, (0, -errno.EBUSY, -errno.ENODEV, -errno.EACCES))

    def reset(self) -> None:
        """The device's reset: VFIO_DEVICE_RESET, its failure ignored as QEMU ignores it."""
        try:
            self.vbasedev.reset()
        except VFIOError as e:
            trace("vfio_ccw_reset_failed", name=self.name, errno=e.errno)

    # -- notifiers ---------------------------------------------------------------------------------
    def _crw_read(self) -> None:
        """Read CRWs until the region gives a zero one, queueing each for the guest."""
        at = uapi.ccw_crw_region.offsetof("crw")
        while True:
            try:
                data = self.crw_region.pread(0, self.crw_region.size)
            except VFIOError as e:
                error_report(f"vfio-ccw: Read crw region failed with errno={e.errno}")
                return
            word = data.ljust(self.crw_region.size, b"\0")[at:at + CRW.STRUCT.size]
            if not any(word):
                return
            self.css.crw_add_to_queue(CRW.unpack(word))

    def _crw_notifier_handler(self) -> None:
        while self.host.eventfd_read(self.notifiers[CRW_IRQ]):
            self._crw_read()

    def _io_notifier_handler(self) -> None:
        """The IRB from the I/O region becomes the subchannel's status; a failed or short read
        becomes a status of its own. Either way the guest gets an I/O interrupt."""
        if not self.host.eventfd_read(self.notifiers[IO_IRQ]):
            return
        sch = self.sch
        scsw = sch.scsw
        try:
            data = self.io_region.pread(0, self.io_region.size)
        except VFIOError as e:
            if e.errno == errno.ENODEV:
                # A deferred condition code 3.
                scsw.flags |= _css.SCSW_FLAGS_MASK_CC
                scsw.ctrl = scsw.ctrl & ~_css.SCSW_CTRL_MASK_STCTL | _css.SCSW_STCTL_ALERT | _css.SCSW_STCTL_STATUS_PEND
            else:
                _gen_channel_check(scsw, _css.SCSW_CSTAT_DATA_CHECK if e.errno == errno.EFAULT
                                   else _css.SCSW_CSTAT_PROG_CHECK)
        else:
            if len(data) != self.io_region.size:
                _gen_channel_check(scsw, _css.SCSW_CSTAT_CHN_CTRL_CHK)
            else:
                irb = IRB.unpack(data, uapi.ccw_io_region.offsetof("irb_area"))
                sch.curr_status.scsw = irb.scsw
                if (irb.scsw.dstat & _css.SCSW_DSTAT_UNIT_CHECK
                        and sch.curr_status.pmcw.chars & _css.PMCW_CHARS_MASK_CSENSE):
                    sch.sense_data[:] = irb.ecw
        self.css.inject_io_interrupt(sch)

    def _register_irq_notifier(self, irq: int) -> None:
        """An eventfd for the IRQ with its handler on the loop, then SET_IRQS TRIGGER; a failure
        leaves neither behind."""
        dev = self.vbasedev
        if dev.num_irqs < irq + 1:
            message = (f"vfio: unexpected number of io irqs {dev.num_irqs}" if irq == IO_IRQ
                       else f"vfio: IRQ {irq} not available (number of irqs {dev.num_irqs})")
            raise VFIOError(message, errno.EINVAL)
        try:
            info = dev.get_irq_info(irq)
        except VFIOError as e:
            raise VFIOError("vfio: Error getting irq info", e.errno) from e
        if info.count < 1:
            raise VFIOError("vfio: Error getting irq info", errno.EINVAL)
        try:
            fd = dev.new_eventfd()
        except VFIOError as e:
            what = "IO" if irq == IO_IRQ else f"irq ({irq})"
            raise VFIOError(f"vfio: Unable to init event notifier for {what}", e.errno) from e
        handler = self._io_notifier_handler if irq == IO_IRQ else self._crw_notifier_handler
        self.machine.set_fd_handler(fd, handler)
        try:
            dev.set_irq_signaling(irq, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, fd)
        except VFIOError:
            dev.free_eventfd(fd)
            raise
        self.notifiers[irq] = fd

    def _unregister_irq_notifier(self, irq: int) -> None:
        """SET_IRQS with fd -1, then the handler and the eventfd go; a refused SET_IRQS is reported."""
        fd = self.notifiers.pop(irq, None)
        if fd is None:
            return
        try:
            self.vbasedev.set_irq_signaling(irq, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, -1)
        except VFIOError as e:
            error_report(f"vfio {self.name}: {e}")
        self.vbasedev.free_eventfd(fd)

    # -- regions ------------------------------------------------------------------------------------
    def _optional_region(self, subtype: int, layout, what: str) -> Region | None:
        """A region found by its type capability, which must have its struct's size."""
        info = self.vbasedev.get_dev_region_info(uapi.VFIO_REGION_TYPE_CCW, subtype)
        if info is None:
            return None
        if info.size != layout.size:
            raise VFIOError(f"vfio: Unexpected size of the {what} region", errno.EINVAL)
        return Region(self.vbasedev, info, f"vfio-ccw {self.name} {what} region")

    def _get_region(self) -> None:
        """The I/O region, then the optional async command, schib and CRW regions."""
        dev = self.vbasedev
        if not dev.flags & uapi.VFIO_DEVICE_FLAGS_CCW:
            raise VFIOError("vfio: Um, this isn't a vfio-ccw device", errno.EINVAL)
        if dev.num_regions < uapi.VFIO_CCW_CONFIG_REGION_INDEX + 1:
            raise VFIOError(f"vfio: too few regions ({dev.num_regions}), expected at least "
                            f"{uapi.VFIO_CCW_CONFIG_REGION_INDEX + 1}", errno.EINVAL)
        try:
            info = dev.get_region_info(uapi.VFIO_CCW_CONFIG_REGION_INDEX)
        except VFIOError as e:
            raise VFIOError("vfio: Error getting config info", e.errno) from e
        if info.size != uapi.ccw_io_region.size:
            raise VFIOError("vfio: Unexpected size of the I/O region", errno.EINVAL)
        self.io_region = Region(dev, info, f"vfio-ccw {self.name} I/O region")
        self.async_cmd_region = self._optional_region(uapi.VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD,
                                                      uapi.ccw_cmd_region, "async cmd")
        self.schib_region = self._optional_region(uapi.VFIO_REGION_SUBTYPE_CCW_SCHIB, uapi.ccw_schib_region,
                                                  "schib")
        self.crw_region = self._optional_region(uapi.VFIO_REGION_SUBTYPE_CCW_CRW, uapi.ccw_crw_region, "CRW")

    def _put_region(self) -> None:
        self.io_region = self.async_cmd_region = self.schib_region = self.crw_region = None

    # -- device and group ---------------------------------------------------------------------------
    @property
    def _mdev_path(self) -> str:
        """The mdev under its subchannel, where ccw.c looks for the IOMMU group."""
        return f"{CSS_DEVICES}/{self.hostid}/{self.mdevid}"

    def _get_device(self, groupid: int) -> None:
        """The device by its mdev UUID, named after its subchannel; one attach per subchannel."""
        name = str(self.hostid)
        self.vbasedev = Device.attach(self.space, self._mdev_path, name, groupid=groupid, devname=self.mdevid,
                                      already_attached=f"vfio: subchannel {name} has already been attached")
        # Pages pinned for channel programs are in the guest's working set, never balloon pages.
        self.balloon_allowed = True
        self.name = name

    def _put_device(self) -> None:
        self.vbasedev.close()
        self.vbasedev = None

    def _get_group(self) -> int:
        """The mdev's IOMMU group number; ccw.c's words for a failure start with "vfio: "."""
        try:
            return iommu_group(self.host, self._mdev_path)
        except VFIOError as e:
            raise VFIOError(f"vfio: {e.message}", e.errno) from e

    # -- the subchannel (s390-ccw's realize) ----------------------------------------------------------
    def _get_dev_info(self) -> None:
        """The mdev's UUID and its subchannel's id, from where sysfsdev really leads."""
        if not self.sysfsdev:
            raise VFIOError("No host device provided", errno.EINVAL)
        try:
            dev_path = realpath(self.host, self.sysfsdev)
        except OSError as e:
            raise VFIOError.from_oserror(f"Host device '{self.sysfsdev}' not found", e) from e
        self.mdevid = os.path.basename(dev_path)
        parent = os.path.basename(os.path.dirname(dev_path))
        m = _HOSTID.match(parent)
        if not m:
            raise VFIOError(f"Failed to read {parent}", errno.EINVAL)
        self.hostid = CssDevId(*(int(g, 16) for g in m.groups()))

    def _s390_ccw_realize(self) -> None:
        """The host ids, a guest subchannel for them and its first SCHIB from the host's sysfs."""
        self._get_dev_info()
        sch = self.css.create_sch()
        ret = self.css.sch_build_schib(sch, self.hostid, self.host)
        if ret:
            self.css.subch_release(sch)
            raise VFIOError("s390_ccw_realize: Failed to build initial schib", -ret)
        sch.driver = self
        self.sch = sch

    def _s390_ccw_unrealize(self) -> None:
        if self.sch is not None:
            self.css.subch_release(self.sch)
            self.sch = None

    # -- realize / unrealize -------------------------------------------------------------------------
    @classmethod
    def realize(cls, space: AddressSpace, machine: Machine, *, sysfsdev: str | None = None,
                force_orb_pfch: bool = False, css: ChannelSubsystem | None = None) -> "VFIOCCWDevice":
        """vfio_ccw_realize: each step undone in reverse when a later one fails."""
        if machine is not space.machine:
            raise VFIOError("vfio: the machine must be the address space's machine", errno.EINVAL)
        self = cls(space, machine, css or ChannelSubsystem(), sysfsdev=sysfsdev, force_orb_pfch=force_orb_pfch)
        trace("vfio_ccw_realize", sysfsdev=sysfsdev, force_orb_pfch=force_orb_pfch)
        with ExitStack() as unwind:
            self._s390_ccw_realize()
            unwind.callback(self._s390_ccw_unrealize)
            groupid = self._get_group()
            self._get_device(groupid)
            unwind.callback(self._put_device)
            self._get_region()
            unwind.callback(self._put_region)
            self._register_irq_notifier(IO_IRQ)
            unwind.callback(self._unregister_irq_notifier, IO_IRQ)
            if self.crw_region is not None:
                self._register_irq_notifier(CRW_IRQ)
            unwind.pop_all()
        return self

    @classmethod
    def from_options(cls, space: AddressSpace, machine: Machine, options: str,
                     css: ChannelSubsystem | None = None) -> "VFIOCCWDevice":
        """realize from a -device option string: sysfsdev=PATH,force-orb-pfch=on."""
        kwargs: dict = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key == "sysfsdev":
                kwargs["sysfsdev"] = value
            elif key == "force-orb-pfch":
                if value.lower() not in _BOOLS:
                    raise VFIOError(f"Parameter '{key}' expects 'on' or 'off'", errno.EINVAL)
                kwargs["force_orb_pfch"] = _BOOLS[value.lower()]
            else:
                raise VFIOError(f"Property 'vfio-ccw.{key}' not found", errno.EINVAL)
        return cls.realize(space, machine, css=css, **kwargs)

    def unrealize(self) -> None:
        """The reverse of realize: notifiers (SET_IRQS fd -1), regions, device, group, subchannel."""
        if self.vbasedev is None:
            return
        self._unregister_irq_notifier(CRW_IRQ)
        self._unregister_irq_notifier(IO_IRQ)
        self._put_region()
        self._put_device()
        self._s390_ccw_unrealize()
        trace("vfio_ccw_unrealize", name=self.name)

    def __enter__(self) -> "VFIOCCWDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.unrealize()
