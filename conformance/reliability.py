"""Fault walks: every kernel call a setup path makes fails once, in turn, and each failure must end
in a clean error with nothing left behind.

A walk runs the path once cleanly while the fake kernel records its calls, then once per call
with that call failing (`fakekernel.faults`), and after each run it counts what is left: process
fds, the kernel's files, mmaps, DMA mappings, group and device references and watched eventfds,
and on the driver's side groups, containers, listeners, fd handlers and irqfds. The QEMU seeds
unwind every partial setup in reverse order; a walk proves the Python does too.

`walk(path)` works for any setup function, so a VMM can walk its own:

    path = SetupPath("my-realize", Topology.default, setup=lambda rig: rig.later(my_realize(rig.space).close))
    result = walk(path)
    assert result.clean, result.render()
"""

from __future__ import annotations

import _posixshmem
import argparse
import errno
import fcntl
import logging
import os
import re
import sys
import termios
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fakekernel import FakeKernel, PciDeviceSpec, Topology, devices, pci
from fakekernel.faults import Call, Fault, Injector, census, leaks
from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace, Group
from vfio_impl.core.device import Device
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.flavours.pci import VFIOPCIDevice
from vfio_impl.flavours.platform import VFIOPlatformDevice
from vfio_impl.ivshmem.client import IvshmemClient
from vfio_impl.ivshmem.protocol import MESSAGE_SIZE
from vfio_impl.ivshmem.server import IvshmemServer
from vfio_impl.uapi import pci_regs
from vfio_impl.vmm import ivshmem as ivshmem_model
from vfio_impl.vmm.css import ChannelSubsystem
from vfio_impl.vmm.machine import Machine, VirtualClock

# The errno each kind of call fails with: what Linux answers when it runs out of something or a
# device goes away. Retries on EINTR, EAGAIN and EBUSY are proven separately, by their own faults.
ERRNOS = {"open": errno.EMFILE, "eventfd": errno.EMFILE, "mmap": errno.ENOMEM, "readlink": errno.ENOENT,
          "listdir": errno.ENOENT, "read_text": errno.ENOENT, "write_text": errno.ENOENT, "exists": errno.ENOENT,
          "stat": errno.ENOENT,
          "socket.socket": errno.EMFILE, "socket.connect": errno.ECONNREFUSED, "socket.recv_fds": errno.ECONNRESET,
          "mmap.mmap": errno.ENOMEM, "_posixshmem.shm_open": errno.EACCES, "os.ftruncate": errno.ENOSPC,
          "os.stat": errno.ENOENT}
DEFAULT_ERRNO = errno.EIO
# close is not a fault point: Linux releases the fd whatever close returns, and the release of a
# VFIO file or an eventfd cannot fail.
NOT_WALKED = frozenset({"close", "os.close"})
# Process addresses (a RAM area's vaddr in a vfio_dma_map message) differ from run to run.
_VADDR = re.compile(r"0x[0-9a-f]{9,}")


