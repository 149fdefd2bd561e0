"""hypothesis against the fake kernel's whole syscall surface: random requests, argsz, flags,
indexes, fds, offsets and lengths, on containers, groups, vfio-pci, vfio-platform and vfio-ccw
device fds and the sysfs tree.

The only exception allowed out of a Host call is an OSError with a real errno. After every call the
kernel must hold together: no two DMA mappings overlap, group, container and device reference
counts agree with the open files, and an mmap never reaches past its region. After every example,
whatever it opened is closed and the kernel must be back to its baseline.

Profiles: VFIO_RELIABILITY=ci (the default, a few seconds in all, the same examples every run) or
VFIO_RELIABILITY=long (10,000 examples per target):
    VFIO_RELIABILITY=long python3 -m pytest -p no:xdist tests/test_fuzz_fake.py
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.reliability import pci_topology, process_fds
from fakekernel import FakeKernel, Topology
from fakekernel.container import ContainerFile
from fakekernel.faults import census
from fakekernel.group import GroupFile
from fakekernel.vfio_ccw import VfioCcwDevice
from fakekernel.vfio_main import DeviceFile
from vfio_impl import uapi

settings.register_profile("vfio-fuzz-ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("vfio-fuzz-long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(f"vfio-fuzz-{os.environ.get('VFIO_RELIABILITY', 'ci')}")

PAGE = mmap.PAGESIZE
DMA_PAGES = 16
U64 = (1 << 64) - 1
_hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# A number no fd can have: closing or reading it is EBADF, never another test's fd.
CLOSED_FD = min(_hard_limit + 7, 2**31 - 1) if _hard_limit != resource.RLIM_INFINITY else 2**30
REQUESTS = sorted(set(uapi.IOCTLS.values()))



def mostly(plausible, garbage):
    """Three draws in four from what a careful caller would pass, so calls get past the first
    check and into the kernel's deeper paths; the rest from anything at all."""
    return st.sampled_from((plausible, plausible, plausible, garbage)).flatmap(lambda strategy: strategy)


small = st.integers(0, 16)
u32 = st.one_of(small, st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))
u64 = st.one_of(u32, st.sampled_from([1 << 32, 1 << 39, 1 << 63, U64]), st.integers(0, U64))
lengths = st.one_of(st.integers(0, 16), st.sampled_from([0x40, 0x100, 0x1000, 0x2000]), st.integers(0, 1 << 20))
offsets = mostly(st.one_of(st.integers(0, 0x110), st.sampled_from([0xFFC, 0x1000, 0xFFFFF, 0x100000])),
                 st.one_of(st.integers(0, 1 << 40), st.integers(-(1 << 63), -1)))


class Session:
    """One example's view of the kernel: the fds, eventfds and mmaps it made, closed at its end."""

    def __init__(self, kernel: FakeKernel, dma: mmap.mmap, data):
        self.kernel = kernel
        self.data = data
        self.fds: list[int] = []
        self.eventfds: list[int] = []
        self.maps: list = []
        self.dma_base = ctypes.addressof(ctypes.c_char.from_buffer(dma))

    def draw(self, strategy):
        return self.data.draw(strategy)

    def syscall(self, name: str, *args):
        """One Host call: an OSError with a real errno is an answer, anything else is a bug."""
        try:
            result = getattr(self.kernel, name)(*args)
        except OSError as e:
            assert e.errno in errno.errorcode, f"{name}{args[:2]} raised OSError with errno {e.errno!r}"
            return None
        finally:
            check_kernel(self.kernel)
        return result

    def pick(self, choices: list[int]) -> int:
        """One of a list whose length depends on what earlier calls answered, drawn the same way
        whatever that length is, so hypothesis can replay and shrink an example."""
        return choices[self.draw(st.integers(0, 15)) % len(choices)]

    def fd(self, kinds=(ContainerFile, GroupFile, DeviceFile)) -> int:
        """One of ours of those kinds, or a closed number, a negative one or an eventfd."""
        ours = [fd for fd in self.fds if isinstance(self.kernel.files.get(fd), kinds)]
        mine = self.draw(st.sampled_from([True] * 7 + [False]))
        return self.pick(ours if ours and mine else [CLOSED_FD, -1, *self.eventfds])

    def any_fd(self) -> int:
        """An fd number as it may appear inside a struct: ours, an eventfd, or any int."""
        way = self.draw(st.integers(0, 2))
        if way == 0:
            return self.pick([*self.fds, *self.eventfds, -1, CLOSED_FD])
        return self.draw(st.integers(-2, 64) if way == 1 else st.integers(-(1 << 31), (1 << 31) - 1))

    def opened(self, fd) -> None:
        if isinstance(fd, int) and fd >= 0:
            self.fds.append(fd)

    def close_all(self) -> None:
        for m in self.maps:
            m.close()
        for fd in self.fds:
            self.syscall("close", fd)
        for fd in self.eventfds:
            os.close(fd)


