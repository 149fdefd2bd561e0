"""PCI host addresses as people type them: lspci's short `00:03.0`, QEMU's `host=`, the sysfs name.

One parser for every tool that takes a device, so `vfio-info 00:03.0` and
`VFIOPCIDevice.realize(host="00:03.0")` accept the same strings.
"""

from __future__ import annotations

import re

PCI_DEVICES = "/sys/bus/pci/devices"
_HOST_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def parse_host(text: str) -> str:
    """The sysfs name (`0000:00:03.0`) of a `[domain:]bus:slot.function` address; ValueError if
    it is not one."""
    m = _HOST_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a PCI address (DDDD:BB:SS.F or BB:SS.F)")
    domain, bus, slot, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{fn}"


def sysfs_path(device: str) -> str:
    """A device's sysfs directory from a sysfs path or a PCI address in either form."""
    if device.startswith("/"):
        return device.rstrip("/")
    return f"{PCI_DEVICES}/{parse_host(device)}"