def process_fds() -> dict[int, str]:
    """This process's open fds and what each is, as /proc/self/fd names it."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds


def driver_refs(space: AddressSpace) -> dict[str, object]:
    """What vfio_impl itself holds: groups and containers of the address space, and the machine's
    listeners, fd handlers, irqfds, MSI routes and armed timers."""
    machine = space.machine
    return {"groups": sorted(space.groups), "containers": len(space.containers), "listeners": len(machine.listeners),
            "fd handlers": len(machine.fd_handlers), "irqfds": len(machine.irqfds),
            "msi routes": len(machine.msi_routes), "timers": machine.next_deadline() is not None}


class Rig:
    """A machine on a virtual clock and its address space over the walk's kernel; `later`
    registers what undoes a step, run in reverse by close()."""

    def __init__(self, kernel: FakeKernel, irqfd: bool = False):
        self.kernel = kernel
        self.machine = Machine(VirtualClock(), irqfd=irqfd)
        self.space = AddressSpace(kernel, self.machine)
        self.objects: dict[str, object] = {}
        self._stack = ExitStack()

    def later(self, fn: Callable, *args) -> None:
        self._stack.callback(fn, *args)

    def teardown(self) -> dict[str, object]:
        """Undo every step; returns what the driver still holds, before the machine goes."""
        self._stack.close()
        refs = driver_refs(self.space)
        self.machine.close()
        return refs


class ProcessCalls(Injector):
    """A module's own syscalls, for code that is not a Host's user (the ivshmem device model owns
    its socket, shared memory and eventfds): while installed, the module's os, socket, mmap and
    _posixshmem are stand-ins whose syscalls are recorded and failed with the same Fault rules as
    the fake kernel's, each named "module.function"; a socket it makes has its connect watched."""

    SYSCALLS = {"os": ("close", "ftruncate", "fstat", "stat", "eventfd_read", "eventfd_write", "memfd_create",
                       "read", "write"),
                "socket": ("socket", "recv_fds", "send_fds"), "mmap": ("mmap",),
                "_posixshmem": ("shm_open", "shm_unlink")}

    def __init__(self, module):
        super().__init__()
        self.module = module
        self._saved: dict[str, object] = {}

    def install(self) -> None:
        for name in self.SYSCALLS:
            self._saved[name] = vars(self.module)[name]
            setattr(self.module, name, _Syscalls(self._saved[name], self, name))

    def uninstall(self) -> None:
        for name, real in self._saved.items():
            setattr(self.module, name, real)
        self._saved.clear()

    def call(self, kind: str, fn: Callable, args: tuple, detail: str = ""):
        call = Call(self._next_seq(), kind, path=detail)
        rule = self._answering(call)
        if rule is not None:
            raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected at {call.name})")
        return fn(*args)


class _Syscalls:
    """A module (os, socket, ...) whose syscalls go through ProcessCalls; the rest is the module's."""

    def __init__(self, real, calls: ProcessCalls, name: str):
        self._real, self._calls, self._name = real, calls, name

    def __getattr__(self, attr: str):
        value = getattr(self._real, attr)
        if attr not in ProcessCalls.SYSCALLS[self._name]:
            return value
        kind = f"{self._name}.{attr}"

        def syscall(*args):
            detail = args[0] if args and isinstance(args[0], str) else ""
            result = self._calls.call(kind, value, args, detail)
            return _WatchedSocket(result, self._calls) if kind == "socket.socket" else result
        return syscall


class _WatchedSocket:
    """A socket whose connect is a syscall the walk sees; everything else is the socket's own."""

    def __init__(self, sock, calls: ProcessCalls):
        self._sock, self._calls = sock, calls

    def connect(self, address) -> None:
        self._calls.call("socket.connect", self._sock.connect, (address,))

    def __getattr__(self, attr: str):
        return getattr(self._sock, attr)


@dataclass
class SetupPath:
    """One setup path: `prepare` builds what it needs (not walked), `setup` is the walked part,
    and `undo`, when given, must bring the kernel back to where `prepare` left it. Everything
    either registers its teardown with rig.later()."""

    name: str
    topology: Callable[[], Topology]
    setup: Callable[[Rig], object]
    prepare: Callable[[Rig], object] = lambda rig: None
    undo: Callable[[Rig], object] | None = None
    irqfd: bool = False
    normalize: Callable[[str], str] = lambda text: text
    # Where the calls are made: the fake kernel's Host by default, or a module's own syscalls.
    calls: "ProcessCalls | None" = None
    # What else to count besides the kernel and this process's fds.
    census: Callable[[], dict] = dict


