"""vfio-info: one device from VFIO's point of view, in the spirit of lspci -vv."""

from __future__ import annotations

import argparse
import sys

from . import uapi
from .container import AddressSpace
from .device import Device
from .errors import VFIOError
from .host import Host, RealHost

PCI_DEVICES = "/sys/bus/pci/devices"


def _flag_names(value: int, prefix: str) -> str:
    names = [n.removeprefix(prefix) for n, v in uapi.CONSTANTS.items()
             if n.startswith(prefix) and v and v & (v - 1) == 0 and value & v]
    return "|".join(names) or "0"


REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "config", 8: "VGA"}
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}


def describe(host: Host, device: str) -> str:
    sysfs = device if device.startswith("/") else f"{PCI_DEVICES}/{device}"
    lines = []
    with AddressSpace(host) as space:
        dev = Device.attach(space, sysfs)
        lines.append(f"{dev.name}: flags {_flag_names(dev.flags, 'VFIO_DEVICE_FLAGS_')}, "
                     f"{dev.num_regions} regions, {dev.num_irqs} irqs")
        for index in range(dev.num_regions):
            try:
                info = dev.get_region_info(index)
            except VFIOError as e:
                lines.append(f"  region {index} ({REGION_NAMES.get(index, '?')}): {e}")
                continue
            lines.append(f"  region {index} ({REGION_NAMES.get(index, '?')}): size {info.size:#x} offset {info.offset:#x} "
                         f"flags {_flag_names(info.flags, 'VFIO_REGION_INFO_FLAG_')}")
            lines += [f"    cap {cap}" for cap in info.caps]
        for index in range(dev.num_irqs):
            try:
                irq = dev.get_irq_info(index)
            except VFIOError as e:
                lines.append(f"  irq {index} ({IRQ_NAMES.get(index, '?')}): {e.message} ({e.errno_name})")
                continue
            lines.append(f"  irq {index} ({IRQ_NAMES.get(index, '?')}): count {irq.count} "
                         f"flags {_flag_names(irq.flags, 'VFIO_IRQ_INFO_')}")
        group = dev.group.groupid
        lines.append(f"  iommu group {group}:")
        for member in host.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
            try:
                driver = host.readlink(f"{PCI_DEVICES}/{member}/driver").rsplit("/", 1)[-1]
            except OSError:
                driver = "(no driver)"
            lines.append(f"    {member} driver {driver}")
        info = dev.group.container.get_info()
        lines.append(f"  iommu: pgsizes {info.iova_pgsizes:#x}")
        lines += [f"    cap {cap}" for cap in info.caps]
        dev.close()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vfio-info", description=__doc__)
    parser.add_argument("--backend", choices=("fake", "real"), default="real")
    parser.add_argument("--topology", default="default", help="fake kernel topology")
    parser.add_argument("device", help="BDF (0000:00:03.0) or sysfs path")
    args = parser.parse_args(argv)
    try:
        if args.backend == "fake":
            from fakekernel import FakeKernel

            with FakeKernel(args.topology) as kernel:
                print(describe(kernel, args.device))
        else:
            print(describe(RealHost(), args.device))
    except VFIOError as e:
        print(f"vfio-info: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