def check_kernel(kernel: FakeKernel) -> None:
    """The invariants: references agree with the open files, and DMA mappings never overlap."""
    files = list(kernel.files.values())
    devices = {**kernel.vfio_devices, **kernel.platform_devices, **kernel.ccw_devices}
    for name, device in devices.items():
        holders = sum(1 for f in files if isinstance(f, DeviceFile) and f.device is device)
        assert device.open_count == holders, f"{name}: open_count {device.open_count}, {holders} device fds"
    containers = {id(f): f for f in files if isinstance(f, ContainerFile)}
    for number, group in kernel.groups.items():
        fds = sum(1 for f in files if isinstance(f, DeviceFile) and f.group is group)
        assert group.device_fds == fds, f"group {number}: device_fds {group.device_fds}, {fds} open"
        if group.opened is not None:
            assert group.opened in files or (group.opened.released and group.device_fds), f"group {number} opened"
        if group.container is not None:
            assert group in group.container.groups, f"group {number} is not in its container's list"
            containers[id(group.container)] = group.container
    for container in containers.values():
        for group in container.groups:
            assert group.container is container
        if container.iommu is None:
            continue
        maps = container.iommu.mappings()
        assert len(maps) <= container.iommu.dma_entry_limit
        for a, b in zip(maps, maps[1:]):
            assert a.iova + a.size <= b.iova, f"DMA mappings overlap: {a} {b}"
        for m in maps:
            assert 0 < m.size and m.iova + m.size - 1 <= U64


def region_info(session: Session, fd: int, index: int):
    buf = uapi.vfio_region_info.pack(argsz=uapi.vfio_region_info.size, index=index)
    try:
        session.kernel.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
    except OSError:
        return None
    return uapi.vfio_region_info.unpack(buf)


# -- building arguments ---------------------------------------------------------------------------------
def careful(session: Session) -> bool:
    """Whether this argument is built the way a careful caller builds it (three in four), so the
    call gets past the first check and into the kernel's deeper paths; else anything goes."""
    return session.draw(st.sampled_from([True, True, True, False]))


def field(session: Session, good: bool, plausible, garbage):
    return session.draw(plausible if good else st.one_of(plausible, garbage))


def struct_arg(session: Session, layout, **fields):
    """A buffer around `layout` with the fields that matter drawn from (plausible, garbage) pairs:
    when not careful, also any length near its size, random bytes, immutable bytes or an int."""
    good = careful(session)
    shape = "buffer" if good else session.draw(st.sampled_from(["buffer", "bytes", "int"]))
    if shape == "int":
        return session.draw(u64)
    size = layout.size if good else session.draw(st.one_of(
        st.sampled_from([layout.size, 0, 4, layout.size - 1, layout.size + 8, layout.size + 64]), st.integers(0, 256)))
    buf = bytearray(size) if good else bytearray(session.draw(st.binary(min_size=size, max_size=size)))
    for name, (plausible, garbage) in {"argsz": (st.just(layout.size), u32), **fields}.items():
        offset = layout.offsetof(name)
        width = 8 if name in ("iova", "size", "vaddr", "offset") else 4
        if offset + width <= size:
            value = field(session, good, plausible, garbage)
            struct.pack_into("=Q" if width == 8 else "=I", buf, offset, value)
    return bytes(buf) if shape == "bytes" else buf