@dataclass
class Point:
    """One failed call and how the path took it: `raises` a VFIOError, `reports` an error or a
    warning and carries on degraded, `absorbs` it silently (a fallback QEMU takes too), or
    `crashes` with another exception; `leaks` is whatever it left behind."""

    index: int
    call: str
    errno: int
    outcome: str
    message: str
    hits: int = 1
    leaks: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.outcome in ("raises", "reports", "absorbs") and self.hits == 1 and not self.leaks

    def line(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        text = f"{self.index:>3} {self.call:<66} {name:<7} {self.outcome:<8} {self.message}".rstrip()
        if self.hits != 1:
            text += f"  !! the fault fired {self.hits} times"
        if self.leaks:
            text += f"  !! LEAKED {self.leaks}"
        return text


@dataclass
class Walk:
    path: str
    calls: list[str]
    points: list[Point]
    baseline_leaks: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.baseline_leaks and all(p.clean for p in self.points)

    @property
    def leaks(self) -> int:
        return sum(1 for p in self.points if p.leaks) + bool(self.baseline_leaks)

    def render(self) -> str:
        lines = [f"[{self.path}]"]
        if self.baseline_leaks:
            lines.append(f"  !! the clean run LEAKED {self.baseline_leaks}")
        lines += [p.line() for p in self.points]
        return "\n".join(lines)

    def figures(self) -> dict:
        outcomes: dict[str, int] = {}
        for p in self.points:
            outcomes[p.outcome] = outcomes.get(p.outcome, 0) + 1
        return {"kind": "walk", "path": self.path, "points": len(self.points),
                "clean": sum(p.clean for p in self.points), "leaks": self.leaks, "outcomes": outcomes}


def _snapshot(kernel: FakeKernel, path: SetupPath) -> dict[str, object]:
    """The process's fds by what they are, not by number: the fake kernel's own reference to an
    eventfd (its dup) may come back on another number, which is no leak."""
    return {**census(kernel), "process fds": sorted(process_fds().values()), **path.census()}


def _calls(kernel: FakeKernel, path: SetupPath):
    return path.calls if path.calls is not None else kernel.faults


def _reports(recorder: TraceRecorder) -> list[str]:
    return [f["message"] for e, f in recorder.events if e in ("error", "warning")]


def walk(path: SetupPath) -> Walk:
    """Record the path's calls on a clean run, then fail each in turn; see the module docstring.

    A point that leaks poisons the kernel for the next, so the walk goes on with a new one."""
    kernel = FakeKernel(path.topology())
    try:
        if path.calls is not None:
            path.calls.install()
        baseline, calls, expected, clean_leaks = _clean_run(kernel, path)
        if clean_leaks:
            return Walk(path.name, [], [], clean_leaks)
        walked = [(position, c) for position, c in enumerate(calls, 1) if c.kind not in NOT_WALKED]
        result = Walk(path.name, [path.normalize(c.name) for _, c in walked], [], clean_leaks)
        for index, (position, call) in enumerate(walked, 1):
            point = _fail_one(kernel, path, baseline, expected, position, call)
            point.index = index
            result.points.append(point)
            if point.leaks:
                kernel.close_all()
                kernel = FakeKernel(path.topology())
                baseline = _clean_run(kernel, path)[0]
        return result
    finally:
        if path.calls is not None:
            path.calls.uninstall()
        kernel.close_all()


def _clean_run(kernel: FakeKernel, path: SetupPath) -> tuple[dict, list, list[str], dict]:
    """Once to warm up what the kernel starts on first use (its worker thread), then the baseline,
    then once recorded: the calls, the reports a clean run makes anyway, and what it left. A
    warm-up that leaves something in the kernel or the driver ends the walk there."""
    before = census(kernel)
    rig = Rig(kernel, path.irqfd)
    path.prepare(rig)
    path.setup(rig)
    refs = rig.teardown()
    left = _left_behind(before, census(kernel), refs)
    if left:
        return {}, [], [], left
    baseline = _snapshot(kernel, path)
    rig = Rig(kernel, path.irqfd)
    path.prepare(rig)
    with _calls(kernel, path).record() as calls, TraceRecorder() as trace:
        path.setup(rig)
    refs = rig.teardown()
    return baseline, calls, _reports(trace), _left_behind(baseline, _snapshot(kernel, path), refs)


def _fail_one(kernel: FakeKernel, path: SetupPath, baseline: dict, expected: list[str], position: int,
              call) -> Point:
    """The path run with the call at `position` failing, judged and then torn down and counted."""
    code = ERRNOS.get(call.kind, DEFAULT_ERRNO)
    point = Point(0, path.normalize(call.name), code, "", "")
    rig = Rig(kernel, path.irqfd)
    path.prepare(rig)
    prepared = _snapshot(kernel, path)
    rule = Fault("*", nth=position, errno=code)
    with _calls(kernel, path).inject(rule), TraceRecorder() as trace:
        try:
            path.setup(rig)
        except VFIOError as e:
            point.outcome, point.message = "raises", f"[{e.errno_name}] {e.message}"
        except Exception as e:  # noqa: BLE001 - anything else is the finding
            point.outcome, point.message = "crashes", f"{type(e).__name__}: {e}"
        else:
            new = [m for m in _reports(trace) if m not in expected]
            point.outcome = "reports" if new else "absorbs"
            point.message = " | ".join(new)
    point.hits = rule.hits
    point.message = path.normalize(_VADDR.sub("0x<vaddr>", point.message))
    try:
        if path.undo is not None:
            path.undo(rig)
            point.leaks.update(leaks(prepared, _snapshot(kernel, path)))
        refs = rig.teardown()
    except Exception as e:  # noqa: BLE001 - a teardown that fails leaves the rest behind
        point.leaks["teardown"] = f"{type(e).__name__}: {e}"
        refs = {}
    point.leaks.update(_left_behind(baseline, _snapshot(kernel, path), refs))
    return point


def _left_behind(baseline: dict, after: dict, refs: dict) -> dict:
    found = leaks(baseline, after)
    found.update({k: v for k, v in refs.items() if v})
    return found


# -- vfio_impl's setup paths ----------------------------------------------------------------------
PAGE = os.sysconf("SC_PAGE_SIZE")
GUEST_RAM = ((0x100000, 4 * PAGE, False), (0x200000, PAGE, True))
EDU, E1000E, IVSHMEM, ROM_MSI = "0000:00:03.0", "0000:01:00.0", "0000:00:04.0", "0000:02:00.0"
PLATFORM = "c0000000.platform-test"
CCW_MDEV = "/sys/bus/mdev/devices/8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
MSI_ADDRESS, MSI_DATA = 0xFEE01000, 0x4041
# <linux/pci_regs.h> offsets the guest's programming needs and the uapi layer has no use for.
PCI_MSI_ADDRESS_LO, PCI_MSI_DATA_64, PCI_MSIX_ENTRY_LOWER_ADDR = 4, 12, 0


class RomMsiFunction(pci.PciFunction):
    """What the catalog's devices lack and the setup paths have steps for: an option ROM and
    four MSI vectors with per-vector masking."""

    vendor_id, device_id = 0x1B36, 0x0010
    interrupt_pin = 1
    reset_works = True

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, pci.Bar(0x1000))
        self.add_msi(0x50, vectors_log2=2, is_64bit=True, maskbit=True)
        self.set_rom(b"\x55\xaa" + bytes(range(256)) * 8, 0x1000)


