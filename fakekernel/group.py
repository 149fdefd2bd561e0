"""IOMMU groups and /dev/vfio/N (drivers/vfio/group.c): status, the container, device fds.

A no-IOMMU group (VFIO_NO_IOMMU) is one VFIO made itself for a device behind no IOMMU, with
enable_unsafe_noiommu_mode on: /dev/vfio/noiommu-N. Linux asks CAP_SYS_RAWIO to open one, to
attach it to a container and to open its devices; the fake runs as root and has it.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .container import ContainerFile
from .err import error
from .iommu import PAGE_SIZE
from .sysfs import group_node
from .uaccess import buf_arg, copy_from_user
from .vfio_main import DeviceFile, File, VfioDevice, is_open

if TYPE_CHECKING:
    from .kernel import FakeKernel

_INT = struct.Struct("=i")


class IommuGroup:
    """Kernel state of one IOMMU group: its open file, its container, its devices and how many
    of them have a device fd open."""

    def __init__(self, number: int, noiommu: bool = False):
        self.number = number
        self.noiommu = noiommu
        self.opened: GroupFile | None = None
        self.container: ContainerFile | None = None
        self.devices: list[VfioDevice] = []
        self.device_fds = 0

    @property
    def node(self) -> str:
        return group_node(self.number, self.noiommu)

    @property
    def emulated(self) -> bool:
        """A group VFIO made for an mdev (VFIO_EMULATED_IOMMU): no IOMMU domain behind it."""
        return any(d.emulated_iommu for d in self.devices)


class GroupFile(File):
    kind = "group"

    def __init__(self, kernel: "FakeKernel", group: IommuGroup):
        super().__init__(kernel)
        self.group = group
        self.released = False

    def ioctl(self, request: int, arg) -> int:
        g = self.group
        if request == uapi.VFIO_GROUP_GET_STATUS:
            buf = buf_arg(arg)
            status = copy_from_user(uapi.vfio_group_status, buf, 8)
            if status.argsz < 8:
                raise error(errno.EINVAL, "argsz below vfio_group_status")
            if g.container:
                flags = uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
            else:
                flags = uapi.VFIO_GROUP_FLAGS_VIABLE if self.kernel.sysfs.viable(g.number) else 0
            uapi.vfio_group_status.pack_into(buf, 0, argsz=status.argsz, flags=flags)
            return 0
        if request == uapi.VFIO_GROUP_SET_CONTAINER:
            buf = buf_arg(arg)
            if len(buf) < 4:
                raise error(errno.EFAULT, "SET_CONTAINER takes a pointer to an int")
            fd = _INT.unpack_from(buf)[0]
            target = self.kernel.files.get(fd)
            if target is None and not is_open(fd):
                raise error(errno.EBADF, f"fd {fd} is not open")
            if g.container:
                raise error(errno.EINVAL, "group already has a container")
            if not isinstance(target, ContainerFile):
                raise error(self.kernel.profile.unrecognized_container_errno, f"fd {fd} is not a VFIO container")
            target.attach(g)
            return 0
        if request == uapi.VFIO_GROUP_UNSET_CONTAINER:
            if not g.container:
                raise error(errno.EINVAL, "group has no container")
            if g.device_fds:
                raise error(errno.EBUSY, "device fds are still open")
            g.container.detach(g)
            return 0
        if request == uapi.VFIO_GROUP_GET_DEVICE_FD:
            return self.get_device_fd(arg)
        return super().ioctl(request, arg)

    def get_device_fd(self, arg) -> int:
        """vfio_group_ioctl_get_device_fd: the name is matched against the group's devices bound
        to their VFIO driver, each by its driver's rule (vfio-pci takes options after the BDF)."""
        if isinstance(arg, int):
            raise error(errno.EFAULT, "GET_DEVICE_FD takes a pointer to a name")
        raw = bytes(arg)
        nul = raw.find(b"\0")
        if nul < 0 or nul >= PAGE_SIZE:
            raise error(errno.EINVAL, "device name is not NUL-terminated within a page")
        name = raw[:nul].decode("ascii", "replace")
        device = next((d for d in self.group.devices if d.bound() and d.match(name)), None)
        if device is None:
            raise error(errno.ENODEV, f"no device {name!r} in group {self.group.number}")
        container = self.group.container
        if container is None or container.driver is None:
            raise error(errno.EINVAL, "the group's container has no IOMMU set")
        device.open_device()
        self.group.device_fds += 1
        return self.kernel.fd_install(DeviceFile(self.kernel, device, self.group))

    def release(self) -> None:
        """Device fds hold the group file, so detaching waits for the last of them."""
        self.released = True
        if not self.group.device_fds:
            self.finish_release()

    def finish_release(self) -> None:
        g = self.group
        if g.container:
            g.container.detach(g)
        g.opened = None