IRQ_SET_FLAGS = [uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                 uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_UNMASK,
                 uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                 uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_MASK,
                 uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK,
                 uapi.VFIO_IRQ_SET_DATA_BOOL | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                 uapi.VFIO_IRQ_SET_DATA_BOOL | uapi.VFIO_IRQ_SET_ACTION_MASK,
                 uapi.VFIO_IRQ_SET_DATA_BOOL | uapi.VFIO_IRQ_SET_ACTION_UNMASK]


def irq_set_arg(session: Session):
    """A vfio_irq_set with its data (eventfds, bools or none); when careful, well formed for an
    index the device may have, else count, argsz, flags and the buffer's end drawn apart."""
    hdr = uapi.vfio_irq_set
    good = careful(session)
    count = field(session, good, st.integers(0, 3), u32)
    flags = field(session, good, st.sampled_from(IRQ_SET_FLAGS), u32)
    n = min(count, 8) if good else session.draw(st.integers(0, 8))
    if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
        data = struct.pack(f"<{n}i", *(session.any_fd() for _ in range(n)))
    else:
        data = session.draw(st.binary(min_size=n, max_size=n))
    buf = bytearray(hdr.size) + data
    hdr.pack_into(buf, 0, argsz=field(session, good, st.just(len(buf)), u32), flags=flags,
                  index=field(session, good, st.integers(0, 5), u32),
                  start=field(session, good, st.integers(0, 2), u32), count=count)
    return buf if good else buf[:session.draw(st.integers(0, len(buf)))]


def pages(most: int):
    return st.integers(0, most).map(lambda p: p * PAGE), u64


def dma_vaddr(session: Session) -> int:
    """Our DMA buffer's pages, or addresses nothing is mapped at; never other memory of ours,
    which a device's DMA could then overwrite."""
    return session.draw(st.one_of(st.integers(0, DMA_PAGES - 1).map(lambda p: session.dma_base + p * PAGE),
                                  st.sampled_from([0, PAGE, 1 << 46, session.dma_base + 1])))


# -- the operations -----------------------------------------------------------------------------------------
def op_open(session: Session, paths: list[str]) -> None:
    session.opened(session.syscall("open", session.draw(st.sampled_from(paths)), os.O_RDWR))


def op_close(session: Session) -> None:
    fd = session.fd()
    if fd in session.fds:
        session.fds.remove(fd)
    if fd not in session.eventfds:
        session.syscall("close", fd)


def op_eventfd(session: Session) -> None:
    session.eventfds.append(session.kernel.eventfd())


def op_container_ioctl(session: Session) -> None:
    fd = session.fd((ContainerFile,))
    request = session.draw(mostly(st.sampled_from([
        uapi.VFIO_GET_API_VERSION, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SET_IOMMU, uapi.VFIO_IOMMU_GET_INFO,
        uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA]),
        st.one_of(st.sampled_from(REQUESTS), u32)))
    if request in (uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SET_IOMMU, uapi.VFIO_GET_API_VERSION):
        arg = session.draw(st.one_of(st.integers(0, 12), u64))
    elif request == uapi.VFIO_IOMMU_MAP_DMA:
        vaddr = st.builds(lambda: dma_vaddr(session))
        arg = struct_arg(session, uapi.vfio_iommu_type1_dma_map, flags=(st.integers(1, 3), u32),
                         vaddr=(vaddr, vaddr), iova=pages(64), size=pages(8))
    elif request == uapi.VFIO_IOMMU_UNMAP_DMA:
        arg = struct_arg(session, uapi.vfio_iommu_type1_dma_unmap, flags=(st.just(0), st.integers(0, 7) | u32),
                         iova=pages(64), size=pages(8))
    else:
        arg = struct_arg(session, uapi.vfio_iommu_type1_info)
    session.syscall("ioctl", fd, request, arg)