devices.CATALOG.setdefault("rom-msi-test", RomMsiFunction)


def pci_topology() -> Topology:
    return Topology([PciDeviceSpec(EDU, "edu", 3), PciDeviceSpec(IVSHMEM, "ivshmem", 4),
                     PciDeviceSpec(E1000E, "e1000e", 9), PciDeviceSpec(ROM_MSI, "rom-msi-test", 10)], "reliability")


def add_guest_ram(rig: Rig) -> None:
    for gpa, size, readonly in GUEST_RAM:
        area = rig.machine.add_ram(gpa, size, readonly)
        rig.later(_remove_ram, rig.machine, area)


def _remove_ram(machine: Machine, area) -> None:
    if area in machine.ram:
        machine.remove_ram(area)


def attach(rig: Rig, bdf: str) -> Device:
    device = Device.attach(rig.space, f"/sys/bus/pci/devices/{bdf}")
    rig.later(device.close)
    return device


def realize_pci(rig: Rig, bdf: str) -> VFIOPCIDevice:
    dev = VFIOPCIDevice.realize(rig.space, rig.machine, host=bdf)
    rig.later(dev.exit)
    rig.objects["pci"] = dev
    return dev


def get_group(rig: Rig, groupid: int) -> Group:
    group = Group.get(rig.space, groupid)
    rig.later(group.put)
    return group


