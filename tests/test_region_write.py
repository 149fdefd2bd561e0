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
