"""Fake kernel pieces that conformance does not reach: MMIO traps, sysfs binding, profiles."""

import errno
import os
import sys

import pytest

from conformance.backends import fake_kernel
from fakekernel import FakeKernel, Profile, Topology
from fakekernel.eventfd import EventfdCtx
from fakekernel.mmio import MMIOMapping, split_access
from vfio_impl import AddressSpace, Device, uapi


def test_split_access_is_naturally_aligned():
    assert list(split_access(1, 7)) == [(1, 1), (2, 2), (4, 4)]
    assert list(split_access(0, 12, (4, 2, 1))) == [(0, 4), (4, 4), (8, 4)]


def test_mmio_mapping_traps_every_access():
    log = []
    regs = {}
    m = MMIOMapping(lambda off, n: regs.get(off, 0), lambda off, n, v: (log.append((off, n, v)), regs.__setitem__(off, v)),
                    4096, lambda: True)
    m[8:12] = (7).to_bytes(4, "little")
    m[16] = 0xAB
    assert m[8:12] == (7).to_bytes(4, "little") and m[16] == 0xAB and len(m) == 4096
    assert log == [(8, 4, 7), (16, 1, 0xAB)]
    with pytest.raises(IndexError):
        m[4090:4100] = bytes(10)
    with pytest.raises(ValueError):
        m[0:8:2]
    with m:
        pass
    with pytest.raises(ValueError):
        m.read(0, 4)


def test_mmio_with_memory_decode_off_is_a_bus_error():
    m = MMIOMapping(lambda o, n: 0, lambda o, n, v: None, 4096, lambda: False)
    with pytest.raises(OSError) as exc:
        m.write(0, 4, 1)
    assert exc.value.errno == errno.EFAULT


def test_unbind_and_bind_follow_the_group_node():
    with FakeKernel("shared-group") as k:
        k.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:01:01.0")
        assert k.exists("/dev/vfio/5")
        k.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0")
        assert not k.exists("/dev/vfio/5")
        with pytest.raises(OSError) as exc:
            k.open("/dev/vfio/5")
        assert exc.value.errno == errno.ENOENT
        k.write_text("/sys/bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci")
        assert k.read_text("/sys/bus/pci/devices/0000:01:00.0/driver_override") == "vfio-pci\n"
        k.write_text("/sys/bus/pci/drivers/vfio-pci/bind", "0000:01:00.0")
        assert k.readlink("/sys/bus/pci/devices/0000:01:00.0/driver").endswith("/vfio-pci")
        with pytest.raises(OSError) as exc:
            k.write_text("/sys/bus/pci/drivers/vfio-pci/bind", "0000:01:00.0")
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(OSError) as exc:
            k.write_text("/sys/bus/pci/devices/0000:01:00.0/vendor", "0x1")
        assert exc.value.errno == errno.EACCES
        assert k.listdir("/sys/kernel/iommu_groups/5/devices") == ["0000:01:00.0", "0000:01:01.0"]


