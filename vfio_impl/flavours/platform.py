"""vfio-platform: a host platform (device-tree) device assigned to a guest, as QEMU's
hw/vfio/platform.c does it.

Regions are mmapped with a trapped slow path beneath them. An interrupt goes either to KVM's
irqfd (the Machine plays KVM when built with irqfd=True), or to a user-space handler that
asserts the guest line, turns the mmaps off and takes the next trapped MMIO access as the
guest's EOI. There is no way to tell which IRQ the guest completed, so only one IRQ is ACTIVE
at a time and the others wait, in order, in a pending queue.
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass

from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.device import Device, IRQInfo
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.iommu import iommu_group
from vfio_impl.core.region import Region
from vfio_impl.core.trace import error_report, trace, warn
from vfio_impl.vmm.machine import IRQLine, Machine
from vfio_impl.vmm.migration import VMStateDescription

PLATFORM_DEVICES = "/sys/bus/platform/devices"
AMBA_DEVICES = "/sys/bus/amba/devices"
_ACCESS_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


class IRQState(enum.Enum):
    INACTIVE = "inactive"
    ACTIVE = "active"
    PENDING = "pending"


@dataclass(slots=True, eq=False)
class VFIOINTp:
    """One device IRQ: its eventfds, the guest line it drives and where it is in its life."""

    pin: int
    flags: int
    interrupt: int = -1
    unmask: int = -1
    state: IRQState = IRQState.INACTIVE
    kvm_accel: bool = False
    line: IRQLine | None = None

    @property
    def automasked(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_AUTOMASKED)


def count_compat(compat: str) -> int:
    """Entries of a NUL-separated of_node/compatible list (each one NUL-terminated)."""
    entries = compat.split("\0")
    return len(entries) - 1 if compat.endswith("\0") else len(entries)


class VFIOPlatformDevice:
    """A realized vfio-platform device: its regions, its IRQs and their injection."""

    # QEMU's vfio_platform_vmstate: nothing of the device can be migrated, so no VM holding one can.
    vmsd = VMStateDescription("vfio-platform", unmigratable=True)
    # The bus: where `host` names a device, and the flag the kernel's driver for that bus reports.
    type_name = "vfio-platform"
    bus_devices = PLATFORM_DEVICES
    bus_flag = uapi.VFIO_DEVICE_FLAGS_PLATFORM
    wrong_bus = "this isn't a platform device"

    def __init__(self, space: AddressSpace, machine: Machine, *, compat: str | None, x_no_mmap: bool,
                 mmap_timeout_ms: int, x_irqfd: bool):
        self.space = space
        self.host = space.host
        self.machine = machine
        self.name: str | None = None
        self.sysfsdev: str | None = None
        self.compat = compat
        self.num_compat = count_compat(compat) if compat is not None else 0
        self.no_mmap = x_no_mmap
        self.mmap_timeout = mmap_timeout_ms
        self.irqfd_allowed = x_irqfd
        self.needs_reset = False
        self.vbasedev: Device | None = None
        self.regions: list[Region] = []
        self.intp_list: list[VFIOINTp] = []
        self.pending_intp_queue: collections.deque[VFIOINTp] = collections.deque()
        self.mmap_timer = None
        # The interrupt handler, the EOI and the timer may run on different threads.
        self.intp_mutex = threading.Lock()

    @property
    def irqs(self) -> list[VFIOINTp]:
        """The IRQs by index (intp_list keeps the seed's order: the last one found first)."""
        return sorted(self.intp_list, key=lambda intp: intp.pin)

    # -- injection, whatever the method --------------------------------------------------------
    def _set_trigger_eventfd(self, intp: VFIOINTp, handler) -> None:
        """VFIO signals the trigger eventfd; the handler (None when KVM takes it) reads it."""
        self.machine.set_fd_handler(intp.interrupt, handler and functools.partial(handler, intp))
        try:
            self.vbasedev.set_irq_signaling(intp.pin, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, intp.interrupt)
        except VFIOError:
            self.machine.set_fd_handler(intp.interrupt, None)
            raise

    # -- the user-space path -----------------------------------------------------------------
    def _mmap_set_enabled(self, enabled: bool) -> None:
        """Off: every access traps, so the one that clears the device's IRQ status is seen."""
        for region in self.regions:
            region.mmap_enabled = enabled
        trace("vfio_mmap_set_enabled", name=self.name, enabled=enabled)

    def mmap_enabled(self) -> bool:
        """Whether guest accesses to the mapped regions take the fast path."""
        mapped = [r for r in self.regions if r.areas]
        return bool(mapped) and all(r.mmap_enabled for r in mapped)

    def _intp_mmap_enable(self) -> None:
        """The mmap timer: the fast path comes back once no IRQ is ACTIVE."""
        with self.intp_mutex:
            for intp in self.intp_list:
                if intp.state is IRQState.ACTIVE:
                    trace("vfio_platform_intp_mmap_enable", pin=intp.pin)
                    self.mmap_timer.mod(self.machine.clock.now_ms() + self.mmap_timeout)
                    return
            self._mmap_set_enabled(True)

    def _intp_inject_pending_lockheld(self, intp: VFIOINTp) -> None:
        """The slow path is already on and the timer armed: the ACTIVE IRQ before it saw to that."""
        trace("vfio_platform_intp_inject_pending_lockheld", pin=intp.pin, fd=intp.interrupt)
        intp.state = IRQState.ACTIVE
        intp.line.set(True)

    def _intp_interrupt(self, intp: VFIOINTp) -> None:
        """vfio_intp_interrupt: inject now, or queue behind the IRQ the guest is still handling."""
        with self.intp_mutex:
            if intp.state is IRQState.INACTIVE and any(
                    tmp.state in (IRQState.ACTIVE, IRQState.PENDING) for tmp in self.intp_list):
                intp.state = IRQState.PENDING
                trace("vfio_intp_interrupt_set_pending", pin=intp.pin)
                self.pending_intp_queue.append(intp)
                self.host.eventfd_read(intp.interrupt)
                return
            trace("vfio_platform_intp_interrupt", pin=intp.pin, fd=intp.interrupt)
            ret = self.host.eventfd_read(intp.interrupt)
            if not ret:
                error_report(f"Error when clearing fd={intp.interrupt} (ret = {ret})")
            intp.state = IRQState.ACTIVE
            self._mmap_set_enabled(False)
            intp.line.set(True)
            if self.mmap_timeout:
                self.mmap_timer.mod(self.machine.clock.now_ms() + self.mmap_timeout)

    def _platform_eoi(self) -> None:
        """vfio_platform_eoi: the first trapped access after an interrupt completes the ACTIVE IRQ,
        then the oldest PENDING one is injected."""
        with self.intp_mutex:
            for intp in self.intp_list:
                if intp.state is IRQState.ACTIVE:
                    trace("vfio_platform_eoi", pin=intp.pin, fd=intp.interrupt)
                    intp.state = IRQState.INACTIVE
                    intp.line.set(False)
                    if intp.automasked:
                        self._unmask_single_irqindex(intp.pin)
                    break
            if self.pending_intp_queue:
                self._intp_inject_pending_lockheld(self.pending_intp_queue.popleft())

    def _unmask_single_irqindex(self, pin: int) -> None:
        try:
            self.vbasedev.unmask_irq(pin)
        except VFIOError as e:
            error_report(str(e))

    def _start_eventfd_injection(self, intp: VFIOINTp) -> None:
        try:
            self._set_trigger_eventfd(intp, self._intp_interrupt)
        except VFIOError as e:
            raise VFIOError(f"vfio {self.name}: {e.message}", e.errno) from e

    # -- the irqfd path ------------------------------------------------------------------------
    def _set_resample_eventfd(self, intp: VFIOINTp) -> None:
        """VFIO unmasks the IRQ itself whenever the resample eventfd is written."""
        self.machine.set_fd_handler(intp.unmask, None)
        self.vbasedev.set_irq_signaling(intp.pin, 0, uapi.VFIO_IRQ_SET_ACTION_UNMASK, intp.unmask)

    def _start_irqfd_injection(self, intp: VFIOINTp) -> None:
        """KVM takes the trigger (and the EOI, through the resample eventfd) when it can; otherwise
        the user-space handler does. Once KVM holds the irqfd, a VFIO failure is fatal."""
        if not self.machine.irqfd_available or not self.irqfd_allowed:
            self._start_eventfd_injection(intp)
            return
        try:
            self.machine.add_irqfd(intp.interrupt, intp.line, intp.unmask if intp.automasked else None)
        except OSError:
            self._start_eventfd_injection(intp)
            return
        try:
            self._set_trigger_eventfd(intp, None)
            if intp.automasked:
                self._set_resample_eventfd(intp)
                trace("vfio_platform_start_level_irqfd_injection", pin=intp.pin, fd=intp.interrupt,
                      resamplefd=intp.unmask)
            else:
                trace("vfio_platform_start_edge_irqfd_injection", pin=intp.pin, fd=intp.interrupt)
        except VFIOError as e:
            self.machine.remove_irqfd(intp.interrupt)
            raise VFIOError(f"vfio {self.name}: {e.message}", e.errno) from e
        intp.kvm_accel = True

    def connect_irq(self, index: int, line: str) -> IRQLine:
        """sysbus_connect_irq: wire device IRQ `index` to the named guest line and start injecting."""
        intp = next((i for i in self.intp_list if i.pin == index), None)
        if intp is None:
            raise VFIOError(f"vfio {self.name}: no IRQ {index}", errno.EINVAL)
        intp.line = self.machine.irq_line(line)
        self._start_irqfd_injection(intp)
        return intp.line

    # -- the ops: reset and EOI ----------------------------------------------------------------
    def compute_needs_reset(self) -> None:
        self.needs_reset = True

    def hot_reset_multi(self) -> None:
        """Not implemented by the seed: a platform device has no bus to reset with others."""
        raise VFIOError(f"vfio {self.name}: multi-device hot reset is not supported", errno.EOPNOTSUPP)

    def reset(self) -> None:
        """QEMU's system reset of VFIO devices: a platform device always needs one, and the only
        reset offered, the multi-device one, fails; QEMU's reset handler ignores what it returns,
        so nothing is reported."""
        self.compute_needs_reset()
        try:
            self.hot_reset_multi()
        except VFIOError:
            pass

    # -- guest MMIO ----------------------------------------------------------------------------
    def mmio_read(self, nr: int, addr: int, size: int) -> int:
        """The guest reads a region: the mmap, else a trapped pread, which is an EOI."""
        region = self.regions[nr]
        if size not in _ACCESS_MASKS:
            raise VFIOError(f"vfio: unsupported read size, {size} bytes", errno.EINVAL)
        value = region.read_mapped(addr, size)
        if value is not None:
            return value
        try:
            data = region.pread(addr, size)
        except VFIOError as e:
            error_report(f"vfio_region_read({region.name}:{addr:#x}, {size}) failed: {os.strerror(e.errno)}")
            return _ACCESS_MASKS[size]
        self._platform_eoi()
        return int.from_bytes(data, "little")

    def mmio_write(self, nr: int, addr: int, value: int, size: int) -> None:
        """The guest writes a region; a trapped write is an EOI even when it fails."""
        region = self.regions[nr]
        if size not in _ACCESS_MASKS:
            raise VFIOError(f"vfio: unsupported write size, {size} bytes", errno.EINVAL)
        value &= _ACCESS_MASKS[size]
        if region.write_mapped(addr, value, size):
            return
        try:
            region.pwrite(addr, value.to_bytes(size, "little"))
        except VFIOError as e:
            error_report(f"vfio_region_write({region.name}:{addr:#x}, {value:#x}, {size}) failed: "
                         f"{os.strerror(e.errno)}")
        self._platform_eoi()

    # -- setup ---------------------------------------------------------------------------------
    def _init_intp(self, info: IRQInfo) -> VFIOINTp:
        """A trigger eventfd, and an unmask eventfd when the kernel masks the IRQ as it fires."""
        intp = VFIOINTp(info.index, info.flags)
        try:
            intp.interrupt = self.vbasedev.new_eventfd()
        except VFIOError as e:
            raise VFIOError("failed to initialize trigger eventfd notifier", e.errno) from e
        if intp.automasked:
            try:
                intp.unmask = self.vbasedev.new_eventfd()
            except VFIOError as e:
                self.vbasedev.free_eventfd(intp.interrupt)
                raise VFIOError("failed to initialize resample eventfd notifier", e.errno) from e
        self.intp_list.insert(0, intp)
        return intp

    def _free_intps(self) -> None:
        for intp in self.intp_list:
            self.machine.remove_irqfd(intp.interrupt)
            for fd in (intp.interrupt, intp.unmask):
                self.vbasedev.free_eventfd(fd)
        self.intp_list.clear()
        self.pending_intp_queue.clear()

    def _free_regions(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []

    def _free_mmap_timer(self) -> None:
        if self.mmap_timer:
            self.mmap_timer.delete()
            self.mmap_timer = None

    def _populate_device(self) -> None:
        """Regions, the mmap timer and the IRQs; a failure undoes the IRQs, then the regions."""
        dev = self.vbasedev
        if not dev.flags & self.bus_flag:
            raise VFIOError(self.wrong_bus, errno.EINVAL)
        with ExitStack() as unwind:
            unwind.callback(self._free_regions)
            for i in range(dev.num_regions):
                try:
                    info = dev.get_region_info(i)
                except VFIOError as e:
                    raise VFIOError(f"failed to get region {i} info", e.errno) from e
                self.regions.append(Region(dev, info, f"VFIO {self.name} region {i}"))
            self.mmap_timer = self.machine.new_timer(self._intp_mmap_enable)
            unwind.callback(self._free_intps)
            unwind.callback(self._free_mmap_timer)
            for i in range(dev.num_irqs):
                try:
                    info = dev.get_irq_info(i)
                except VFIOError as e:
                    raise VFIOError("failed to get device irq info", e.errno) from e
                trace("vfio_platform_populate_interrupts", pin=info.index, count=info.count, flags=info.flags)
                self._init_intp(info)
            unwind.pop_all()

    def _base_device_init(self, host: str | None, sysfsdev: str | None) -> None:
        """Name and sysfs path, the IOMMU group, then the device; a failure to populate it closes it."""
        if sysfsdev:
            self.sysfsdev = sysfsdev
            self.name = os.path.basename(sysfsdev.rstrip("/"))
        else:
            self.name = host
            if not host or "/" in host:
                raise VFIOError("wrong host device name", errno.EINVAL)
            self.sysfsdev = f"{self.bus_devices}/{host}"
        try:
            self.host.stat(self.sysfsdev)
        except OSError as e:
            raise VFIOError.from_oserror("failed to get the sysfs host device file status", e) from e
        groupid = iommu_group(self.host, self.sysfsdev)
        trace("vfio_platform_base_device_init", name=self.name, group=groupid)
        self.vbasedev = Device.attach(self.space, self.sysfsdev, self.name, groupid=groupid,
                                      already_attached="device is already attached")
        try:
            self._populate_device()
        except BaseException:
            self.vbasedev.close()
            self.vbasedev = None
            raise

    def _read_compat(self) -> None:
        path = f"{self.sysfsdev}/of_node/compatible"
        try:
            self.compat = self.host.read_text(path)
        except OSError as e:
            raise VFIOError.from_oserror(f"Failed to open file \u201c{path}\u201d", e) from e
        self.num_compat = count_compat(self.compat)

    def _map_regions(self) -> None:
        for region in self.regions:
            try:
                region.mmap()
            except VFIOError:
                warn(f"{region.name} mmap unsupported, performance may be slow")

    # -- realize / exit ------------------------------------------------------------------------
    @classmethod
    def realize(cls, space: AddressSpace, machine: Machine, *, host: str | None = None,
                sysfsdev: str | None = None, compat: str | None = None, x_no_mmap: bool = False,
                mmap_timeout_ms: int = 1100, x_irqfd: bool = True) -> "VFIOPlatformDevice":
        """vfio_platform_realize: every error says which device, and leaves nothing open."""
        if machine is not space.machine:
            raise VFIOError("vfio: the machine must be the address space's machine", errno.EINVAL)
        self = cls(space, machine, compat=compat, x_no_mmap=x_no_mmap, mmap_timeout_ms=mmap_timeout_ms,
                   x_irqfd=x_irqfd)
        trace("vfio_platform_realize", name=sysfsdev or host, compat=compat)
        try:
            with ExitStack() as unwind:
                self._base_device_init(host, sysfsdev)
                unwind.callback(self.exit)
                if self.compat is None:
                    self._read_compat()
                if not self.no_mmap:
                    self._map_regions()
                unwind.pop_all()
            machine.migration.vmstate_register(self.vmsd, self)
        except VFIOError as e:
            prefix = f"vfio {self.name}: " if self.name else "vfio error: "
            raise VFIOError(prefix + e.message, e.errno) from e
        return self

    @classmethod
    def from_options(cls, space: AddressSpace, machine: Machine, options: str) -> "VFIOPlatformDevice":
        """realize from a -device option string: host=NAME,sysfsdev=PATH,x-no-mmap=on,
        mmap-timeout-ms=N,x-irqfd=off."""
        kwargs: dict = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key in ("host", "sysfsdev"):
                kwargs[key] = value
            elif key in ("x-no-mmap", "x-irqfd"):
                if value.lower() not in _BOOLS:
                    raise VFIOError(f"Parameter '{key}' expects 'on' or 'off'", errno.EINVAL)
                kwargs[key.replace("-", "_")] = _BOOLS[value.lower()]
            elif key == "mmap-timeout-ms":
                if not value.isdigit() or int(value) > 0xFFFFFFFF:
                    raise VFIOError(f"Parameter '{key}' expects uint32_t", errno.EINVAL)
                kwargs["mmap_timeout_ms"] = int(value)
            else:
                raise VFIOError(f"Property '{cls.type_name}.{key}' not found", errno.EINVAL)
        return cls.realize(space, machine, **kwargs)

    def exit(self) -> None:
        """The reverse of realize: timer, irqfds and eventfds, mappings, then the device and group."""
        if self.vbasedev is None:
            return
        self.machine.migration.unregister_savevm(self)
        self._free_mmap_timer()
        self._free_intps()
        self._free_regions()
        self.vbasedev.close()
        self.vbasedev = None
        trace("vfio_platform_exit", name=self.name)

    def __enter__(self) -> "VFIOPlatformDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()


class VFIOAmbaDevice(VFIOPlatformDevice):
    """An ARM PrimeCell (PL031, PL061, ...) bound to Linux's vfio-amba, which the kernel reports
    with VFIO_DEVICE_FLAGS_AMBA. QEMU has no such device; its vfio-platform refuses the flag. The
    device's regions and IRQs are vfio-platform's, so only the bus differs."""

    vmsd = VMStateDescription("vfio-amba", unmigratable=True)
    type_name = "vfio-amba"
    bus_devices = AMBA_DEVICES
    bus_flag = uapi.VFIO_DEVICE_FLAGS_AMBA
    wrong_bus = "this isn't an AMBA device"
