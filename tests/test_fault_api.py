"""fakekernel.faults: rules that fail the nth call of a kind, every call matching a predicate, or
shorten a read or write; the call recorder; the census that finds leaks."""

import errno
import os

import pytest

from fakekernel import FakeKernel
from fakekernel.faults import Fault, census, leaks
from vfio_impl import AddressSpace, Device, VFIOError, uapi

EDU = "/sys/bus/pci/devices/0000:00:03.0"
CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40


@pytest.fixture
def kernel():
    with FakeKernel() as k:
        yield k


@pytest.fixture
def device(kernel):
    with AddressSpace(kernel) as space:
        yield Device.attach(space, EDU)


def test_a_kernel_with_no_rules_keeps_its_plain_methods(kernel):
    assert "ioctl" not in vars(kernel)
    with kernel.faults.inject(Fault("open", errno=errno.EMFILE)):
        assert "ioctl" in vars(kernel)
    assert "ioctl" not in vars(kernel) and not kernel.faults.rules


def test_the_nth_call_of_a_kind_fails_once_with_the_errno(kernel):
    rule, = kernel.faults.add(Fault("open", nth=2, errno=errno.EMFILE))
    first = kernel.open("/dev/vfio/vfio")
    with pytest.raises(OSError) as e:
        kernel.open("/dev/vfio/vfio")
    assert e.value.errno == errno.EMFILE and "injected at open /dev/vfio/vfio" in str(e.value)
    third = kernel.open("/dev/vfio/vfio")
    assert rule.hits == 1 and rule.seen == 3 and rule.spent
    assert kernel.open_files() == {"container": 2}
    kernel.close(first)
    kernel.close(third)


def test_every_rule_counts_its_calls_and_the_first_due_answers(kernel):
    eintr, eagain = kernel.faults.add("open,errno=EINTR,times=2", "open,errno=EAGAIN,nth=2,times=2")
    answers = []
    for _ in range(4):
        try:
            kernel.close(kernel.open("/dev/vfio/vfio"))
            answers.append(0)
        except OSError as e:
            answers.append(e.errno)
    assert answers == [errno.EINTR, errno.EINTR, errno.EAGAIN, 0]
    assert (eintr.hits, eagain.hits, eintr.seen, eagain.seen) == (2, 1, 4, 4)
    kernel.faults.clear()


def test_a_failed_call_changes_nothing_in_the_kernel(kernel):
    before = census(kernel)
    with kernel.faults.inject("open:/dev/vfio/3,errno=EBUSY"):
        with pytest.raises(OSError):
            kernel.open("/dev/vfio/3")
    assert census(kernel) == before
    kernel.close(kernel.open("/dev/vfio/3"))


def test_an_ioctl_is_matched_by_request_name_and_times_all_fails_every_one(device, kernel):
    with kernel.faults.inject("ioctl:VFIO_DEVICE_GET_IRQ_INFO,errno=EINVAL,times=all") as (rule,):
        for _ in range(3):
            with pytest.raises(VFIOError) as e:
                device.get_irq_info(0)
            assert e.value.errno == errno.EINVAL
        assert device.get_region_info(0).size
    assert rule.hits == 3
    assert device.get_irq_info(0).count == 1


def test_a_request_named_for_one_file_leaves_its_number_on_another_alone(device, kernel):
    """VFIO_IOMMU_GET_INFO and VFIO_DEVICE_GET_PCI_HOT_RESET_INFO are the same number."""
    buf = uapi.vfio_pci_hot_reset_info.pack(argsz=uapi.vfio_pci_hot_reset_info.size)
    with kernel.faults.inject("ioctl:VFIO_IOMMU_GET_INFO,errno=EIO,times=all") as (rule,):
        with pytest.raises(OSError) as e:
            kernel.ioctl(device.fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        assert e.value.errno == errno.ENODEV and rule.hits == 0
        with pytest.raises(VFIOError) as e:
            device.group.container.get_info()
        assert e.value.errno == errno.EIO and rule.hits == 1


def test_a_predicate_picks_the_calls(device, kernel):
    config = Fault("pread", when=lambda call: call.region == uapi.VFIO_PCI_CONFIG_REGION_INDEX, times=None,
                   errno=errno.EIO)
    with kernel.faults.inject(config):
        assert device.region(0).pread(0, 4) == (0x010000ED).to_bytes(4, "little")
        with pytest.raises(VFIOError):
            device.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX).pread(0, 4)