def map_bars(rig: Rig) -> None:
    device = rig.objects["device"]
    for index in range(uapi.VFIO_PCI_ROM_REGION_INDEX):
        device.region(index).mmap()


def enable_msi(rig: Rig) -> None:
    """The guest programs four MSI vectors and sets ENABLE."""
    dev = rig.objects["pci"]
    pos = dev.msi_cap
    dev.config_write(pos + PCI_MSI_ADDRESS_LO, MSI_ADDRESS, 4)
    dev.config_write(pos + PCI_MSI_DATA_64, MSI_DATA, 2)
    dev.config_write(pos + pci_regs.PCI_MSI_FLAGS, pci_regs.PCI_MSI_FLAGS_ENABLE | (2 << 4), 2)


def disable_msi(rig: Rig) -> None:
    dev = rig.objects["pci"]
    dev.config_write(dev.msi_cap + pci_regs.PCI_MSI_FLAGS, 0, 2)


def enable_msix(rig: Rig) -> None:
    """The guest sets ENABLE, then programs and unmasks vectors 0 and 1."""
    dev = rig.objects["pci"]
    msix = dev.msix
    dev.config_write(msix.cap + pci_regs.PCI_MSIX_FLAGS, pci_regs.PCI_MSIX_FLAGS_ENABLE, 2)
    for nr in (0, 1):
        entry = msix.table_offset + nr * pci_regs.PCI_MSIX_ENTRY_SIZE
        dev.bar_write(msix.table_bar, entry + PCI_MSIX_ENTRY_LOWER_ADDR, MSI_ADDRESS, 4)
        dev.bar_write(msix.table_bar, entry + pci_regs.PCI_MSIX_ENTRY_DATA, MSI_DATA + nr, 4)
        dev.bar_write(msix.table_bar, entry + pci_regs.PCI_MSIX_ENTRY_VECTOR_CTRL, 0, 4)


def disable_msix(rig: Rig) -> None:
    dev = rig.objects["pci"]
    dev.config_write(dev.msix.cap + pci_regs.PCI_MSIX_FLAGS, 0, 2)


def realize_platform(rig: Rig) -> VFIOPlatformDevice:
    dev = VFIOPlatformDevice.realize(rig.space, rig.machine, host=PLATFORM)
    rig.later(dev.exit)
    rig.objects["platform"] = dev
    return dev


def connect_platform_irqs(rig: Rig) -> None:
    dev = rig.objects["platform"]
    for intp in dev.irqs:
        dev.connect_irq(intp.pin, f"spi {32 + intp.pin}")


def realize_ccw(rig: Rig) -> VFIOCCWDevice:
    dev = VFIOCCWDevice.realize(rig.space, rig.machine, sysfsdev=CCW_MDEV, css=ChannelSubsystem())
    rig.later(dev.unrealize)
    return dev


def _then(*steps: Callable[[Rig], object]) -> Callable[[Rig], None]:
    def run(rig: Rig) -> None:
        for step in steps:
            step(rig)
    return run


def _remove_all_ram(rig: Rig) -> None:
    for area in list(rig.machine.ram):
        rig.machine.remove_ram(area)