def test_get_device_fd_asks_the_groups_bound_devices_by_their_drivers_rule():
    """A device unbound from its VFIO driver is not found; vfio-pci takes options after the BDF
    and refuses those it does not know; binding again brings the device back."""
    with FakeKernel("shared-group") as k:
        k.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:01:01.0")
        group, container = k.open("/dev/vfio/5"), k.open("/dev/vfio/vfio")
        k.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, container.to_bytes(4, sys.byteorder))
        k.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        for name, code in (("0000:01:01.0", errno.ENODEV), ("0000:01:00.0 vf_token=0", errno.EINVAL),
                           ("0000:01:00.", errno.ENODEV)):
            with pytest.raises(OSError) as exc:
                k.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0")
            assert exc.value.errno == code, name
        k.close(k.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:01:00.0\0"))
        k.write_text("/sys/bus/pci/drivers/vfio-pci/bind", "0000:01:01.0")
        k.close(k.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:01:01.0\0"))
        k.close(group)
        k.close(container)
        assert k.open_files() == {}


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown topology 'nope'"):
        Topology.named("nope")
    with pytest.raises(ValueError, match="unknown kernel profile"):
        Profile.named("2.6")


def test_host_calls_on_foreign_fds():
    with FakeKernel() as k:
        r, w = os.pipe()
        with pytest.raises(OSError) as exc:
            k.ioctl(r, 0x3B64, 0)
        assert exc.value.errno == errno.ENOTTY
        k.close(r)
        k.close(w)
        with pytest.raises(OSError) as exc:
            k.ioctl(r, 0x3B64, 0)
        assert exc.value.errno == errno.EBADF
        with pytest.raises(OSError) as exc:
            k.open("/sys/bus/pci/devices/0000:00:03.0/vendor")
        assert exc.value.errno == errno.ENXIO
        g = k.open("/dev/vfio/3")
        with pytest.raises(OSError) as exc:
            k.mmap(g, 4096, 0)
        assert exc.value.errno == errno.ENODEV
        assert k.open_files() == {"group": 1}


def test_eventfd_ctx_checks_the_fd():
    with pytest.raises(OSError) as exc:
        EventfdCtx(-1)
    assert exc.value.errno == errno.EBADF
    fd = os.eventfd(0)
    ctx = EventfdCtx(fd)
    os.close(fd)
    ctx.signal()
    assert ctx.clear() == 1
    ctx.put()
    ctx.put()


def test_set_irqs_shorter_than_its_header_is_efault():
    """copy_from_user of vfio_irq_set's minsz fails before any validation, as on Linux."""
    from conformance.backends import describe
    from conformance.raw import RawSession

    with FakeKernel() as k:
        session = RawSession(k, describe(k, "0000:00:03.0"))
        try:
            _, _, device = session.open_device()
            with pytest.raises(OSError) as exc:
                k.ioctl(device, uapi.VFIO_DEVICE_SET_IRQS, bytearray(8))
            assert exc.value.errno == errno.EFAULT
        finally:
            session.close()


@pytest.mark.parametrize("topology, sysfs", [
    ("default", "/sys/bus/pci/devices/0000:00:03.0"),
    ("platform", "/sys/bus/platform/devices/c0000000.platform-test"),
    ("ccw", "/sys/bus/css/devices/0.0.0313/8a1c0bd0-7e7a-4f6a-9c3e-000000000313"),
])
def test_region_info_of_a_bad_pointer_or_short_buffer_is_efault(topology, sysfs):
    """copy_from_user fails before argsz is looked at, on every bus driver's device fd; an
    argsz below the struct is EINVAL, and nothing is written back in either case."""
    with FakeKernel(Topology.named(topology)) as k, AddressSpace(k) as space:
        device = Device.attach(space, sysfs)
        for arg, code in ((0, errno.EFAULT), (bytearray(31), errno.EFAULT),
                          (uapi.vfio_region_info.pack(argsz=31), errno.EINVAL)):
            before = bytes(arg) if not isinstance(arg, int) else arg
            with pytest.raises(OSError) as exc:
                k.ioctl(device.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, arg)
            assert exc.value.errno == code and (isinstance(arg, int) or bytes(arg) == before)
        device.close()


def test_sysfs_resource_lists_bars_as_linux_prints_them():
    """The lines the CI VM's Linux 6.1 printed for its ivshmem-plain (addresses aside): a 32-bit
    register BAR, no BAR1, and a 64-bit prefetchable BAR2; tools tell ivshmem-doorbell by BAR1."""
    from conformance.backends import describe

    with fake_kernel("vm") as kernel:
        sysfs = "/sys/bus/pci/devices/0000:00:04.0"
        lines = kernel.read_text(f"{sysfs}/resource").splitlines()
        assert len(lines) == 13
        bar0, bar1, bar2 = (line.split() for line in lines[:3])
        assert int(bar0[1], 16) - int(bar0[0], 16) == 0xFF and bar0[2] == "0x0000000000040200"
        assert bar1 == ["0x0000000000000000"] * 3
        assert int(bar2[1], 16) - int(bar2[0], 16) == (1 << 20) - 1 and bar2[2] == "0x000000000014220c"
        assert describe(kernel, "0000:00:04.0").model == "ivshmem"