def op_group_ioctl(session: Session, names: list[str]) -> None:
    fd = session.fd((GroupFile,))
    request = session.draw(mostly(st.sampled_from([
        uapi.VFIO_GROUP_GET_STATUS, uapi.VFIO_GROUP_SET_CONTAINER, uapi.VFIO_GROUP_UNSET_CONTAINER,
        uapi.VFIO_GROUP_GET_DEVICE_FD]), st.one_of(st.sampled_from(REQUESTS), u32)))
    if request == uapi.VFIO_GROUP_SET_CONTAINER:
        arg = session.draw(st.sampled_from(["fd", "fd", "short", "int"]))
        arg = {"fd": bytearray(struct.pack("=i", session.any_fd())), "short": bytearray(2),
               "int": session.any_fd()}[arg]
    elif request == uapi.VFIO_GROUP_GET_DEVICE_FD:
        name = session.draw(st.one_of(st.sampled_from(names), st.text(max_size=20)))
        raw = name.encode() + session.draw(st.sampled_from([b"\0", b"", b" opt\0", b"\0" * 4096]))
        arg = session.draw(st.sampled_from([bytearray(raw), raw, 0]))
    else:
        arg = struct_arg(session, uapi.vfio_group_status, flags=(st.just(0), u32))
    answer = session.syscall("ioctl", fd, request, arg)
    if request == uapi.VFIO_GROUP_GET_DEVICE_FD:
        session.opened(answer)


def op_device_ioctl(session: Session) -> None:
    fd = session.fd((DeviceFile,))
    request = session.draw(mostly(st.sampled_from([
        uapi.VFIO_DEVICE_GET_INFO, uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.VFIO_DEVICE_GET_IRQ_INFO,
        uapi.VFIO_DEVICE_SET_IRQS, uapi.VFIO_DEVICE_SET_IRQS, uapi.VFIO_DEVICE_RESET,
        uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO]), st.one_of(st.sampled_from(REQUESTS), u32)))
    index = st.integers(0, 9), u32
    if request == uapi.VFIO_DEVICE_SET_IRQS:
        arg = irq_set_arg(session) if session.draw(st.integers(0, 4)) else struct_arg(session, uapi.vfio_irq_set)
    elif request == uapi.VFIO_DEVICE_GET_REGION_INFO:
        arg = struct_arg(session, uapi.vfio_region_info, index=index, cap_offset=(st.just(0), u32))
    elif request == uapi.VFIO_DEVICE_GET_IRQ_INFO:
        arg = struct_arg(session, uapi.vfio_irq_info, index=index, flags=(st.just(0), u32))
    elif request == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
        arg = struct_arg(session, uapi.vfio_pci_hot_reset_info, count=(small, u32))
    elif request == uapi.VFIO_DEVICE_RESET:
        arg = session.draw(st.one_of(st.just(0), u64))
    else:
        arg = struct_arg(session, uapi.vfio_device_info)
    session.syscall("ioctl", fd, request, arg)


def device_fd(session: Session) -> int:
    """Mostly one of our device fds; else a group, a container or no fd at all."""
    return session.fd(session.draw(mostly(st.just((DeviceFile,)), st.just((DeviceFile, GroupFile, ContainerFile)))))


def _regions(session: Session, fd: int) -> list[tuple[int, int, int]]:
    """(index, size, flags) of the device's regions that have a size, as REGION_INFO tells them."""
    f = session.kernel.files.get(fd)
    if not isinstance(f, DeviceFile):
        return []
    found = [region_info(session, fd, index) for index in range(f.device.num_regions)]
    return [(i.index, i.size, i.flags) for i in found if i is not None and i.size]


def _region_offset(session: Session, fd: int, size_hint: int = 0) -> tuple[int, int, int]:
    """(offset, region size, region flags): mostly near the start or end of a region the device
    has; else any index and any offset inside or past it, or a negative offset."""
    f = session.kernel.files.get(fd)
    shift = f.device.offset_shift if isinstance(f, DeviceFile) else 40
    regions = _regions(session, fd) or [(0, 0, 0)]
    index, size, flags = session.pick(regions)
    if not session.draw(mostly(st.just(True), st.just(False))):
        index = session.draw(mostly(st.integers(0, 9), st.integers(0, (1 << (63 - shift)) - 1)))
    near_end = st.integers(0, 8).map(lambda back: max(size - size_hint - back, 0))
    within = session.draw(mostly(st.one_of(st.integers(0, 0x110), near_end),
                                 st.one_of(offsets, st.integers(0, (1 << shift) - 1))))
    return ((index << shift) + within if within >= 0 else within), size, flags


def op_read(session: Session) -> None:
    fd = device_fd(session)
    n = session.draw(lengths)
    offset, _, _ = _region_offset(session, fd, n)
    data = session.syscall("pread", fd, n, offset)
    if data is not None:
        assert isinstance(data, bytes) and len(data) <= n, f"pread of {n} gave {len(data)} bytes"


