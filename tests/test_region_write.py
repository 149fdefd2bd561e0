"""Region.write takes (addr, value, size), QEMU's order, on the mapped and the trapped path alike;
a call still in the old (addr, size, value) order fails unless its value happens to be a size."""

import errno

import pytest

from fakekernel import FakeKernel
from vfio_impl import AddressSpace, Device, VFIOError

LIVENESS = 0x04


@pytest.fixture
def bar0():
    with FakeKernel() as kernel, AddressSpace(kernel) as space:
        yield Device.attach(space, "/sys/bus/pci/devices/0000:00:03.0").region(0)


@pytest.mark.parametrize("mapped", [False, True])
def test_write_takes_addr_value_size(bar0, mapped):
    if mapped:
        bar0.mmap()
    bar0.write(LIVENESS, 0x12345678, 4)
    assert bar0.read(LIVENESS, 4) == ~0x12345678 & 0xFFFFFFFF


@pytest.mark.parametrize("mapped", [False, True])
def test_the_old_order_is_refused(bar0, mapped):
    if mapped:
        bar0.mmap()
    with pytest.raises(VFIOError) as e:
        bar0.write(LIVENESS, 4, 0x12345678)
    assert e.value.errno == errno.EINVAL and "write takes addr, value, size" in e.value.message
    assert bar0.read(LIVENESS, 4) == 0


@pytest.mark.parametrize("as_big_endian", [False, True], ids=["this host", "as a big-endian host"])
def test_the_mapped_path_stores_little_endian_words_on_any_host(monkeypatch, as_big_endian):
    """ivshmem's BAR2 is plain memory, so the mapped path is a memoryview: on a big-endian host
    its words must still land in the region's byte order, the order the trapped path uses."""
    from conformance.backends import fake_kernel
    from vfio_impl.core import region

    if as_big_endian:
        monkeypatch.setattr(region, "LITTLE_ENDIAN_HOST", False)
    with fake_kernel("vm") as kernel, AddressSpace(kernel) as space:
        bar2 = Device.attach(space, "/sys/bus/pci/devices/0000:00:04.0").region(2)
        bar2.mmap()
        assert bar2.write_mapped(0x10, 0x11223344, 4) and bar2.write_mapped(0x18, 0x0102030405060708, 8)
        assert bar2.pread(0x10, 4) == b"\x44\x33\x22\x11"
        assert bar2.pread(0x18, 8) == bytes(range(8, 0, -1))
        bar2.pwrite(0x20, b"\x01\x00\x00\x80")
        assert bar2.read(0x20, 4) == 0x80000001 and bar2.read_mapped(0x10, 4) == 0x11223344
        assert bar2.register(0x18, 8).read() == 0x0102030405060708
