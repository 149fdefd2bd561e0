"""The IOMMU backend seam: every flavour gets its device through Device.attach and the address
space's backend, the sysfs group lookup is one function, and the memory listener is the backend's
whatever the backend is."""

import errno
import pathlib
import re

import pytest

from conformance.backends import describe
from fakekernel import FakeKernel
from vfio_impl import AddressSpace, Machine, VFIOError, VirtualClock
from vfio_impl.core.container import Container
from vfio_impl.core.device import Device
from vfio_impl.core.iommu import PAGE_SIZE, IOMMUBackend, IOMMUGroupError, IOMMUInfo, iommu_group
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.flavours.pci import VFIOPCIDevice
from vfio_impl.flavours.platform import VFIOPlatformDevice
from vfio_impl.vmm.css import ChannelSubsystem

EDU = "/sys/bus/pci/devices/0000:00:03.0"
PLATFORM = "c0000000.platform-test"
CCW_UUID = "8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
FLAVOURS = ("flavours/pci", "flavours/platform", "flavours/ccw", "vmm/ivshmem")
# What only a backend may touch: groups, containers, their ioctls and their device nodes.
BACKEND_ONLY = re.compile(r"\bGroup\b|\bContainer\b|/dev/vfio|get_device_fd|VFIO_GROUP_|VFIO_SET_IOMMU|"
                          r"Device\.get\b|iommu_group_from_link")


class Recording(IOMMUBackend):
    """A backend that attaches through type1 and writes down what it is asked: the log shows that
    a flavour reaches the backend only by way of Device.attach."""

    log: list

    def __init__(self, inner: Container):
        self.inner = inner

    @classmethod
    def attach_device(cls, space, device, devname, groupid):
        cls.log.append(("attach_device", device.name, devname, groupid))
        Container.attach_device(space, device, devname, groupid)
        device.container = cls(device.container)

    def detach_device(self, device):
        self.log.append(("detach_device", device.name))
        self.inner.detach_device(device)

    def map_dma(self, iova, size, vaddr, readonly=False):
        self.inner.map_dma(iova, size, vaddr, readonly)

    def unmap_dma(self, iova, size):
        return self.inner.unmap_dma(iova, size)

    def get_info(self):
        return self.inner.get_info()


class Mappings(IOMMUBackend):
    """An IOMMU context with no kernel behind it: what the memory listener asks of any backend."""

    def __init__(self):
        self.mapped: dict[int, tuple[int, int, bool]] = {}

    @classmethod
    def attach_device(cls, space, device, devname, groupid):
        raise VFIOError("no devices here", errno.ENODEV)

    def detach_device(self, device):
        raise AssertionError("never attached")

    def map_dma(self, iova, size, vaddr, readonly=False):
        self.mapped[iova] = (size, vaddr, readonly)

    def unmap_dma(self, iova, size):
        return sum(self.mapped.pop(iova)[0] for iova in [i for i in self.mapped if iova <= i < iova + size])

    def get_info(self):
        return IOMMUInfo(0, PAGE_SIZE, ())


@pytest.fixture
def recording():
    return type("Recording", (Recording,), {"log": []})


def space_on(kernel, iommu=Container) -> AddressSpace:
    return AddressSpace(kernel, Machine(VirtualClock()), iommu)


# -- the one group lookup ------------------------------------------------------------------------
def test_the_group_lookup_reads_the_link_as_qemu_does():
    with FakeKernel("platform") as k:
        assert iommu_group(k, f"/sys/bus/platform/devices/{PLATFORM}") == 20
        with pytest.raises(IOMMUGroupError) as e:
            iommu_group(k, "/sys/bus/platform/devices/c1000000.no-group")
        assert e.value.message == "no iommu_group found" and e.value.errno == errno.ENOENT
        with pytest.raises(VFIOError) as e:
            iommu_group(k, "/sys/bus/platform/devices/c2000000.bad-group")
        assert type(e.value) is VFIOError and e.value.errno == errno.EINVAL
        assert e.value.message == "failed to read ../../../kernel/iommu_groups/bogus"


@pytest.mark.parametrize("topology,group", [("default", 3), ("no-group", None)])
def test_describe_uses_the_same_lookup_and_says_none_for_no_group(topology, group):
    with FakeKernel(topology) as k:
        assert describe(k, "0000:00:03.0").group == group


# -- every flavour through Device.attach and the backend -----------------------------------------
def test_device_attach_and_close_go_through_the_backend(recording):
    with FakeKernel() as k, space_on(k, recording) as space:
        device = Device.attach(space, EDU)
        assert recording.log == [("attach_device", "0000:00:03.0", "0000:00:03.0", 3)]
        assert space.devices == [device] and isinstance(device.container, recording)
        assert space.containers == [device.group.container]
        device.close()
        assert recording.log[-1] == ("detach_device", "0000:00:03.0")
        assert not space.devices and not space.groups and not space.containers


@pytest.mark.parametrize("topology,realize,expect", [
    ("default", lambda space: VFIOPCIDevice.realize(space, space.machine, host="0000:00:03.0"),
     ("0000:00:03.0", "0000:00:03.0", 3)),
    ("platform", lambda space: VFIOPlatformDevice.realize(space, space.machine, host=PLATFORM),
     (PLATFORM, PLATFORM, 20)),
    ("ccw", lambda space: VFIOCCWDevice.realize(space, space.machine, sysfsdev=f"/sys/bus/mdev/devices/{CCW_UUID}",
                                                css=ChannelSubsystem()),
     ("0.0.0313", CCW_UUID, 30)),
], ids=["pci", "platform", "ccw"])
def test_each_flavour_gets_its_device_from_the_spaces_backend(recording, monkeypatch, topology, realize, expect):
    attaches = []
    attach = Device.attach.__func__

    def counted(cls, *args, **kwargs):
        attaches.append(args)
        return attach(cls, *args, **kwargs)
    monkeypatch.setattr(Device, "attach", classmethod(counted))
    with FakeKernel(topology) as k, space_on(k, recording) as space:
        dev = realize(space)
        assert len(attaches) == 1 and recording.log == [("attach_device", *expect)]
        dev.vbasedev.close()
        assert recording.log[-1] == ("detach_device", expect[0]) and not space.groups


def test_a_second_attach_is_refused_before_the_backend_is_asked(recording):
    with FakeKernel("platform") as k, space_on(k, recording) as space:
        first = VFIOPlatformDevice.realize(space, space.machine, host=PLATFORM)
        with pytest.raises(VFIOError) as e:
            VFIOPlatformDevice.realize(space, space.machine, host=PLATFORM)
        assert e.value.message == f"vfio {PLATFORM}: device is already attached"
        assert [c[0] for c in recording.log] == ["attach_device"]
        first.exit()


def test_no_flavour_touches_groups_containers_or_dev_vfio():
    for flavour in FLAVOURS:
        source = (pathlib.Path(__file__).parent.parent / "vfio_impl" / f"{flavour}.py").read_text()
        assert not BACKEND_ONLY.findall(source), f"vfio_impl/{flavour}.py reaches past Device.attach"


# -- the memory listener belongs to every backend --------------------------------------------------
def test_the_memory_listener_maps_whole_pages_into_any_backend():
    machine = Machine(VirtualClock())
    context = Mappings()
    try:
        ram = machine.add_ram(0x100000, 4 * PAGE_SIZE)
        machine.add_ram(0x200000, PAGE_SIZE - 1)
        machine.register_listener(context)
        assert context.mapped == {0x100000: (4 * PAGE_SIZE, ram.vaddr, False)}
        machine.remove_ram(ram)
        assert context.mapped == {}
    finally:
        machine.close()