def op_write(session: Session) -> None:
    fd = device_fd(session)
    data = session.draw(mostly(st.sampled_from([1, 2, 4, 8]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
                               st.one_of(st.binary(max_size=16), st.binary(min_size=0x100, max_size=0x1100))))
    offset, _, _ = _region_offset(session, fd, len(data))
    written = session.syscall("pwrite", fd, data, offset)
    if written is not None:
        # vfio_ccw_mdev_write_io_region answers the region's ret_code when it is not 0, and a
        # request the state machine ignores leaves there whatever the user wrote: Linux's answer.
        f = session.kernel.files.get(fd)
        if isinstance(f, DeviceFile) and isinstance(f.device, VfioCcwDevice):
            assert -(1 << 31) <= written < 1 << 31, f"pwrite returned {written}, not an int ret_code"
        else:
            assert 0 <= written <= len(data), f"pwrite of {len(data)} returned {written}"


def op_mmap(session: Session) -> None:
    fd = device_fd(session)
    f = session.kernel.files.get(fd)
    shift = f.device.offset_shift if isinstance(f, DeviceFile) else 40
    index, size, _ = session.pick(_regions(session, fd) or [(0, PAGE, 0)])
    whole = (size + PAGE - 1) & ~(PAGE - 1)
    offset = session.draw(mostly(st.just(index << shift) | st.just((index << shift) + PAGE),
                                 st.integers(0, 9).map(lambda i: i << shift) | st.sampled_from([1, PAGE, 1 << 62])))
    length = session.draw(mostly(st.sampled_from([whole, PAGE, max(whole - PAGE, PAGE), whole + PAGE]),
                                 st.one_of(st.sampled_from([0, 1, 0x100000]), st.integers(0, 1 << 22))))
    prot = session.draw(st.integers(0, 7))
    mapping = session.syscall("mmap", fd, length, offset, prot)
    if mapping is None:
        return
    session.maps.append(mapping)
    f = session.kernel.files[fd]
    info = region_info(session, fd, offset >> f.device.offset_shift)
    within = offset & ((1 << f.device.offset_shift) - 1)
    assert info is not None and info.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP, "mmap of a region that cannot be"
    # vfio_pci_core_mmap measures the region in whole pages: a 256-byte BAR maps as one page.
    pages = (info.size + PAGE - 1) & ~(PAGE - 1)
    assert within + length <= pages, f"mmap of {length:#x} at {within:#x} reaches past a {info.size:#x} region"
    assert len(mapping) == length


def op_eventfd_signal(session: Session) -> None:
    """User writes to eventfds the kernel may be watching (unmask and resample eventfds)."""
    if session.eventfds:
        session.syscall("eventfd_write", session.pick(session.eventfds), 1)


def op_sysfs(session: Session, paths: list[str]) -> None:
    path = session.draw(st.one_of(st.sampled_from(paths), st.sampled_from(paths).map(lambda p: p + "/.."),
                                  st.text(max_size=30).map(lambda t: "/sys/" + t)))
    call = session.draw(st.sampled_from(["readlink", "exists", "listdir", "read_text", "write_text"]))
    if call == "write_text":
        session.syscall(call, path, session.draw(st.one_of(st.sampled_from(SYSFS_WORDS), st.text(max_size=20))))
    else:
        session.syscall(call, path)


# -- targets ------------------------------------------------------------------------------------------------
def _sysfs_paths(kernel: FakeKernel) -> list[str]:
    paths = []
    for top in ("/sys/bus/pci", "/sys/bus/platform", "/sys/bus/css", "/sys/bus/mdev", "/sys/kernel/iommu_groups"):
        for root, dirs, files in kernel._os.walk(top):
            paths += [f"{root}/{name}" for name in (*dirs, *files)][:40]
    return paths + ["/dev/vfio/vfio", "/dev/vfio", "/sys", "/nonexistent"]


SYSFS_WORDS = ["vfio-pci", "", "\n", "0000:00:03.0", "0000:01:00.0", "0000:09:00.0", "(null)", "edu"]

TARGETS = {
    "container and group": (pci_topology, ("open", "close", "container", "group", "eventfd")),
    "vfio-pci device": (pci_topology, ("open", "close", "container", "group", "device", "read", "write", "mmap",
                                      "eventfd", "signal")),
    "vfio-platform device": (lambda: Topology.named("platform"), ("open", "close", "container", "group", "device",
                                                                 "read", "write", "mmap", "eventfd", "signal")),
    "vfio-ccw device": (lambda: Topology.named("ccw"), ("open", "close", "container", "group", "device", "read",
                                                       "write", "mmap", "eventfd", "signal")),
    "sysfs and paths": (pci_topology, ("open", "close", "sysfs")),
}


def _ready_device(session: Session, groups: list[int], names: dict[int, list[str]]) -> None:
    """Most examples start from a working device fd, so the device ioctls get past EINVAL."""
    group = session.draw(st.sampled_from(groups))
    container = session.syscall("open", "/dev/vfio/vfio", os.O_RDWR)
    gfd = session.syscall("open", session.kernel.groups[group].node, os.O_RDWR)
    session.opened(container)
    session.opened(gfd)
    if container is None or gfd is None:
        return
    session.syscall("ioctl", gfd, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
    session.syscall("ioctl", container, uapi.VFIO_SET_IOMMU, _iommu_type(session.kernel, group))
    for name in names[group]:
        session.opened(session.syscall("ioctl", gfd, uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0"))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_the_fake_kernel(target, record_reliability):
    topology, kinds = TARGETS[target]
    examples = 0
    dma = mmap.mmap(-1, DMA_PAGES * PAGE)
    with FakeKernel(topology()) as kernel:
        t = kernel.topology
        names: dict[int, list[str]] = {}
        for spec in (*t.devices, *t.platform, *t.ccw):
            if spec.group is not None:
                names.setdefault(spec.group, []).append(getattr(spec, "uuid", None) or getattr(spec, "bdf", None)
                                                        or spec.name)
        groups = sorted(names)
        open_paths = ["/dev/vfio/vfio", *(kernel.groups[g].node for g in groups), "/dev/vfio/999", "/dev/vfio/",
                      "/sys/bus/pci/devices", "/dev/null"]
        sysfs = _sysfs_paths(kernel)
        all_names = [n for group in names.values() for n in group]
        ops = {"open": lambda s: op_open(s, open_paths), "close": op_close, "container": op_container_ioctl,
               "group": lambda s: op_group_ioctl(s, all_names), "device": op_device_ioctl, "read": op_read,
               "write": op_write, "mmap": op_mmap, "eventfd": op_eventfd, "signal": op_eventfd_signal,
               "sysfs": lambda s: op_sysfs(s, sysfs)}
        steps = st.sampled_from([ops[k] for k in kinds])
        _warm_up(kernel, names)
        baseline, fds_before, bindings = census(kernel), process_fds(), _bindings(kernel)
        clean = False

        @PROFILE
        @given(st.data())
        def example(data):
            nonlocal examples
            examples += 1
            session = Session(kernel, dma, data)
            try:
                if "device" in kinds and data.draw(st.sampled_from([True, True, True, False])):
                    _ready_device(session, groups, names)
                for _ in range(data.draw(st.integers(1, 12))):
                    data.draw(steps)(session)
            finally:
                session.close_all()
                _rebind(kernel, bindings)
            assert census(kernel) == baseline, "an example left something open in the kernel"
            assert process_fds() == fds_before, "an example left an fd open in the process"

        try:
            example()
            clean = True
        finally:
            record_reliability({"kind": "fuzz", "target": target, "examples": examples,
                                            "leaks": int(not clean)})
    dma.close()


def _bindings(kernel: FakeKernel) -> list:
    """Which driver each device is bound to, and its driver_override, so sysfs writes are undone."""
    t = kernel.topology
    return [(spec, spec.driver, kernel.read_text(f"/sys/bus/pci/devices/{spec.bdf}/driver_override")
             if hasattr(spec, "bdf") else None) for spec in (*t.devices, *t.platform)]


def _rebind(kernel: FakeKernel, bindings: list) -> None:
    """Each example starts from the topology's bindings, so it replays the same way."""
    for spec, driver, override in bindings:
        if spec.driver != driver:
            kernel.sysfs.set_driver(spec, driver)
        if override is not None:
            kernel.write_text(f"/sys/bus/pci/devices/{spec.bdf}/driver_override", override)


def _iommu_type(kernel: FakeKernel, group: int) -> int:
    return uapi.VFIO_NOIOMMU_IOMMU if kernel.groups[group].noiommu else uapi.VFIO_TYPE1v2_IOMMU


def _warm_up(kernel: FakeKernel, names: dict[int, list[str]]) -> None:
    """What the kernel makes on first use and keeps, started before the baseline so it is not taken
    for an example's leak: its worker thread (an epoll and an eventfd) and each device's RAM BARs."""
    fd = os.eventfd(0)
    kernel.watch(fd, lambda: None)
    kernel.watch(fd, None)
    os.close(fd)
    for group, members in names.items():
        container, gfd = kernel.open("/dev/vfio/vfio"), kernel.open(kernel.groups[group].node)
        kernel.ioctl(gfd, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
        kernel.ioctl(container, uapi.VFIO_SET_IOMMU, _iommu_type(kernel, group))
        for name in members:
            try:
                kernel.close(kernel.ioctl(gfd, uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0"))
            except OSError:
                pass
        kernel.close(gfd)
        kernel.close(container)


# -- what the fuzzing found, pinned ----------------------------------------------------------------------
@pytest.fixture
def edu_fd():
    with FakeKernel() as kernel:
        container, group = kernel.open("/dev/vfio/vfio"), kernel.open("/dev/vfio/3")
        kernel.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
        kernel.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        yield kernel, kernel.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:00:03.0\0")


def test_found_immutable_bytes_are_an_argument_like_any_other(edu_fd):
    """The fake wrote its answer into the caller's bytes (TypeError); Linux copies to user memory
    the caller may not look at, as RealHost's copy does."""
    kernel, fd = edu_fd
    assert kernel.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, bytes(uapi.vfio_device_info.pack())) == 0


@pytest.mark.parametrize("call", ["pread", "pwrite"])
def test_found_a_negative_offset_is_einval(edu_fd, call):
    """The fake indexed its BARs with the negative region number (IndexError); rw_verify_area
    refuses a negative position before any driver sees it."""
    kernel, fd = edu_fd
    with pytest.raises(OSError) as e:
        kernel.pread(fd, 1, -6_597_069_766_657) if call == "pread" else kernel.pwrite(fd, b"\0", -1)
    assert e.value.errno == errno.EINVAL


def test_found_a_ret_code_past_the_errno_range_is_returned_not_raised():
    """A stale ret_code the user wrote into the I/O region (the state machine ignores a request with
    no function) came back as OSError(1241513866); Linux passes a value outside -4095..-1 through as
    the write's result."""
    with FakeKernel("ccw") as kernel:
        container, group = kernel.open("/dev/vfio/vfio"), kernel.open("/dev/vfio/30")
        kernel.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
        kernel.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        fd = kernel.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, b"8a1c0bd0-7e7a-4f6a-9c3e-000000000313\0")
        at = uapi.ccw_io_region.offsetof("ret_code")
        assert kernel.pwrite(fd, struct.pack("=i", -1241513866), at) == -1241513866
        assert kernel.pwrite(fd, b"\0", 0) == -1241513866
        with pytest.raises(OSError) as e:
            kernel.pwrite(fd, struct.pack("=i", -errno.EIO), at)
        assert e.value.errno == errno.EIO


def test_found_hot_reset_info_past_the_buffer_is_efault():
    """argsz claimed room the buffer did not have and the fake's pack_into raised struct.error;
    the kernel's copy_to_user of the devices fails with EFAULT after the header went back."""
    with FakeKernel(pci_topology()) as kernel:
        container, group = kernel.open("/dev/vfio/vfio"), kernel.open("/dev/vfio/9")
        kernel.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
        kernel.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        fd = kernel.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:01:00.0\0")
        buf = uapi.vfio_pci_hot_reset_info.pack(argsz=0x7FFFFFFF)
        with pytest.raises(OSError) as e:
            kernel.ioctl(fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        assert e.value.errno == errno.EFAULT and uapi.vfio_pci_hot_reset_info.unpack(buf).count == 1