def test_short_reads_and_writes_move_count_bytes(device, kernel):
    with kernel.faults.inject(Fault("pread", region=uapi.VFIO_PCI_CONFIG_REGION_INDEX, count=2)):
        assert kernel.pread(device.fd, 4, CONFIG) == bytes.fromhex("3412")
    with kernel.faults.inject(Fault("pwrite", region=0, count=1)):
        assert kernel.pwrite(device.fd, (0x12345678).to_bytes(4, "little"), 4) == 1


def test_ret_answers_an_ioctl_without_running_it(device, kernel):
    with kernel.faults.inject("ioctl:VFIO_DEVICE_RESET,ret=2"):
        assert kernel.ioctl(device.fd, uapi.VFIO_DEVICE_RESET) == 2


def test_exists_answers_false_and_close_still_releases(kernel):
    fd = kernel.open("/dev/vfio/vfio")
    with kernel.faults.inject("exists:/dev/vfio/*,errno=EACCES", "close,errno=EIO"):
        assert not kernel.exists("/dev/vfio/vfio")
        with pytest.raises(OSError):
            kernel.close(fd)
    assert kernel.open_files() == {}
    with pytest.raises(OSError):
        os.fstat(fd)


def test_eventfd_and_mmap_fail_too(device, kernel):
    with kernel.faults.inject("eventfd,errno=EMFILE", "mmap:0,errno=ENOMEM"):
        with pytest.raises(VFIOError) as e:
            device.new_eventfd()
        assert e.value.errno == errno.EMFILE
        with pytest.raises(VFIOError) as e:
            device.region(0).mmap()
        assert e.value.errno == errno.ENOMEM
    assert kernel.live_mappings() == 0


def test_the_recorder_names_each_call_without_fd_numbers(kernel):
    with AddressSpace(kernel) as space, kernel.faults.record() as calls:
        device = Device.attach(space, EDU)
        device.region(0).mmap()
        device.close()
    names = [c.name for c in calls]
    assert names[:5] == ["exists " + EDU, f"readlink {EDU}/iommu_group", "open /dev/vfio/3",
                         "ioctl VFIO_GROUP_GET_STATUS", "open /dev/vfio/vfio"]
    assert "ioctl VFIO_CHECK_EXTENSION 3" in names and "ioctl VFIO_GROUP_GET_DEVICE_FD 0000:00:03.0" in names
    assert "ioctl VFIO_DEVICE_GET_REGION_INFO index=0" in names and "mmap region 0+0x0 [0x100000]" in names
    assert names[-4:] == ["close device", "ioctl VFIO_GROUP_UNSET_CONTAINER", "close container", "close group"]
    assert [c.seq for c in calls] == sorted(c.seq for c in calls)
    assert "ioctl" not in vars(kernel)


def test_rules_nest_with_a_monkeypatched_method_and_give_it_back(kernel, monkeypatch):
    monkeypatch.setattr(kernel, "eventfd", lambda: -7)
    with kernel.faults.inject("open,errno=ENOENT"):
        assert kernel.eventfd() == -7
    assert kernel.eventfd() == -7


@pytest.mark.parametrize("spec,message", [
    ("fsync,errno=EIO", "unknown call kind"),
    ("open,errno=ENOTANERRNO", "unknown errno"),
    ("open", "exactly one of"),
    ("open,errno=EIO,ret=1", "exactly one of"),
    ("ioctl,count=1", "shortens a pread or pwrite only"),
    ("open,errno=EIO,nth=0", "count from 1"),
    ("eventfd:x,errno=EIO", "takes no ':' match"),
    ("open,errno=EIO,when=1", "unknown key"),
    ("ioctl:VFIO_NOT_AN_IOCTL,errno=EIO", "unknown ioctl"),
])
def test_bad_rules_are_refused_with_a_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        Fault.parse(spec)


def test_a_rule_prints_in_its_command_line_form():
    rule = Fault.parse("ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY,nth=2")
    assert str(rule) == "ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY,nth=2,times=1"
    assert str(Fault.parse(str(rule))) == str(rule)
    assert str(Fault.parse("pread:7,count=2,times=all")) == "pread:7,count=2,nth=1,times=all"


def test_the_census_sees_files_mmaps_dma_and_references(kernel):
    before = census(kernel)
    with AddressSpace(kernel) as space:
        device = Device.attach(space, EDU)
        device.region(0).mmap()
        space.machine.add_ram(0x100000, 0x1000)
        found = leaks(before, census(kernel))
        assert found["files"] == ({}, {"container": 1, "device": 1, "group": 1})
        assert found["mmaps"] == (0, 1) and found["dma mappings"] == (0, 1) and found["containers"] == (0, 1)
        assert found["groups"] == ({}, {3: (True, True, 1)})
        assert found["device opens"] == ({}, {"0000:00:03.0": 1})
        device.close()
    assert census(kernel) == before