PATHS = [
    SetupPath("group get (new container, listener replay)", pci_topology,
              setup=lambda rig: get_group(rig, 3), prepare=add_guest_ram),
    SetupPath("container connect (a second group joins)", lambda: Topology.named("two-groups"),
              prepare=_then(add_guest_ram, lambda rig: get_group(rig, 3)), setup=lambda rig: get_group(rig, 4)),
    SetupPath("device get", pci_topology, setup=lambda rig: attach(rig, EDU)),
    SetupPath("region setup and mmap (e1000e BARs)", pci_topology,
              prepare=lambda rig: rig.objects.update(device=attach(rig, E1000E)), setup=map_bars),
    SetupPath("DMA listener (RAM added, then removed)", pci_topology,
              prepare=lambda rig: attach(rig, EDU), setup=add_guest_ram, undo=_remove_all_ram),
    SetupPath("vfio-pci realize: edu (INTx through the irqfd path)", pci_topology,
              prepare=add_guest_ram, setup=lambda rig: realize_pci(rig, EDU), irqfd=True),
    SetupPath("vfio-pci realize: ivshmem-plain (RAM BAR)", pci_topology,
              setup=lambda rig: realize_pci(rig, IVSHMEM)),
    SetupPath("vfio-pci realize: e1000e (MSI-X, I/O BAR)", pci_topology,
              setup=lambda rig: realize_pci(rig, E1000E)),
    SetupPath("vfio-pci realize: ROM and 4-vector MSI", pci_topology,
              setup=lambda rig: realize_pci(rig, ROM_MSI)),
    SetupPath("MSI enable (4 vectors)", pci_topology,
              prepare=lambda rig: realize_pci(rig, ROM_MSI), setup=enable_msi, undo=disable_msi),
    SetupPath("MSI-X enable (vectors 0 and 1)", pci_topology,
              prepare=lambda rig: realize_pci(rig, E1000E), setup=enable_msix, undo=disable_msix),
    SetupPath("MSI enable (4 vectors, KVM routes)", pci_topology,
              prepare=lambda rig: realize_pci(rig, ROM_MSI), setup=enable_msi, undo=disable_msi, irqfd=True),
    SetupPath("MSI-X enable (vectors 0 and 1, KVM routes)", pci_topology,
              prepare=lambda rig: realize_pci(rig, E1000E), setup=enable_msix, undo=disable_msix, irqfd=True),
    SetupPath("vfio-platform realize", lambda: Topology.named("platform"), setup=realize_platform),
    SetupPath("vfio-platform IRQ setup (user-space injection)", lambda: Topology.named("platform"),
              prepare=realize_platform, setup=connect_platform_irqs),
    SetupPath("vfio-platform IRQ setup (irqfd with resample)", lambda: Topology.named("platform"),
              prepare=realize_platform, setup=connect_platform_irqs, irqfd=True),
    SetupPath("vfio-ccw realize", lambda: Topology.named("ccw"), prepare=add_guest_ram, setup=realize_ccw),
]


# -- ivshmem: the VMM's own device, whose syscalls are its own ---------------------------------------------
IVSHMEM_CALLS = ProcessCalls(ivshmem_model)
IVSHMEM_PREFIX = "vfio-reliability-"
IVSHMEM_NAME = f"{IVSHMEM_PREFIX}{os.getpid()}"
IVSHMEM_SOCKET = f"/tmp/{IVSHMEM_NAME}.sock"


def ivshmem_normalize(text: str) -> str:
    """This run's socket, shm name and fd numbers out of a call or a message."""
    return re.sub(r"fd \d+", "fd N", text.replace(IVSHMEM_SOCKET, "<socket>").replace(IVSHMEM_NAME, "<shm>"))


def ivshmem_census() -> dict:
    """The shm objects a walk made and the mappings of them this process holds."""
    with open("/proc/self/maps") as maps:
        mapped = sum(IVSHMEM_NAME in line for line in maps)
    return {"shm objects": sorted(n for n in os.listdir("/dev/shm") if n == IVSHMEM_NAME), "shm maps": mapped}


def _forget_shm(rig: Rig) -> None:
    """The object outlives the device, as in QEMU; the VMM's user removes it."""
    def unlink() -> None:
        if os.path.exists(f"/dev/shm/{IVSHMEM_NAME}"):
            _posixshmem.shm_unlink(IVSHMEM_NAME)
    rig.later(unlink)


def realize_ivshmem_shm(rig: Rig) -> None:
    dev = ivshmem_model.IVShmemState.realize(rig.machine, shm=IVSHMEM_NAME, size="1M")
    rig.later(dev.exit)


def serve_ivshmem(rig: Rig) -> None:
    """A server with one peer already there, both torn down last."""
    server = IvshmemServer(IVSHMEM_SOCKET, vectors=2, size=1 << 20)
    server.__enter__()
    rig.later(server.__exit__, None, None, None)
    peer = IvshmemClient(IVSHMEM_SOCKET, vectors=2).connect()
    rig.later(peer.close)


