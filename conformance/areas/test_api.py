"""Container and group ioctls: versions, extensions, SET_IOMMU, viability, sharing."""

import errno
import os

import pytest

from vfio_impl import AddressSpace, Device, VFIOError, uapi

from ..raw import errno_of, profile_of

pytestmark = pytest.mark.vfio(device="edu")


def test_api_version(vfio, raw):
    assert vfio.host.ioctl(raw.container(), uapi.VFIO_GET_API_VERSION, 0) == uapi.VFIO_API_VERSION


@pytest.mark.parametrize("ext", [uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU])
def test_type1_extensions_before_set_iommu(vfio, raw, ext):
    assert vfio.host.ioctl(raw.container(), uapi.VFIO_CHECK_EXTENSION, ext) == 1


@pytest.mark.parametrize("ext", [0, uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_DMA_CC_IOMMU, uapi.VFIO_EEH,
                                 uapi.VFIO_SPAPR_TCE_v2_IOMMU, uapi.VFIO_NOIOMMU_IOMMU, 1000])
def test_unsupported_extensions_are_zero(vfio, raw, ext):
    assert vfio.host.ioctl(raw.container(), uapi.VFIO_CHECK_EXTENSION, ext) == 0


def test_set_iommu_needs_a_group(vfio, raw):
    assert errno_of(vfio.host.ioctl, raw.container(), uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) == errno.EINVAL


def test_group_viable_before_container(vfio, raw):
    buf = uapi.vfio_group_status.pack()
    vfio.host.ioctl(raw.group(), uapi.VFIO_GROUP_GET_STATUS, buf)
    assert uapi.vfio_group_status.unpack(buf).flags == uapi.VFIO_GROUP_FLAGS_VIABLE


def test_group_status_after_set_container(vfio, raw):
    c, g = raw.container(), raw.group()
    raw.set_container(g, c)
    buf = uapi.vfio_group_status.pack()
    vfio.host.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, buf)
    assert uapi.vfio_group_status.unpack(buf).flags == uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET


def test_set_iommu_twice(vfio, raw):
    c, _ = raw.setup()
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) == errno.EINVAL


def test_set_iommu_unsupported_model_is_enodev(vfio, raw):
    c, g = raw.container(), raw.group()
    raw.set_container(g, c)
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU) == errno.ENODEV


def test_set_iommu_with_an_extension_that_is_not_a_model(vfio, raw):
    c, g = raw.container(), raw.group()
    raw.set_container(g, c)
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_UNMAP_ALL) == errno.EINVAL


def test_type1_v1_model_works(vfio, raw):
    c, _ = raw.setup(uapi.VFIO_TYPE1_IOMMU)
    assert vfio.host.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1_IOMMU) == 1


def test_group_opens_once(vfio, raw):
    raw.group()
    assert errno_of(raw.group) == errno.EBUSY


def test_group_reopens_after_close(vfio, raw):
    raw.close_fd(raw.group())
    raw.group()


def test_set_container_twice(vfio, raw):
    c, g = raw.container(), raw.group()
    raw.set_container(g, c)
    assert errno_of(raw.set_container, g, raw.container()) == errno.EINVAL


@pytest.mark.parametrize("other", ["the group itself", "/dev/null"])
def test_set_container_with_a_fd_that_is_no_container(vfio, raw, other):
    """6.1 answers EINVAL; from 6.2 group.c tries a container, then an iommufd, then gives EBADFD."""
    g = raw.group()
    fd = g if other == "the group itself" else raw.track(os.open(other, os.O_RDWR))
    assert errno_of(raw.set_container, g, fd) == profile_of(vfio).unrecognized_container_errno


def test_unset_container_without_one(vfio, raw):
    assert errno_of(vfio.host.ioctl, raw.group(), uapi.VFIO_GROUP_UNSET_CONTAINER, 0) == errno.EINVAL


def test_unset_container_with_an_open_device(vfio, raw):
    _, g, _ = raw.open_device()
    assert errno_of(vfio.host.ioctl, g, uapi.VFIO_GROUP_UNSET_CONTAINER, 0) == errno.EBUSY


