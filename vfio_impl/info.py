"""vfio-info: one device from VFIO's point of view, in the spirit of lspci -vv."""

from __future__ import annotations

import argparse
import errno
import sys

from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.device import Device
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host, RealHost
from vfio_impl.core.pciaddr import PCI_DEVICES, sysfs_path


def _flag_names(value: int, prefix: str) -> str:
    names = [n.removeprefix(prefix) for n, v in uapi.CONSTANTS.items()
             if n.startswith(prefix) and v and v & (v - 1) == 0 and value & v]
    return "|".join(names) or "0"


REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "config", 8: "VGA"}
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
CONFIG_REGION = 7
CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific", 0x0D: "Bridge Subsystem Vendor",
             0x10: "PCI Express", 0x11: "MSI-X", 0x12: "SATA", 0x13: "Advanced Features"}
EXT_CAP_NAMES = {0x01: "Advanced Error Reporting", 0x02: "Virtual Channel", 0x03: "Device Serial Number",
                 0x0B: "Vendor Specific", 0x0D: "Access Control Services", 0x0E: "ARI", 0x10: "SR-IOV",
                 0x15: "Resizable BAR", 0x18: "Latency Tolerance Reporting", 0x1E: "L1 PM Substates"}
# An optional region or IRQ index the device does not have answers EINVAL (VGA on a non-VGA
# device, ERR on conventional PCI), or reports nothing: not an error worth a line of its own.
NOT_PRESENT = "not present"


def capabilities(dev: Device) -> list[str]:
    """The capability list as config space links it: standard from 0x34, extended from 0x100."""
    info = dev.get_region_info(CONFIG_REGION)
    config = dev.space.host.pread(dev.fd, info.size, info.offset)
    found = []
    at, seen = config[0x34] & ~3 if config[0x06] & 0x10 else 0, set()
    while at and at not in seen and at + 1 < min(len(config), 0x100):
        seen.add(at)
        found.append(f"[{at:02x}] {CAP_NAMES.get(config[at], f'id {config[at]:#04x}')}")
        at = config[at + 1] & ~3
    at = 0x100 if len(config) > 0x100 else 0
    while at and at not in seen and at + 4 <= len(config):
        seen.add(at)
        header = int.from_bytes(config[at:at + 4], "little")
        if header in (0, 0xFFFFFFFF):
            break
        found.append(f"[{at:03x}] {EXT_CAP_NAMES.get(header & 0xFFFF, f'extended id {header & 0xFFFF:#06x}')}")
        at = (header >> 20) & ~3
    return found


def describe(host: Host, device: str) -> str:
    sysfs = sysfs_path(device)
    lines = []
    with AddressSpace(host) as space:
        dev = Device.attach(space, sysfs)
        ids = ":".join(f"{int(host.read_text(f'{sysfs}/{f}'), 16):04x}" for f in ("vendor", "device"))
        lines.append(f"{dev.name} {ids}: flags {_flag_names(dev.flags, 'VFIO_DEVICE_FLAGS_')}, "
                     f"{dev.num_regions} regions, {dev.num_irqs} irqs")
        for index in range(dev.num_regions):
            label = f"  region {index} ({REGION_NAMES.get(index, '?')}):"
            try:
                info = dev.get_region_info(index)
            except VFIOError as e:
                lines.append(f"{label} {NOT_PRESENT if e.errno == errno.EINVAL else e}")
                continue
            if not info.size:
                lines.append(f"{label} {NOT_PRESENT}")
                continue
            lines.append(f"{label} size {info.size:#x} offset {info.offset:#x} "
                         f"flags {_flag_names(info.flags, 'VFIO_REGION_INFO_FLAG_')}")
            lines += [f"    cap {cap}" for cap in info.caps]
        for index in range(dev.num_irqs):
            label = f"  irq {index} ({IRQ_NAMES.get(index, '?')}):"
            try:
                irq = dev.get_irq_info(index)
            except VFIOError as e:
                lines.append(f"{label} {NOT_PRESENT if e.errno == errno.EINVAL else f'{e.message} ({e.errno_name})'}")
                continue
            lines.append(f"{label} count {irq.count} flags {_flag_names(irq.flags, 'VFIO_IRQ_INFO_')}"
                         if irq.count else f"{label} {NOT_PRESENT}")
        if dev.flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            lines.append("  capabilities:")
            lines += [f"    {cap}" for cap in capabilities(dev)]
        group = dev.group.groupid
        lines.append(f"  iommu group {group}:")
        for member in host.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
            try:
                driver = host.readlink(f"{PCI_DEVICES}/{member}/driver").rsplit("/", 1)[-1]
            except OSError:
                driver = "(no driver)"
            lines.append(f"    {member} driver {driver}")
        info = dev.container.get_info()
        lines.append(f"  iommu: pgsizes {info.iova_pgsizes:#x}")
        lines += [f"    cap {cap}" for cap in info.caps]
        dev.close()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fakekernel.topology import DEFAULT_TOPOLOGY

    parser = argparse.ArgumentParser(prog="vfio-info", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--backend", choices=("fake", "real"), default="fake",
                        help="fake: the embedded fake kernel (default, as vfio-conformance); real: this machine")
    parser.add_argument("--topology", default=DEFAULT_TOPOLOGY,
                        help=f"fake kernel topology (default: {DEFAULT_TOPOLOGY}, the CI VM's devices)")
    parser.add_argument("device", help="PCI address (0000:00:03.0 or 00:03.0) or sysfs path")
    args = parser.parse_args(argv)
    try:
        sysfs_path(args.device)
    except ValueError as e:
        parser.error(f"{e}, nor a sysfs path")
    try:
        if args.backend == "fake":
            from fakekernel import FakeKernel, Topology
            from vfio_impl.ivshmem.server import doorbell_servers

            try:
                topology = Topology.named(args.topology)
            except ValueError as e:
                parser.error(f"--topology: {e}")
            print(f"backend: fake, topology {args.topology}")
            with doorbell_servers(topology) as topology, FakeKernel(topology) as kernel:
                print(describe(kernel, args.device))
        else:
            print("backend: real")
            print(describe(RealHost(), args.device))
    except VFIOError as e:
        hint = "; --backend real looks at this machine" if args.backend == "fake" and e.errno == errno.ENOENT else ""
        print(f"vfio-info: {e}{hint}", file=sys.stderr)
        return 1
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vfio-harness")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
