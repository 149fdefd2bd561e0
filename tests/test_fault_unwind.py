"""One test per error-path defect the fault walk found in vfio_impl: each injects the failure that
showed it and checks the step's message and that nothing is left behind."""

import errno
import os
import re

import pytest

from conformance.reliability import ProcessCalls, driver_refs, process_fds
from fakekernel import FakeKernel
from fakekernel.faults import Fault, census
from vfio_impl import AddressSpace, Machine, VFIOError, VirtualClock
from vfio_impl.core.container import Group
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.flavours.pci import VFIOPCIDevice
from vfio_impl.flavours.platform import VFIOPlatformDevice
from vfio_impl.ivshmem.server import IvshmemServer
from vfio_impl.vmm import ivshmem as ivshmem_model
from vfio_impl.vmm.css import ChannelSubsystem

PAGE = 4096
CCW_MDEV = "/sys/bus/mdev/devices/8a1c0bd0-7e7a-4f6a-9c3e-000000000313"


@pytest.fixture
def kernel():
    with FakeKernel() as k:
        yield k


@pytest.fixture
def space(kernel):
    machine = Machine(VirtualClock())
    yield AddressSpace(kernel, machine)
    machine.close()


def nothing_left(kernel, space, kernel_before, fds_before):
    assert census(kernel) == kernel_before
    assert process_fds() == fds_before
    assert driver_refs(space) == {"groups": [], "containers": 0, "listeners": 0, "fd handlers": 0, "irqfds": 0,
                                  "msi routes": 0, "timers": False}


def test_a_listener_replay_refused_by_map_dma_is_reported_and_the_container_kept(kernel, space):
    """The seed's listener reports a section it cannot map and goes on: the container is set up
    with the other sections, and the next group still gets one."""
    space.machine.add_ram(0x100000, 4 * PAGE)
    space.machine.add_ram(0x200000, PAGE, readonly=True)
    with kernel.faults.inject(Fault("ioctl", request="VFIO_IOMMU_MAP_DMA", nth=2, errno=errno.ENOMEM)), \
            TraceRecorder() as tr:
        group = Group.get(space, 3)
    [message] = [f["message"] for f in tr.named("error")]
    assert re.fullmatch(r"vfio_dma_map\(0x200000, 0x1000, 0x[0-9a-f]+\) = -12 \(Cannot allocate memory\)", message)
    assert group.container.mappings == {0x100000: 4 * PAGE} and census(kernel)["dma mappings"] == 1
    group.put()
    Group.get(space, 3).put()


def test_a_failed_get_api_version_is_the_seeds_version_error(kernel, space):
    """The OSError escaped as it was, not a VFIOError; the seed reads the ioctl's -1 as the version."""
    kernel_before, fds_before = census(kernel), process_fds()
    with kernel.faults.inject("ioctl:VFIO_GET_API_VERSION,errno=EIO"):
        with pytest.raises(VFIOError) as e:
            Group.get(space, 3)
    assert e.value.message == ("vfio: failed to setup container for group 3: vfio: supported vfio version: 0, "
                               "reported version: -1")
    assert e.value.errno == errno.EIO
    nothing_left(kernel, space, kernel_before, fds_before)


def test_a_failed_check_extension_counts_as_yes_as_in_qemu(kernel, space):
    """The OSError escaped; QEMU's `if (ioctl(...CHECK_EXTENSION...))` takes -1 as supported."""
    with kernel.faults.inject("ioctl:VFIO_CHECK_EXTENSION,errno=EIO") as (rule,):
        group = Group.get(space, 3)
    assert rule.hits == 1 and group.container.iommu_type == 3
    group.put()


def test_a_failed_read_of_the_interrupt_pin_leaves_intx_off(space):
    """_enable_intx took config_read's 0xff for a pin and indexed "ABCD" with it (IndexError)."""
    kernel = space.host
    pin = Fault("pread", region=7, when=lambda call: call.offset == 0x3D, nth=2, errno=errno.EIO)
    with TraceRecorder() as trace, kernel.faults.inject(pin):
        dev = VFIOPCIDevice.realize(space, space.machine, host="0000:00:03.0")
    assert "vfio_pci_read_config(0000:00:03.0, 0x3d, 0x1) failed: Input/output error" in [
        f["message"] for f in trace.named("error")]
    assert dev.interrupt == "none" and not dev.vbasedev.eventfds
    dev.exit()