def test_unset_container_deprivileges_it(vfio, raw):
    c, g = raw.setup()
    vfio.host.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER, 0)
    buf = uapi.vfio_iommu_type1_info.pack()
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_GET_INFO, buf) == errno.EINVAL
    raw.set_container(g, c)
    vfio.host.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)


def test_container_ioctl_before_set_iommu(vfio, raw):
    buf = uapi.vfio_iommu_type1_dma_map.pack(flags=3, size=4096)
    assert errno_of(vfio.host.ioctl, raw.container(), uapi.VFIO_IOMMU_MAP_DMA, buf) == errno.EINVAL


def test_unknown_container_ioctl_after_set_iommu(vfio, raw):
    c, _ = raw.setup()
    assert errno_of(vfio.host.ioctl, c, uapi.VFIO_IOMMU_ENABLE, 0) == errno.ENOTTY


def test_unknown_group_ioctl(vfio, raw):
    assert errno_of(vfio.host.ioctl, raw.group(), uapi.VFIO_DEVICE_RESET, 0) == errno.ENOTTY


def test_library_reuses_group_and_container(vfio, vfio_device):
    with AddressSpace(vfio.host) as space:
        dev = Device.attach(space, vfio_device.sysfs)
        assert list(space.groups) == [vfio_device.group]
        assert len(space.containers) == 1
        with pytest.raises(VFIOError, match="is already attached") as exc:
            Device.attach(space, vfio_device.sysfs)
        assert exc.value.errno == errno.EBUSY
        dev.close()
        assert not space.groups and not space.containers


@pytest.mark.vfio(device="edu", topology="two-groups")
def test_second_group_joins_the_existing_container(vfio):
    with AddressSpace(vfio.host) as space:
        a = Device.attach(space, "/sys/bus/pci/devices/0000:00:03.0")
        b = Device.attach(space, "/sys/bus/pci/devices/0000:00:04.0")
        assert len(space.groups) == 2 and len(space.containers) == 1
        assert a.group.container is b.group.container
        a.close()
        assert len(space.containers) == 1
        b.close()
        assert not space.containers


@pytest.mark.vfio(device="edu", topology="shared-group")
def test_devices_of_one_group_share_it(vfio):
    with AddressSpace(vfio.host) as space:
        a = Device.attach(space, "/sys/bus/pci/devices/0000:01:00.0")
        b = Device.attach(space, "/sys/bus/pci/devices/0000:01:01.0")
        assert a.group is b.group and len(space.groups) == 1
        b.close()
        assert a.group.fd >= 0
        a.close()
        assert not space.groups


@pytest.mark.vfio(device="edu", topology="nonviable")
def test_nonviable_group_status_and_set_container(vfio, raw):
    g = raw.group(5)
    buf = uapi.vfio_group_status.pack()
    vfio.host.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, buf)
    assert uapi.vfio_group_status.unpack(buf).flags == 0
    assert errno_of(raw.set_container, g, raw.container()) == errno.EPERM


@pytest.mark.vfio(device="edu", topology="nonviable")
def test_nonviable_group_message(vfio):
    with AddressSpace(vfio.host) as space:
        with pytest.raises(VFIOError) as exc:
            Device.attach(space, "/sys/bus/pci/devices/0000:01:00.0")
        assert "group 5 is not viable, please ensure all devices within the iommu_group are bound " \
               "to their vfio bus driver" in str(exc.value)
        assert not space.groups and not space.containers


@pytest.mark.vfio(device="edu", topology="no-group")
def test_device_without_iommu_group(vfio):
    with AddressSpace(vfio.host) as space:
        with pytest.raises(VFIOError, match="no iommu_group for device"):
            Device.attach(space, "/sys/bus/pci/devices/0000:00:03.0")


def test_no_such_host_device(vfio):
    with AddressSpace(vfio.host) as space:
        with pytest.raises(VFIOError, match="no such host device: /sys/bus/pci/devices/0000:7f:1f.7") as exc:
            Device.attach(space, "/sys/bus/pci/devices/0000:7f:1f.7")
        assert exc.value.errno == errno.ENOENT
