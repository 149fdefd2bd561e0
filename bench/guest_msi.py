"""Figure 9, the guest side (run inside the real-runner VM by bench/vm.py): edu's MSI round
trip through vfio_impl against the same loop written with os and fcntl.ioctl alone.

A round trip raises edu's interrupt (0x60) with MSI enabled, waits for its eventfd and acks it
(0x64). The raw loop waits with a blocking read; vfio_impl waits in the Machine's loop, whose
handler reads the eventfd and delivers the MSI message. Two more sides are the raw loop with
an epoll wait before its read (the least any loop that waits on more than one fd can do) and
with a `selectors` select (what the Machine's loop does, as DESIGN builds it on selectors). The
last side makes each step of the raw loop a one-line Python function: what three calls cost
there, whatever they do. The group opens once at a time, so each side sets up, times its
round trips and tears down in turn. Last, the vfio_impl side runs once more under cProfile,
for where its time goes.

    python3 -m bench.guest_msi --json FILE [--device BDF] [--rounds N] [--repeats R]
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import functools
import json
import mmap
import os
import pstats
import select
import selectors
import struct
import time

from vfio_impl import AddressSpace, RealHost, uapi
from vfio_impl.flavours.pci import VFIOPCIDevice
from vfio_impl.vmm.machine import Machine

RAISE, ACK, EDU_IRQ = 0x60, 0x64, 0x1
PCI_COMMAND, MEMORY_MASTER = 0x04, 0x6
MSI_ADDRESS, MSI_DATA = 0xFEE00000, 0x4041
WAIT_S = 5.0
BAR0 = 1 << 20


def raw_round_trips(bdf: str, rounds: int, poller: str | None = None) -> float:
    """vfio's ioctls by hand: container, group, device, MSI onto an eventfd, BAR0 mmapped. The
    wait is a blocking read, or with `poller` ("epoll" or "selectors") a wait on the eventfd
    before the read, which is the least an event loop does. With "calls" the three steps are
    each a Python function of one line: the least any library's API costs."""
    group_nr = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group = os.open(f"/dev/vfio/{group_nr}", os.O_RDWR | os.O_CLOEXEC)
    efd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if poller else 0))
    wait = waiter = None
    if poller == "epoll":
        waiter = select.epoll()
        waiter.register(efd, select.EPOLLIN)
        wait = waiter.poll
    elif poller == "selectors":
        waiter = selectors.DefaultSelector()
        waiter.register(efd, selectors.EVENT_READ)
        wait = waiter.select
    try:
        fcntl.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("=i", container))
        fcntl.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        device = fcntl.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"), True)
        try:
            config = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
            command = int.from_bytes(os.pread(device, 2, config + PCI_COMMAND), "little")
            os.pwrite(device, (command | MEMORY_MASTER).to_bytes(2, "little"), config + PCI_COMMAND)
            # struct vfio_irq_set {argsz, flags, index, start, count} and one eventfd as its data.
            irq_set = struct.pack("=IIIIIi", 24, uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                                  uapi.VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd)
            fcntl.ioctl(device, uapi.VFIO_DEVICE_SET_IRQS, irq_set)
            with mmap.mmap(device, BAR0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0) as bar0:
                words = memoryview(bar0).cast("I")
                t0 = time.perf_counter()
                if poller == "calls":
                    _library_round_trips(words, efd, rounds)
                else:
                    for _ in range(rounds):
                        words[RAISE // 4] = EDU_IRQ
                        if wait:
                            wait(WAIT_S)
                        os.eventfd_read(efd)
                        words[ACK // 4] = EDU_IRQ
                took = time.perf_counter() - t0
                words.release()
        finally:
            os.close(device)
    finally:
        if waiter:
            waiter.close()
        os.close(efd)
        os.close(group)
        os.close(container)
    return took


def _library_round_trips(words: memoryview, efd: int, rounds: int) -> None:
    def raise_irq() -> None:
        words[RAISE // 4] = EDU_IRQ

    def wait_irq() -> int:
        return os.eventfd_read(efd)

    def ack_irq() -> None:
        words[ACK // 4] = EDU_IRQ

    for _ in range(rounds):
        raise_irq()
        wait_irq()
        ack_irq()


def vfio_impl_round_trips(bdf: str, rounds: int) -> float:
    """The PCI flavour as a guest drives it: MSI enabled in the emulated capability, BAR
    accesses through bar_write, the interrupt taken by the Machine's loop."""
    machine = Machine()
    with AddressSpace(RealHost(), machine) as space, \
            VFIOPCIDevice.realize(space, machine, host=bdf, x_kvm_intx=False) as edu:
        edu.config_write(PCI_COMMAND, MEMORY_MASTER, 2)
        edu.config_write(edu.msi_cap + 4, MSI_ADDRESS, 4)
        edu.config_write(edu.msi_cap + 8, 0, 4)
        edu.config_write(edu.msi_cap + 12, MSI_DATA, 2)
        edu.config_write(edu.msi_cap + 2, 0x1, 2)
        messages = machine.msi_messages
        t0 = time.perf_counter()
        for _ in range(rounds):
            before = len(messages)
            edu.bar_write(0, RAISE, EDU_IRQ, 4)
            while len(messages) == before:
                if not machine.poll(WAIT_S):
                    raise TimeoutError(f"edu's MSI did not arrive in {WAIT_S} s")
            edu.bar_write(0, ACK, EDU_IRQ, 4)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.guest_msi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    parser.add_argument("--device", default=(os.environ.get("VFIO_REAL_DEVICES") or "0000:00:03.0").split()[0],
                        metavar="BDF", help="edu bound to vfio-pci (default: the first of $VFIO_REAL_DEVICES)")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sides = {"vfio_impl": vfio_impl_round_trips, "raw": raw_round_trips,
             "raw_epoll": functools.partial(raw_round_trips, poller="epoll"),
             "raw_selectors": functools.partial(raw_round_trips, poller="selectors"),
             "raw_calls": functools.partial(raw_round_trips, poller="calls")}
    for side in sides.values():
        side(args.device, max(1, args.rounds // 10))
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (sides if r % 2 == 0 else reversed(sides)):
            rates[name].append(args.rounds / sides[name](args.device, args.rounds))
    ratios = {name: [rate / raw for rate, raw in zip(rates[name], rates["raw"])] for name in sides if name != "raw"}
    with open(args.json, "w") as out:
        json.dump({"device": args.device, "rounds": args.rounds, "ratios": ratios, "rates": rates,
                   "profile": profile(args.device, args.rounds)}, out, indent=2)
    for name, values in ratios.items():
        print(f"guest_msi: {name}/raw MSI rate ratios {', '.join(f'{v:.3f}' for v in values)}")
    return 0


def profile(bdf: str, rounds: int, top: int = 12) -> list[dict]:
    """The vfio_impl side's round trips under cProfile: the functions with the most time of
    their own, as shares of the whole."""
    profiler = cProfile.Profile()
    profiler.runcall(vfio_impl_round_trips, bdf, rounds)
    stats = pstats.Stats(profiler).stats
    total = sum(own for _, _, own, _, _ in stats.values())
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": f"{os.path.basename(file)}:{line}({name})", "calls": calls, "own": own / total,
             "cumulative": cumulative / total} for (file, line, name), (_, calls, own, cumulative, _) in rows]


if __name__ == "__main__":
    raise SystemExit(main())