# What the server sends a newcomer when one peer is there: version, id, memory, the peer's two
# vectors and our own two.
IVSHMEM_SETUP = 7 * MESSAGE_SIZE


def realize_ivshmem_server(rig: Rig) -> None:
    """Realize, wait until the whole setup is queued on the socket (so the device reads it in one
    go and the calls are the same every run), then let the loop hand it to the device."""
    dev = ivshmem_model.IVShmemState.realize(rig.machine, chardev=IVSHMEM_SOCKET, vectors=2)
    rig.later(dev.exit)
    pending = bytearray(4)
    deadline = time.monotonic() + 5
    while dev.server is not None and time.monotonic() < deadline:
        fcntl.ioctl(dev.server.fileno(), termios.FIONREAD, pending)
        if int.from_bytes(pending, sys.byteorder) >= IVSHMEM_SETUP:
            break
        time.sleep(0.001)
    rig.machine.poll(0)


PATHS += [
    SetupPath("ivshmem realize (shm=)", Topology.default, prepare=_forget_shm, setup=realize_ivshmem_shm,
              calls=IVSHMEM_CALLS, census=ivshmem_census, normalize=ivshmem_normalize),
    SetupPath("ivshmem realize (chardev=, a server with a peer)", Topology.default, prepare=serve_ivshmem,
              setup=realize_ivshmem_server, calls=IVSHMEM_CALLS, census=ivshmem_census, normalize=ivshmem_normalize),
]


# -- the pinned table and the report's figures ------------------------------------------------------
TABLE = Path(__file__).with_name("fault_points.txt")
TABLE_HEADER = """\
# Every kernel call of vfio_impl's setup paths, failed one at a time by conformance/areas/test_reliability.py.
# Columns: point, the call, the errno injected, how the path took it (raises a VFIOError, reports an
# error and carries on degraded, or absorbs it as QEMU does), and the message. A path that gains,
# loses or reorders a call, or words a failure differently, fails its test until this table is
# regenerated and the difference reviewed:  python3 -m conformance.reliability --write
"""


def render_table(walks: list[Walk]) -> str:
    return TABLE_HEADER + "".join(f"\n{w.render()}\n" for w in walks)


def read_table(text: str) -> dict[str, list[str]]:
    """The pinned lines of each path, by path name."""
    sections: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            lines = sections.setdefault(line[1:-1], [])
        elif line.strip() and not line.startswith("#"):
            lines.append(line)
    return sections


def summarize(records: list[dict]) -> dict:
    """The report's reliability section from the figures tests recorded: fault walks, fuzz
    targets and hostile-client scenarios, with the leaks each found."""
    walks = [r for r in records if r.get("kind") == "walk"]
    fuzz = [r for r in records if r.get("kind") == "fuzz"]
    hostile = [r for r in records if r.get("kind") == "hostile"]
    return {
        "injection_points": sum(r["points"] for r in walks),
        "injection_points_clean": sum(r["clean"] for r in walks),
        "setup_paths": sorted((r for r in walks), key=lambda r: r["path"]),
        "fuzz_examples": sum(r["examples"] for r in fuzz),
        "fuzz_targets": {r["target"]: r["examples"] for r in sorted(fuzz, key=lambda r: r["target"])},
        "hostile_clients": {r["scenario"]: {k: v for k, v in r.items() if k not in ("kind", "scenario")}
                            for r in sorted(hostile, key=lambda r: r["scenario"])},
        "leaks": sum(r.get("leaks", 0) for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m conformance.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.name} with what the walks find")
    parser.add_argument("-k", metavar="TEXT", default="", help="only the paths whose name contains TEXT")
    args = parser.parse_args(argv)
    # Every failure is reported on purpose; the table says which, the log need not.
    logging.getLogger("vfio").setLevel(logging.CRITICAL)
    walks = [walk(p) for p in PATHS if args.k in p.name]
    table = render_table(walks)
    if args.write:
        TABLE.write_text(table)
    print(table, end="")
    return 0 if all(w.clean for w in walks) else 1


if __name__ == "__main__":
    sys.exit(main())

