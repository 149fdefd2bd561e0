"""What a test left behind on the fake kernel, named in VFIO's words.

A leak report that lists fd numbers sends the reader to a debugger; one that says "fd 9:
/dev/vfio/3, group 3" and "fd 12: an eventfd" points at the missing close. Two sources: the
kernel's own tables (read before close_all() releases them) and the process's fds (/proc/self/fd).
"""

from __future__ import annotations

import re

from fakekernel.container import ContainerFile
from fakekernel.group import GroupFile
from fakekernel.vfio_pci import MSI, VfioPciDevice
from fakekernel.vfio_platform import VfioPlatformDevice
from vfio_impl import uapi

from .reliability import process_fds

_MEMFD = re.compile(r"/memfd:(.*) \(deleted\)")
_ANON = re.compile(r"anon_inode:\[?([^\]]+)\]?")
_PIPE_OR_SOCKET = re.compile(r"(socket|pipe):\[\d+\]")
_CCW_IRQS = {uapi.VFIO_CCW_IO_IRQ_INDEX: "I/O", uapi.VFIO_CCW_CRW_IRQ_INDEX: "CRW", uapi.VFIO_CCW_REQ_IRQ_INDEX: "REQ"}


def kernel_leftovers(kernel) -> list[str]:
    """What the kernel still holds for user space: VFIO files (a device fd with the IRQs still
    wired to eventfds), mmaps of device regions, DMA mappings."""
    left = [f"fd {fd}: {_vfio_file(kernel, f)}" for fd, f in sorted(kernel.files.items())]
    mmaps = kernel.live_mappings()
    if mmaps:
        left.append(f"{mmaps} mmap{'s' if mmaps > 1 else ''} of a device region, never unmapped")
    containers = {id(g.container): g.container for g in kernel.groups.values() if g.container}
    left += [f"a DMA mapping at iova {m.iova:#x}, size {m.size:#x}"
             for container in containers.values() if container.iommu is not None for m in container.iommu.mappings()]
    return left


def fds_opened_since(before: dict[int, str]) -> list[str]:
    """The fds open now that were not open in `before` (a process_fds() snapshot), each named."""
    return [f"fd {fd}: {_fd_kind(target)}" for fd, target in sorted(process_fds().items()) if fd not in before]


def report(left: list[str]) -> str:
    """One message, which the plugin fails the test with and pytest shows whole, no traceback."""
    return "the test leaked:\n" + "\n".join(f"  {line}" for line in left)


def _vfio_file(kernel, f) -> str:
    if isinstance(f, ContainerFile):
        return "/dev/vfio/vfio, a container"
    if isinstance(f, GroupFile):
        return f"{f.group.node}, group {f.group.number}"
    device = f"the device fd of {_device_name(kernel, f.device)}"
    wired = _irqs_wired(f.device)
    return f"{device}, IRQs wired to eventfds: {', '.join(wired)}" if wired else device


def _device_name(kernel, device) -> str:
    if isinstance(device, VfioPciDevice):
        return f"{device.bdf} ({next(d.model for d in kernel.topology.devices if d.bdf == device.bdf)})"
    if isinstance(device, VfioPlatformDevice):
        return device.name
    return f"{device.spec.uuid} (subchannel {device.spec.schid})"


def _irqs_wired(device) -> list[str]:
    """The IRQs SET_IRQS wired to an eventfd and nothing unwired, by their VFIO index names."""
    if isinstance(device, VfioPciDevice):
        vectors = "MSI" if device.irq_type == MSI else "MSI-X"
        ctxs = {"INTx": device.intx.trigger, "INTx unmask": device.intx_unmask,
                **{f"{vectors} vector {i}": ctx.trigger for i, ctx in enumerate(device.msi_ctx)},
                "ERR": device.err_trigger, "REQ": device.req_trigger}
    elif isinstance(device, VfioPlatformDevice):
        ctxs = {f"IRQ {i}{what}": ctx for i, irq in enumerate(device.irqs)
                for what, ctx in (("", irq.trigger), (" mask", irq.mask_fd), (" unmask", irq.unmask_fd))}
    else:
        ctxs = {_CCW_IRQS.get(i, f"IRQ {i}"): ctx.trigger for i, ctx in enumerate(device.irqs)}
    return [name for name, ctx in ctxs.items() if ctx is not None]


def _fd_kind(target: str) -> str:
    """What /proc/self/fd/N's link says the fd is: anon_inode:[eventfd] an eventfd, /memfd:NAME
    (deleted) a memfd; a path is the file itself."""
    if m := _MEMFD.fullmatch(target):
        return f"a memfd {m[1]!r}"
    if m := _ANON.fullmatch(target):
        return {"eventfd": "an eventfd", "eventpoll": "an epoll instance (a selector)"}.get(m[1], f"a {m[1]}")
    if m := _PIPE_OR_SOCKET.fullmatch(target):
        return f"a {m[1]}"
    return target
