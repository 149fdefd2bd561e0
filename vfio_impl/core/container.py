"""Containers and groups, as QEMU's common code keeps them: a group is reused, a container is
shared whenever SET_CONTAINER accepts it, and the last group out closes the container. Together
they are the type1 IOMMU backend (iommu.IOMMUBackend), the one an AddressSpace uses unless told."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import TYPE_CHECKING

from vfio_impl import uapi
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host
from vfio_impl.core.iommu import PAGE_SIZE, IOMMUBackend, IOMMUGroupError, IOMMUInfo
from vfio_impl.core.trace import trace
from vfio_impl.vmm.machine import Machine

if TYPE_CHECKING:
    from vfio_impl.core.device import Device


class Container(IOMMUBackend):
    """A /dev/vfio/vfio fd with its type1 IOMMU and the memory listener that fills it."""

    # The IOMMU models SET_IOMMU is tried with, best first; the first the kernel offers is used.
    iommu_types = (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU)
    # Whether guest RAM is mapped for DMA as the machine adds it.
    listens = True

    @staticmethod
    def group_path(groupid: int) -> str:
        return f"/dev/vfio/{groupid}"

    def __init__(self, space: "AddressSpace", fd: int):
        self.space = space
        self.host = space.host
        self.fd = fd
        self.groups: list[Group] = []
        self.iommu_type = 0
        self.mappings: dict[int, int] = {}

    @classmethod
    def connect(cls, group: "Group") -> "Container":
        """Join an existing container if the kernel allows it, else build a new one."""
        space, host = group.space, group.space.host
        fdbuf = bytearray(4)
        for container in space.containers:
            struct.pack_into("=i", fdbuf, 0, container.fd)
            try:
                host.ioctl(group.fd, uapi.VFIO_GROUP_SET_CONTAINER, fdbuf)
            except OSError:
                continue
            container.groups.append(group)
            trace("vfio_connect_existing_container", group=group.groupid, container=container.fd)
            return container
        try:
            fd = host.open("/dev/vfio/vfio", os.O_RDWR)
        except OSError as e:
            raise VFIOError.from_oserror("vfio: failed to open /dev/vfio/vfio", e) from e
        container = cls(space, fd)
        try:
            container._setup(group, fdbuf)
        except BaseException:
            host.close(fd)
            raise
        container.groups.append(group)
        space.containers.append(container)
        if cls.listens:
            try:
                space.machine.register_listener(container)
            except VFIOError:
                container.disconnect(group)
                raise
        trace("vfio_connect_new_container", group=group.groupid, container=fd)
        return container

    def _setup(self, group: "Group", fdbuf: bytearray) -> None:
        host = self.host
        try:
            version, code = host.ioctl(self.fd, uapi.VFIO_GET_API_VERSION, 0), errno.EINVAL
        except OSError as e:
            version, code = -1, e.errno
        if version != uapi.VFIO_API_VERSION:
            raise VFIOError(f"vfio: supported vfio version: {uapi.VFIO_API_VERSION}, reported version: {version}",
                            code)
        for iommu_type in self.iommu_types:
            if self._check_extension(iommu_type):
                break
        else:
            raise VFIOError("vfio: No available IOMMU models", errno.EINVAL)
        struct.pack_into("=i", fdbuf, 0, self.fd)
        try:
            host.ioctl(group.fd, uapi.VFIO_GROUP_SET_CONTAINER, fdbuf)
        except OSError as e:
            raise VFIOError.from_oserror("vfio: failed to set group container", e) from e
        try:
            host.ioctl(self.fd, uapi.VFIO_SET_IOMMU, iommu_type)
        except OSError as e:
            try:
                host.ioctl(group.fd, uapi.VFIO_GROUP_UNSET_CONTAINER, 0)
            except OSError:
                pass
            raise VFIOError.from_oserror("vfio: failed to set iommu for container", e) from e
        self.iommu_type = iommu_type

    def _check_extension(self, extension: int) -> bool:
        """CHECK_EXTENSION as QEMU tests it, for any non-zero answer: the -1 of a failed ioctl
        counts as yes, and SET_IOMMU has the last word."""
        try:
            return self.host.ioctl(self.fd, uapi.VFIO_CHECK_EXTENSION, extension) != 0
        except OSError as e:
            trace("vfio_check_extension_failed", extension=extension, errno=e.errno)
            return True

    @classmethod
    def attach_device(cls, space: "AddressSpace", device: Device, devname: str, groupid: int) -> None:
        """vfio_legacy_attach_device: the group (opened and put in a container if new), then the
        device fd from it; a failure puts the group back."""
        group = Group.get(space, groupid, cls)
        try:
            device.fd = group.get_device_fd(devname)
        except VFIOError:
            group.put()
            raise
        device.group, device.container = group, group.container
        group.devices.append(device)

    def detach_device(self, device: Device) -> None:
        """The device fd, then the device's hold on its group: the last one out puts the group,
        and the last group out closes the container."""
        self.host.close(device.fd)
        device.fd = -1
        device.group.devices.remove(device)
        device.group.put()

    def disconnect(self, group: "Group") -> None:
        try:
            self.host.ioctl(group.fd, uapi.VFIO_GROUP_UNSET_CONTAINER, 0)
        except OSError as e:
            trace("warning", message=f"vfio: error disconnecting group {group.groupid} from container: {e}")
        self.groups.remove(group)
        if not self.groups:
            if self.listens:
                self.space.machine.unregister_listener(self)
            for buf in [b for b in self.space.dma_buffers if self in b.containers]:
                buf.containers.remove(self)      # the kernel drops the mapping with the container
                if not buf.containers:
                    buf.close()
            self.mappings.clear()
            self.space.containers.remove(self)
            self.host.close(self.fd)
            trace("vfio_disconnect_container", container=self.fd)
            self.fd = -1

    # -- type1 --------------------------------------------------------------------------------
    def get_info(self) -> IOMMUInfo:
        """Ask once for the fixed part, then again with the argsz the kernel said the caps need."""
        layout = uapi.vfio_iommu_type1_info
        buf = layout.pack()
        for _ in range(2):
            try:
                self.host.ioctl(self.fd, uapi.VFIO_IOMMU_GET_INFO, buf)
            except OSError as e:
                raise VFIOError.from_oserror("vfio: failed to get IOMMU info", e) from e
            info = layout.unpack(buf)
            if info.argsz <= len(buf):
                break
            buf = bytearray(info.argsz)
            layout.pack_into(buf, 0, argsz=info.argsz)
        caps = tuple(uapi.parse_chain(buf, info.cap_offset, "iommu")) if info.cap_offset else ()
        return IOMMUInfo(info.flags, info.iova_pgsizes, caps)

    def map_dma(self, iova: int, size: int, vaddr: int, readonly: bool = False) -> None:
        """MAP_DMA; on EBUSY unmap the range and try once more, as the seed does for VGA ROMs."""
        flags = uapi.VFIO_DMA_MAP_FLAG_READ | (0 if readonly else uapi.VFIO_DMA_MAP_FLAG_WRITE)
        buf = uapi.vfio_iommu_type1_dma_map.pack(flags=flags, vaddr=vaddr, iova=iova, size=size)
        try:
            self.host.ioctl(self.fd, uapi.VFIO_IOMMU_MAP_DMA, buf)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise VFIOError.from_oserror(f"vfio_dma_map({iova:#x}, {size:#x}, {vaddr:#x})", e) from e
            trace("vfio_dma_map_ebusy_retry", iova=iova, size=size)
            try:
                self.unmap_dma(iova, size)
                self.host.ioctl(self.fd, uapi.VFIO_IOMMU_MAP_DMA, buf)
            except (OSError, VFIOError) as e2:
                code = getattr(e2, "errno", 0) or 0
                raise VFIOError(f"vfio_dma_map({iova:#x}, {size:#x}, {vaddr:#x})", code) from e2
        self.mappings[iova] = size
        trace("vfio_dma_map", iova=iova, size=size, readonly=readonly)

    def unmap_dma(self, iova: int, size: int) -> int:
        buf = uapi.vfio_iommu_type1_dma_unmap.pack(iova=iova, size=size)
        try:
            self.host.ioctl(self.fd, uapi.VFIO_IOMMU_UNMAP_DMA, buf)
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio_dma_unmap({iova:#x}, {size:#x})", e) from e
        for start in [s for s in self.mappings if iova <= s < iova + size]:
            del self.mappings[start]
        unmapped = uapi.vfio_iommu_type1_dma_unmap.unpack(buf).size
        trace("vfio_dma_unmap", iova=iova, size=size, unmapped=unmapped)
        return unmapped


class NoIOMMUContainer(Container):
    """VFIO's no-IOMMU mode (Linux's CONFIG_VFIO_NOIOMMU, loaded with enable_unsafe_noiommu_mode):
    groups are /dev/vfio/noiommu-N and the container's only model is VFIO_NOIOMMU_IOMMU, which
    translates nothing, so the kernel refuses every DMA ioctl and no memory is mapped. QEMU refuses
    this mode; a test runner needs it for devices behind no IOMMU (vfio-platform on a board
    without one), so it is used only when asked for: AddressSpace(host, machine, NoIOMMUContainer)."""

    iommu_types = (uapi.VFIO_NOIOMMU_IOMMU,)
    listens = False

    @staticmethod
    def group_path(groupid: int) -> str:
        return f"/dev/vfio/noiommu-{groupid}"


class Group:
    """An open /dev/vfio/N, shared by every device of that IOMMU group."""

    def __init__(self, space: "AddressSpace", groupid: int, fd: int):
        self.space = space
        self.groupid = groupid
        self.fd = fd
        self.container: Container | None = None
        self.devices: list = []

    @classmethod
    def get(cls, space: "AddressSpace", groupid: int, backend: type[Container] | None = None) -> "Group":
        """vfio_get_group: the open group, or a new one in a container of `backend` (the space's
        by default); it fails with an IOMMUGroupError."""
        if groupid in space.groups:
            return space.groups[groupid]
        host = space.host
        backend = backend or space.iommu
        path = backend.group_path(groupid)
        try:
            fd = host.open(path, os.O_RDWR)
        except OSError as e:
            raise IOMMUGroupError.from_oserror(f"vfio: error opening {path}", e) from e
        group = cls(space, groupid, fd)
        try:
            status = uapi.vfio_group_status.pack()
            try:
                host.ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, status)
            except OSError as e:
                raise IOMMUGroupError.from_oserror("vfio: error getting group status", e) from e
            if not uapi.vfio_group_status.unpack(status).flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise IOMMUGroupError(f"vfio: error, group {groupid} is not viable, please ensure all devices "
                                      "within the iommu_group are bound to their vfio bus driver.", errno.EPERM)
            try:
                group.container = backend.connect(group)
            except VFIOError as e:
                raise IOMMUGroupError(f"vfio: failed to setup container for group {groupid}: {e.message}",
                                      e.errno) from e
        except BaseException:
            host.close(fd)
            raise
        space.groups[groupid] = group
        trace("vfio_get_group", group=groupid)
        return group

    def get_device_fd(self, name: str) -> int:
        try:
            return self.space.host.ioctl(self.fd, uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0")
        except OSError as e:
            raise VFIOError.from_oserror(
                f"vfio: error getting device {name} from group {self.groupid}; verify all devices in group "
                f"{self.groupid} are bound to vfio-pci or pci-stub and not already in use", e) from e

    def put(self) -> None:
        """Drop the group once its last device is gone: leave the container, close the fd."""
        if self.devices or self.fd < 0:
            return
        if self.container:
            self.container.disconnect(self)
            self.container = None
        self.space.host.close(self.fd)
        self.fd = -1
        del self.space.groups[self.groupid]
        trace("vfio_put_group", group=self.groupid)


class AddressSpace:
    """QEMU's VFIOAddressSpace: the devices, groups and containers serving one guest's memory.
    `iommu` is the backend class devices attach with (QEMU picks it per device, here per space)."""

    def __init__(self, host: Host, machine: Machine | None = None, iommu: type[IOMMUBackend] = Container):
        self.host = host
        self.machine = machine or Machine()
        self.iommu = iommu
        self.devices: list[Device] = []
        self.groups: dict[int, Group] = {}
        self.containers: list[IOMMUBackend] = []
        self.dma_buffers: list[DMABuffer] = []

    def dma_buffer(self, size: int, iova: int, readonly: bool = False) -> "DMABuffer":
        """Memory the attached devices can DMA to and from at `iova` (see DMABuffer)."""
        return DMABuffer(self, size, iova, readonly)

    def close(self) -> None:
        """Devices first: the last one out of a container takes its DMA buffers with it."""
        for device in list(self.devices):
            device.close()
        self.machine.close()

    def __enter__(self) -> "AddressSpace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DMABuffer:
    """Process memory mapped for device DMA at one IOVA in every container of an address space.

    What QEMU's memory listener does for guest RAM, for a driver with no guest: anonymous memory
    whose address (`vaddr`) MAP_DMA pins on Linux and the fake kernel's IOMMU reads and writes,
    mapped into the containers the space has now (so made after the devices are attached).
    `view` is the process's side of it. `readonly` lets the device read it only (MAP_DMA without
    WRITE). close() unmaps and frees it; the last device out of a container does too.
    """

    def __init__(self, space: AddressSpace, size: int, iova: int, readonly: bool = False):
        if not space.containers:
            raise VFIOError("vfio: no container to map DMA memory into; attach a device first", errno.ENODEV)
        if size <= 0:
            raise VFIOError(f"vfio: DMA buffer of {size} bytes", errno.EINVAL)
        self.space = space
        self.iova = iova
        self.size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)   # MAP_DMA takes whole pages
        self.readonly = readonly
        self.memory = mmap.mmap(-1, self.size)
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.view = memoryview(self.memory)
        self.containers: list[IOMMUBackend] = []
        self.closed = False
        try:
            for container in space.containers:
                container.map_dma(iova, self.size, self.vaddr, readonly)
                self.containers.append(container)
        except BaseException:
            self.close()
            raise
        space.dma_buffers.append(self)

    def close(self) -> None:
        """Unmap from every container still open, then free the memory (even if an unmap fails)."""
        if self.closed:
            return
        self.closed = True
        if self in self.space.dma_buffers:
            self.space.dma_buffers.remove(self)
        failed = []
        for container in self.containers:
            try:
                container.unmap_dma(self.iova, self.size)
            except VFIOError as e:
                failed.append(e)
        self.containers = []
        try:
            self.view.release()
            self.memory.close()
        except BufferError:
            pass   # a view the caller still holds keeps the pages; they go with it
        if failed:
            raise failed[0]

    def __enter__(self) -> "DMABuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DMABuffer iova={self.iova:#x} size={self.size:#x}{' readonly' if self.readonly else ''}" \
               f"{' closed' if self.closed else ''}>"