@pytest.mark.parametrize("topology,realize", [
    ("platform", lambda space: VFIOPlatformDevice.realize(space, space.machine, host="c0000000.platform-test")),
    ("ccw", lambda space: VFIOCCWDevice.realize(space, space.machine, sysfsdev=CCW_MDEV, css=ChannelSubsystem())),
])
def test_platform_and_ccw_get_their_device_from_the_group_they_hold(topology, realize):
    """Both went through Device.attach, which looked the device up in sysfs a second time; a failure
    there (a device gone between the two looks) left vfio-platform's group open. As in QEMU, the
    device now comes from the group they hold, and a failure to get it puts the group back."""
    with FakeKernel(topology) as kernel:
        machine = Machine(VirtualClock())
        space = AddressSpace(kernel, machine)
        with kernel.faults.record() as calls:
            dev = realize(space)
        dev.vbasedev.close()
        assert not any(c.kind == "exists" and "/sys/bus/css/" in c.path for c in calls)
        assert sum(c.kind == "readlink" and c.path.endswith("/iommu_group") for c in calls) == 1
        kernel_before, fds_before = census(kernel), process_fds()
        with kernel.faults.inject("ioctl:VFIO_GROUP_GET_DEVICE_FD,errno=ENODEV"):
            with pytest.raises(VFIOError) as e:
                realize(space)
        assert e.value.errno == errno.ENODEV and "error getting device" in e.value.message
        nothing_left(kernel, space, kernel_before, fds_before)
        machine.close()


def test_ivshmem_a_failed_fstat_of_the_shared_memory_is_the_seeds_error(tmp_path):
    """_check_shm_size let fstat's OSError out of realize (and out of the loop for the server's
    memory, leaving its fd open); the seed says 'exiting: fstat on fd N failed'."""
    calls = ProcessCalls(ivshmem_model)
    calls.install()
    machine = Machine(VirtualClock())
    name = f"vfio-unwind-{os.getpid()}"
    try:
        with calls.inject(Fault(when=lambda call: call.kind == "os.fstat", errno=errno.EIO)):
            with pytest.raises(VFIOError) as e:
                ivshmem_model.IVShmemState.realize(machine, shm=name, size="1M")
        assert re.fullmatch(r"exiting: fstat on fd \d+ failed: Input/output error", e.value.message)
        assert not os.path.exists(f"/dev/shm/{name}"), "the object realize created was left behind"
    finally:
        calls.uninstall()
        machine.close()


@pytest.fixture
def ivshmem_calls():
    calls = ProcessCalls(ivshmem_model)
    calls.install()
    yield calls
    calls.uninstall()


def test_ivshmem_a_socket_that_cannot_be_made_is_a_vfioerror(ivshmem_calls, tmp_path):
    """socket()'s OSError left realize raw; QEMU's socket chardev says 'Failed to create socket'."""
    machine = Machine(VirtualClock())
    path = tmp_path / "sock"
    with ivshmem_calls.inject(Fault(when=lambda call: call.kind == "socket.socket", errno=errno.EMFILE)):
        with pytest.raises(VFIOError) as e:
            ivshmem_model.IVShmemState.realize(machine, chardev=str(path))
    assert e.value.message == "Failed to create socket" and e.value.errno == errno.EMFILE
    assert not machine.fd_handlers
    machine.close()


def test_ivshmem_a_failed_read_from_the_server_is_its_hanging_up(ivshmem_calls, tmp_path):
    """recv_fds's ConnectionResetError went out of the device's fd handler and the machine's loop;
    QEMU's socket chardev treats a failed read as a disconnect, and so does the device now."""
    path = str(tmp_path / "sock")
    machine = Machine(VirtualClock())
    with IvshmemServer(path, vectors=1, size=1 << 20):
        dev = ivshmem_model.IVShmemState.realize(machine, chardev=path, vectors=1)
        with ivshmem_calls.inject(Fault(when=lambda call: call.kind == "socket.recv_fds", errno=errno.ECONNRESET)):
            with TraceRecorder() as trace:
                machine.run_until(lambda: trace.named("ivshmem_server_closed"), 2.0)
        assert trace.named("ivshmem_server_read_failed") == [{"name": "ivshmem", "errno": errno.ECONNRESET}]
        assert not machine.fd_handlers, "the loop still watches the server's socket"
        dev.exit()
    machine.close()
