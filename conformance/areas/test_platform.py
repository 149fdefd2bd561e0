"""The vfio-platform flavour (and vfio-amba beside it) on whatever platform devices the backend
has: the virt board's PL031, PL061 and virtio-mmio slot on the arm64 CI guest and on the fake's
platform topology, and the fake's platform-test where a test needs what no board device offers.
Realize and each of its errors, the regions and their mmap fast path, IRQs through the
user-space handler (one ACTIVE, the rest queued in order, EOI by trapped access, automasked ones
unmasked through SET_IRQS), through the machine's irqfd with a resample eventfd, the mmap timer
on the virtual clock, and no-IOMMU mode."""

import errno
import sys

import pytest

from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace, Container, NoIOMMUContainer
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.platform import (AMBA_DEVICES, PLATFORM_DEVICES, IRQState, VFIOAmbaDevice,
                                         VFIOPlatformDevice)
from vfio_impl.vmm.machine import Machine, VirtualClock

from ..platform_models import PLATFORM_MODELS, PREFERENCE, ROLES, PlatformModel
from ..plugin import skip_test
from ..raw import RefusedAccess, assert_fast_path_back_after
from ..leaks import fds_opened_since, report
from ..reliability import process_fds

pytestmark = pytest.mark.vfio(platform=True)

WAIT = 2.0
TRIGGER_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
UNMASK_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_UNMASK
UNMASK_IOCTL = uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK
# The fake's platform topology's broken devices, one per way realize can fail that no real board
# shows (fakekernel/topology.py).
BAD_GROUP, NO_OF_NODE = "c2000000.bad-group", "c4000000.no-of-node"


class FailingHost:
    """The backend's host with one kind of call refused, as a kernel out of resources or one
    that rejects a request would answer; it also logs every SET_IRQS as (index, flags, start,
    count), so a test sees what the flavour asked of the kernel. `ioctl` maps (request, index)
    or (request, index, flags) to an errno."""

    def __init__(self, host, *, ioctl=None, eventfd_after=None, mmap=None, readlink=None):
        self._host = host
        self._ioctl = ioctl or {}
        self._eventfd_after = eventfd_after
        self._mmap = mmap
        self._readlink = readlink
        self.eventfds = 0
        self.set_irqs = []

    def __getattr__(self, name):
        return getattr(self._host, name)

    def ioctl(self, fd, request, arg=0):
        if request in (uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.VFIO_DEVICE_GET_IRQ_INFO,
                       uapi.VFIO_DEVICE_SET_IRQS):
            index = int.from_bytes(bytes(arg[8:12]), sys.byteorder)
            flags = int.from_bytes(bytes(arg[4:8]), sys.byteorder)
            for key in ((request, index), (request, index, flags)):
                if key in self._ioctl:
                    raise OSError(self._ioctl[key], "refused by the test")
            if request == uapi.VFIO_DEVICE_SET_IRQS:
                hdr = uapi.vfio_irq_set.unpack(arg)
                self.set_irqs.append((hdr.index, hdr.flags, hdr.start, hdr.count))
        return self._host.ioctl(fd, request, arg)

    def eventfd(self):
        if self._eventfd_after is not None and self.eventfds >= self._eventfd_after:
            raise OSError(errno.EMFILE, "too many open files")
        self.eventfds += 1
        return self._host.eventfd()

    def mmap(self, fd, length, offset, prot=None):
        if self._mmap:
            raise OSError(self._mmap, "refused by the test")
        return self._host.mmap(fd, length, offset, *(() if prot is None else (prot,)))

    def readlink(self, path):
        return self._readlink(path) if self._readlink else self._host.readlink(path)


class Target:
    """One device of the backend, with what the suite knows of its model."""

    def __init__(self, info, model: PlatformModel, vfio, made: list):
        self.info, self.model, self.vfio, self._made = info, model, vfio, made
        self.name, self.sysfs = info.bdf, info.sysfs

    @property
    def iommu(self) -> type[Container]:
        """No-IOMMU where the device's group is one; the suite asks for it, QEMU never would."""
        return NoIOMMUContainer if self.info.noiommu else Container

    def realize(self, via=None, irqfd=False, flavour=None, iommu=None, **options):
        """On a fresh machine on a virtual clock (one that plays KVM with irqfd=True), through
        the backend's host or `via` a wrapper of it; torn down after the test. A device whose
        line the suite raises starts with it low: nothing resets a board device between tests."""
        machine = Machine(VirtualClock(), irqfd=irqfd)
        space = AddressSpace(via or self.vfio.host, machine, iommu or self.iommu)
        self._made.append([space, None, self.model])
        flavour = flavour or self.model.flavour
        options.setdefault("host", self.name)
        dev = flavour.realize(space, machine, **options)
        self._made[-1][1] = dev
        if self.model.level:
            self.model.level.lower(dev)
        return dev

    def error(self, **options) -> VFIOError:
        with pytest.raises(VFIOError) as e:
            self.realize(**options)
        return e.value

    def connect_all(self, dev):
        for pin in range(len(self.model.irqs)):
            dev.connect_irq(pin, f"spi {32 + pin}")
        return dev


@pytest.fixture
def platform(request, vfio):
    """`platform(role)`: the backend's best device for a role of platform_models.ROLES (or
    `platform(model=NAME)`: its device of that model), or the test skips naming what is missing. Everything realized is torn down after the test (each
    board line lowered first), must have put its group back, and must leave no fd open."""
    made = []
    before = process_fds()

    def pick(role: str = "any", model: str | None = None) -> Target:
        what, fits = (f"{model} device", lambda m: m.name == model) if model else ROLES[role]
        found = [(d, PLATFORM_MODELS[d.model]) for d in vfio.devices
                 if d.bus != "pci" and d.model in PLATFORM_MODELS and fits(PLATFORM_MODELS[d.model])]
        if not found:
            skip_test(request, "device", f"{vfio.kind} backend: no {what}")
        info, model = min(found, key=lambda f: PREFERENCE.index(f[1].name))
        vfio.use(info)
        return Target(info, model, vfio, made)

    yield pick
    for space, dev, model in reversed(made):
        if dev and dev.vbasedev:
            if model.level:
                model.level.lower(dev)
            dev.exit()
        assert not space.groups, "the device left its group open"
        space.machine.close()
    # The fake's own check (conformance.leaks) knows which fds are its kernel's; on real, any fd
    # this process gained is one the flavour left.
    left = fds_opened_since(before) if vfio.kind == "real" else []
    assert not left, report(left)


@pytest.fixture
def fake(fake_kernel):
    return fake_kernel


def wait_active(d, pin: int) -> None:
    intp = d.irqs[pin]
    assert d.machine.run_until(lambda: intp.state is not IRQState.INACTIVE, WAIT), f"IRQ {pin} never fired"


def raise_level(t: Target, d) -> int:
    """The device asserts its level line by register, and the loop delivers the interrupt."""
    pin = t.model.level.pin
    t.model.level.raise_(d)
    wait_active(d, pin)
    return pin


def trigger(d, pin: int) -> None:
    """VFIO's loopback trigger: the kernel signals the eventfd with no MMIO access (no EOI)."""
    d.vbasedev.trigger_irq(pin)
    wait_active(d, pin)


def interrupts(recorder: TraceRecorder, pin: int) -> int:
    return sum(1 for f in recorder.named("vfio_platform_intp_interrupt") if f["pin"] == pin)


def settle(d) -> None:
    """A bounded wait for anything that should not come: the loop runs until WAIT/10 passes."""
    d.machine.run_until(lambda: False, WAIT / 10)


def ident(t: Target, d) -> int:
    region, offset, _ = t.model.ident
    return d.mmio_read(region, offset, 4)


# -- realize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", PREFERENCE)
def test_realize_by_host_names_the_sysfs_device_and_reads_every_region_and_irq(platform, model):
    t = platform(model=model)
    d = t.realize()
    assert d.name == t.name and d.sysfsdev == f"{t.model.flavour.bus_devices}/{t.name}"
    assert [(r.info.flags, r.info.size) for r in d.regions] == [(f, s) for f, s in t.model.regions]
    assert [i.flags for i in d.irqs] == list(t.model.irqs) and [i.pin for i in d.irqs] == list(range(len(t.model.irqs)))
    assert all(i.state is IRQState.INACTIVE and not i.kvm_accel for i in d.irqs)
    assert all((i.unmask >= 0) == i.automasked for i in d.irqs)
    assert ident(t, d) == t.model.ident[2]


def test_sysfsdev_takes_precedence_over_host(platform):
    t = platform()
    d = t.realize(host="not/this", sysfsdev=t.sysfs + "/")
    assert d.name == t.name and ident(t, d) == t.model.ident[2]


@pytest.mark.parametrize("model", PREFERENCE)
def test_the_compatible_list_of_the_of_node_is_counted(platform, model):
    t = platform(model=model)
    d = t.realize()
    assert d.compat == t.model.compatible and d.num_compat == t.model.compatible.count("\0")


def test_a_given_compat_is_not_read_from_sysfs(platform):
    d = platform().realize(compat="acme,one\0acme,two\0acme,three\0")
    assert d.num_compat == 3 and d.compat == "acme,one\0acme,two\0acme,three\0"


def test_no_host_is_a_wrong_host_name_with_no_device_name(platform):
    e = platform().error(host=None)
    assert e.message == "vfio error: wrong host device name" and e.errno == errno.EINVAL


def test_a_host_name_with_a_slash_is_wrong(platform):
    e = platform().error(host="bus/c0000000.platform-test")
    assert e.message == "vfio bus/c0000000.platform-test: wrong host device name" and e.errno == errno.EINVAL


def test_a_missing_sysfs_device(platform):
    e = platform().error(host="d0000000.nothing", flavour=VFIOPlatformDevice)
    assert e.message == "vfio d0000000.nothing: failed to get the sysfs host device file status"
    assert e.errno == errno.ENOENT


def test_the_sysfs_status_error_carries_the_real_errno(platform):
    """stat's own errno: here a path through a regular file, ENOTDIR, not a blanket ENOENT."""
    t = platform()
    e = t.error(host=None, sysfsdev=f"{t.sysfs}/driver_override/x")
    assert e.message == "vfio x: failed to get the sysfs host device file status" and e.errno == errno.ENOTDIR


def test_a_device_with_no_iommu_group(vfio, platform, request):
    """Any platform device outside VFIO: with no IOMMU, only VFIO's own devices get a group."""
    t = platform()
    host = vfio.host
    name = next((n for n in host.listdir(PLATFORM_DEVICES)
                 if not host.exists(f"{PLATFORM_DEVICES}/{n}/iommu_group")), None)
    if name is None:
        skip_test(request, "device", f"{vfio.kind} backend: no platform device without an IOMMU group")
    e = t.error(host=name, flavour=VFIOPlatformDevice)
    assert e.message == f"vfio {name}: no iommu_group found" and e.errno == errno.ENOENT


def test_an_iommu_group_link_that_does_not_fill_path_max(vfio, platform):
    t = platform()
    long_link = "../../" + "x" * 4096 + "/20"
    e = t.error(via=FailingHost(vfio.host, readlink=lambda path: long_link))
    assert e.message == f"vfio {t.name}: no iommu_group found" and e.errno == errno.ENAMETOOLONG


@pytest.mark.vfio(platform=True, fake_only=f"the fake's {BAD_GROUP}, whose iommu_group link is not a number")
def test_an_iommu_group_whose_name_is_not_a_number(vfio, platform):
    link = vfio.host.readlink(f"{PLATFORM_DEVICES}/{BAD_GROUP}/iommu_group")
    e = platform().error(host=BAD_GROUP, flavour=VFIOPlatformDevice)
    assert e.message == f"vfio {BAD_GROUP}: failed to read {link}" and e.errno == errno.EINVAL


def test_vfio_platform_refuses_an_amba_device_and_puts_its_group_back(platform):
    """QEMU's vfio-platform wants VFIO_DEVICE_FLAGS_PLATFORM; vfio-amba reports AMBA."""
    t = platform("amba")
    e = t.error(host=None, sysfsdev=t.sysfs, flavour=VFIOPlatformDevice)
    assert e.message == f"vfio {t.name}: this isn't a platform device" and e.errno == errno.EINVAL


def test_vfio_amba_refuses_a_platform_device(platform):
    t = platform("platform")
    e = t.error(host=None, sysfsdev=t.sysfs, flavour=VFIOAmbaDevice)
    assert e.message == f"vfio {t.name}: this isn't an AMBA device" and e.errno == errno.EINVAL


def test_each_flavour_looks_for_its_host_on_its_own_bus(platform):
    t = platform("amba")
    e = t.error(flavour=VFIOPlatformDevice)
    assert e.message == f"vfio {t.name}: failed to get the sysfs host device file status"
    assert VFIOAmbaDevice.bus_devices == AMBA_DEVICES and t.realize().sysfsdev == f"{AMBA_DEVICES}/{t.name}"


def test_a_device_already_attached_is_busy(platform):
    t = platform()
    first = t.realize()
    with pytest.raises(VFIOError) as e:
        t.model.flavour.realize(first.space, first.machine, host=t.name)
    assert e.value.message == f"vfio {t.name}: device is already attached" and e.value.errno == errno.EBUSY
    assert first.vbasedev.group.fd >= 0 and ident(t, first) == t.model.ident[2]


@pytest.mark.vfio(platform=True, fake_only=f"the fake's {NO_OF_NODE}, a platform device with no of_node")
def test_a_missing_of_node_unwinds_the_whole_device(platform):
    e = platform().error(host=NO_OF_NODE, flavour=VFIOPlatformDevice, iommu=Container)
    path = f"{PLATFORM_DEVICES}/{NO_OF_NODE}/of_node/compatible"
    assert e.message == f"vfio {NO_OF_NODE}: Failed to open file \u201c{path}\u201d" and e.errno == errno.ENOENT


def test_a_region_info_failure_unwinds(vfio, platform):
    t = platform()
    last = len(t.model.regions) - 1
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_GET_REGION_INFO, last): errno.EFAULT})
    e = t.error(via=host)
    assert e.message == f"vfio {t.name}: failed to get region {last} info" and e.errno == errno.EFAULT
    assert host.eventfds == 0


def test_an_irq_info_failure_unwinds_the_irqs_then_the_regions(vfio, platform):
    t = platform("several-irqs")
    last = len(t.model.irqs) - 1
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_GET_IRQ_INFO, last): errno.EINVAL})
    with TraceRecorder() as rec:
        e = t.error(via=host)
    assert e.message == f"vfio {t.name}: failed to get device irq info" and e.errno == errno.EINVAL
    earlier = t.model.irqs[:last]
    assert host.eventfds == sum(2 if flags & uapi.VFIO_IRQ_INFO_AUTOMASKED else 1 for flags in earlier)
    assert [f["pin"] for f in rec.named("vfio_platform_populate_interrupts")] == list(range(last))


def test_a_trigger_eventfd_failure(vfio, platform):
    t = platform()
    e = t.error(via=FailingHost(vfio.host, eventfd_after=0))
    assert e.message == f"vfio {t.name}: failed to initialize trigger eventfd notifier" and e.errno == errno.EMFILE


def test_a_resample_eventfd_failure(vfio, platform):
    t = platform("level")
    e = t.error(via=FailingHost(vfio.host, eventfd_after=1))
    assert e.message == f"vfio {t.name}: failed to initialize resample eventfd notifier"
    assert e.errno == errno.EMFILE


# -- no-IOMMU ----------------------------------------------------------------------------------
def test_a_no_iommu_group_is_got_through_its_own_node_and_refuses_dma(platform, request):
    t = platform()
    if not t.info.noiommu:
        skip_test(request, "device", f"{t.vfio.kind} backend: {t.name} is behind an IOMMU, not in no-IOMMU mode")
    d = t.realize()
    container = d.vbasedev.container
    assert isinstance(container, NoIOMMUContainer) and container.iommu_type == uapi.VFIO_NOIOMMU_IOMMU
    with pytest.raises(VFIOError) as e:
        d.space.dma_buffer(4096, 0x100000)
    assert e.value.errno == errno.ENOTTY and not d.space.dma_buffers
    with pytest.raises(VFIOError) as e:
        container.get_info()
    assert e.value.errno == errno.ENOTTY


def test_the_default_type1_backend_does_not_take_a_no_iommu_group(platform, request):
    """QEMU refuses no-IOMMU, and so does an address space that was not asked for it."""
    t = platform()
    if not t.info.noiommu:
        skip_test(request, "device", f"{t.vfio.kind} backend: {t.name} is behind an IOMMU, not in no-IOMMU mode")
    e = t.error(iommu=Container)
    group = t.info.group
    assert e.message == f"vfio {t.name}: vfio: error opening /dev/vfio/{group}" and e.errno == errno.ENOENT


# -- regions and the fast path ----------------------------------------------------------------
def test_a_register_region_is_mmapped_and_the_fast_path_does_not_trap(platform):
    t = platform("mmap")
    region, offset = t.model.scratch
    d = t.realize()
    assert d.regions[region].areas and d.mmap_enabled()
    with TraceRecorder() as rec:
        d.mmio_write(region, offset, 0x1234567, 4)
        assert d.mmio_read(region, offset, 4) == 0x1234567
    assert not rec.named("vfio_region_read") and not rec.named("vfio_region_write")
    assert int.from_bytes(d.regions[region].pread(offset, 4), "little") == 0x1234567


def test_a_ram_region_is_mmapped_and_the_kernel_sees_what_was_written(platform):
    t = platform("ram")
    d = t.realize()
    with TraceRecorder() as rec:
        d.mmio_write(t.model.ram, 0x100, 0xCAFEF00D, 4)
        assert d.mmio_read(t.model.ram, 0x100, 4) == 0xCAFEF00D
    assert not rec.named("vfio_region_read") and not rec.named("vfio_region_write")
    assert int.from_bytes(d.regions[t.model.ram].pread(0x100, 4), "little") == 0xCAFEF00D


def test_x_no_mmap_traps_every_access(platform):
    t = platform("mmap")
    region, offset = t.model.scratch
    d = t.realize(x_no_mmap=True)
    assert not any(r.areas for r in d.regions) and not d.mmap_enabled()
    with TraceRecorder() as rec:
        d.mmio_write(region, offset, 0x55AA, 4)
        assert d.mmio_read(region, offset, 4) == 0x55AA
    assert rec.named("vfio_region_read") and rec.named("vfio_region_write")


def test_a_failed_mmap_warns_and_the_region_still_works(vfio, platform):
    t = platform("mmap")
    with TraceRecorder() as rec:
        d = t.realize(via=FailingHost(vfio.host, mmap=errno.ENOMEM))
    assert [f["message"] for f in rec.named("warning")] == \
        [f"VFIO {t.name} region {i} mmap unsupported, performance may be slow" for i in range(len(t.model.regions))]
    assert ident(t, d) == t.model.ident[2] and not d.mmap_enabled()


def test_a_region_without_mmap_is_not_mapped_and_traps_without_a_warning(platform):
    """A sub-page region (virtio-mmio's 0x200 bytes): the kernel offers no mmap, so every access
    goes through the device fd; that is the region's nature, not a failure worth a warning."""
    t = platform("no-mmap")
    with TraceRecorder() as rec:
        d = t.realize()
    plain = [i for i, (flags, _) in enumerate(t.model.regions) if not flags & uapi.VFIO_REGION_INFO_FLAG_MMAP]
    assert not rec.named("warning") and plain and not any(d.regions[i].areas for i in plain)
    with TraceRecorder() as rec:
        assert ident(t, d) == t.model.ident[2]
    assert rec.named("vfio_region_read")


# -- interrupts from user space ---------------------------------------------------------------
def test_a_level_irq_asserts_its_line_and_turns_the_fast_path_off(platform):
    t = platform("level")
    d = t.connect_all(t.realize())
    pin = raise_level(t, d)
    assert d.irqs[pin].state is IRQState.ACTIVE and d.irqs[pin].line.history == [True]
    assert not d.mmap_enabled() and d.mmap_timer.deadline == 1100


def test_the_first_trapped_access_is_the_eoi(platform):
    t = platform("edge")
    pin = t.model.edge_pin
    d = t.connect_all(t.realize())
    trigger(d, pin)
    assert ident(t, d) == t.model.ident[2]
    assert d.irqs[pin].state is IRQState.INACTIVE and d.irqs[pin].line.history == [True, False]


def active_behind_refused_access(platform):
    """An edge IRQ ACTIVE, and the ident register's region refusing every pread and pwrite."""
    t = platform("edge")
    d = t.connect_all(t.realize())
    trigger(d, t.model.edge_pin)
    region, offset, _ = t.model.ident
    d.regions[region].host = RefusedAccess(d.regions[region].host)
    return d, d.irqs[t.model.edge_pin], region, offset


def test_a_failed_trapped_read_is_all_ones_and_ends_nothing(platform):
    """vfio_region_read returns before its EOI when the pread fails; only a good access ends it."""
    d, intp, region, offset = active_behind_refused_access(platform)
    with TraceRecorder() as rec:
        assert d.mmio_read(region, offset, 4) == 0xFFFFFFFF and d.mmio_read(region, offset, 1) == 0xFF
    assert intp.state is IRQState.ACTIVE and intp.line.history == [True]
    name = d.regions[region].name
    assert [f["message"] for f in rec.named("error")] == [
        f"vfio_region_read({name}:{offset:#x}, 4) failed: Input/output error",
        f"vfio_region_read({name}:{offset:#x}, 1) failed: Input/output error"]


def test_a_failed_trapped_write_still_ends_the_irq(platform):
    d, intp, region, offset = active_behind_refused_access(platform)
    with TraceRecorder() as rec:
        d.mmio_write(region, offset, 0x5A, 4)
    assert intp.state is IRQState.INACTIVE and intp.line.history == [True, False]
    assert [f["message"] for f in rec.named("error")] == [
        f"vfio_region_write({d.regions[region].name}:{offset:#x}, 0x5a, 4) failed: Input/output error"]


def test_while_an_irq_is_active_the_ram_region_traps_too_and_ends_it(platform):
    t = platform("ram")
    d = t.connect_all(t.realize())
    raise_level(t, d)
    with TraceRecorder() as rec:
        d.mmio_read(t.model.ram, 0, 4)
    assert rec.named("vfio_region_read") and rec.named("vfio_platform_eoi")
    assert d.irqs[t.model.level.pin].state is IRQState.INACTIVE


def test_an_automasked_irq_is_masked_until_the_eoi_unmasks_it_through_set_irqs(vfio, platform):
    t = platform("level")
    host = FailingHost(vfio.host)
    d = t.connect_all(t.realize(via=host))
    pin = t.model.level.pin
    with TraceRecorder() as rec:
        raise_level(t, d)
        settle(d)
        assert interrupts(rec, pin) == 1, "a masked IRQ fired again"
        before = len(host.set_irqs)
        assert t.model.level.asserted(d), "the device dropped its line by itself"
        assert (pin, UNMASK_IOCTL, 0, 1) in host.set_irqs[before:]
        assert d.machine.run_until(lambda: interrupts(rec, pin) == 2, WAIT), \
            "the UNMASK of a still-asserted line did not fire it again"
    assert d.irqs[pin].line.history == [True, False, True]


def test_lowering_the_line_as_the_eoi_ends_the_level_irq(platform):
    t = platform("level")
    d = t.connect_all(t.realize())
    pin = t.model.level.pin
    with TraceRecorder() as rec:
        raise_level(t, d)
        t.model.level.lower(d)
        settle(d)
    assert interrupts(rec, pin) == 1 and not d.irqs[pin].line.level
    assert d.irqs[pin].state is IRQState.INACTIVE and not t.model.level.asserted(d)


def test_the_fakes_automask_is_the_kernels_mask(platform, fake):
    t = platform("level")
    d = t.connect_all(t.realize())
    pin = raise_level(t, d)
    model = fake.platform_device(t.name)
    assert model.irq_masked(pin) and model.line(pin)
    t.model.level.lower(d)
    settle(d)
    assert not model.irq_masked(pin) and not model.line(pin)


def test_an_irq_that_is_not_automasked_is_not_unmasked(vfio, platform):
    t = platform("edge")
    host = FailingHost(vfio.host)
    pin = t.model.edge_pin
    d = t.connect_all(t.realize(via=host))
    trigger(d, pin)
    before = len(host.set_irqs)
    ident(t, d)
    assert d.irqs[pin].state is IRQState.INACTIVE
    assert not [c for c in host.set_irqs[before:] if c[1] == UNMASK_IOCTL]


def test_irqs_firing_while_one_is_active_wait_in_fifo_order(platform):
    t = platform("several-irqs")
    d = t.connect_all(t.realize())
    edge, plain, masked = d.irqs[1], d.irqs[2], d.irqs[0]
    d.mmio_write(0, 0x04, 1 << 1, 4)
    wait_active(d, 1)
    trigger(d, 2)
    trigger(d, 0)
    assert [plain.state, masked.state] == [IRQState.PENDING, IRQState.PENDING]
    assert list(d.pending_intp_queue) == [plain, masked]
    assert not plain.line.level and not masked.line.level
    ident(t, d)
    assert edge.state is IRQState.INACTIVE and plain.state is IRQState.ACTIVE and plain.line.level
    assert list(d.pending_intp_queue) == [masked] and not masked.line.level
    ident(t, d)
    assert plain.state is IRQState.INACTIVE and masked.state is IRQState.ACTIVE and masked.line.level
    ident(t, d)
    assert all(i.state is IRQState.INACTIVE for i in d.irqs) and not d.pending_intp_queue
    assert [i.line.history for i in d.irqs] == [[True, False]] * 3


def test_a_pending_irq_is_cleared_and_not_delivered_twice(platform):
    t = platform("several-irqs")
    d = t.connect_all(t.realize())
    raise_level(t, d)
    trigger(d, 1)
    with TraceRecorder() as rec:
        settle(d)
    assert not rec.named("vfio_platform_intp_interrupt") and not rec.named("vfio_intp_interrupt_set_pending")
    assert list(d.pending_intp_queue) == [d.irqs[1]]


def test_the_active_irq_firing_again_stays_active_and_is_not_queued(platform):
    t = platform("edge")
    pin = t.model.edge_pin
    d = t.connect_all(t.realize())
    trigger(d, pin)
    with TraceRecorder() as rec:
        d.vbasedev.trigger_irq(pin)
        assert d.machine.run_until(lambda: rec.named("vfio_platform_intp_interrupt")
                                   or rec.named("vfio_intp_interrupt_set_pending"), WAIT)
    assert not rec.named("vfio_intp_interrupt_set_pending") and not d.pending_intp_queue
    assert d.irqs[pin].state is IRQState.ACTIVE and d.irqs[pin].line.history == [True]


def test_a_wakeup_with_nothing_to_clear_is_reported(platform):
    t = platform()
    d = t.connect_all(t.realize())
    intp = d.irqs[0]
    handler = d.machine.fd_handlers[intp.interrupt]
    with TraceRecorder() as rec:
        handler()
    assert [f["message"] for f in rec.named("error")] == [f"Error when clearing fd={intp.interrupt} (ret = 0)"]
    assert intp.state is IRQState.ACTIVE and intp.line.level


def test_a_refused_trigger_eventfd_aborts_connect_with_the_handler_removed(vfio, platform):
    t = platform()
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_SET_IRQS, 0, TRIGGER_EVENTFD): errno.EINVAL})
    d = t.realize(via=host)
    with pytest.raises(VFIOError) as e:
        d.connect_irq(0, "spi 32")
    assert e.value.message == f"vfio {t.name}: vfio: failed to set signaling of irq 0.0"
    assert e.value.errno == errno.EINVAL and not d.machine.has_fd_handler(d.irqs[0].interrupt)


# -- the irqfd path ---------------------------------------------------------------------------
def test_with_irqfd_the_trigger_goes_to_kvm_and_the_resample_fd_to_vfio(vfio, platform):
    t = platform("level")
    host = FailingHost(vfio.host)
    pin = t.model.level.pin
    d = t.realize(via=host, irqfd=True)
    before = len(host.set_irqs)
    d.connect_irq(pin, "spi 32")
    intp = d.irqs[pin]
    assert intp.kvm_accel and d.machine.irqfds[intp.interrupt].resample == intp.unmask
    assert not d.machine.has_fd_handler(intp.interrupt)
    assert host.set_irqs[before:] == [(pin, TRIGGER_EVENTFD, 0, 1), (pin, UNMASK_EVENTFD, 0, 1)]


def test_with_irqfd_the_guest_eoi_writes_the_resample_fd_which_unmasks(vfio, platform):
    t = platform("level")
    host = FailingHost(vfio.host)
    pin = t.model.level.pin
    d = t.realize(via=host, irqfd=True)
    line = d.connect_irq(pin, "spi 32")
    t.model.level.raise_(d)
    assert d.machine.run_until(lambda: line.level, WAIT), "KVM's irqfd did not assert the line"
    assert d.irqs[pin].state is IRQState.INACTIVE and d.mmap_enabled(), "an irqfd interrupt took the fast path off"
    before = len(host.set_irqs)
    assert d.machine.eoi("spi 32") and not line.level
    assert d.machine.run_until(lambda: line.level, WAIT), "the resample did not unmask a still-high line"
    assert host.set_irqs[before:] == [], "the unmask went through an ioctl, not the resample fd"
    t.model.level.lower(d)
    d.machine.eoi("spi 32")
    settle(d)
    assert line.history == [True, False, True, False]


def test_with_irqfd_an_edge_irq_has_no_resample_fd(vfio, platform):
    t = platform("edge")
    host = FailingHost(vfio.host)
    pin = t.model.edge_pin
    d = t.realize(via=host, irqfd=True)
    before = len(host.set_irqs)
    line = d.connect_irq(pin, "spi 33")
    assert d.irqs[pin].kvm_accel and d.machine.irqfds[d.irqs[pin].interrupt].resample is None
    assert host.set_irqs[before:] == [(pin, TRIGGER_EVENTFD, 0, 1)]
    d.vbasedev.trigger_irq(pin)
    assert d.machine.run_until(lambda: line.history == [True, False], WAIT)


def test_x_irqfd_off_keeps_injection_in_user_space(platform):
    t = platform("level")
    pin = t.model.level.pin
    d = t.realize(irqfd=True, x_irqfd=False)
    d.connect_irq(pin, "spi 32")
    intp = d.irqs[pin]
    assert not intp.kvm_accel and not d.machine.irqfds and d.machine.has_fd_handler(intp.interrupt)
    raise_level(t, d)
    assert intp.state is IRQState.ACTIVE


def test_without_irqfd_injection_falls_back_to_user_space(platform):
    t = platform()
    d = t.connect_all(t.realize())
    assert not d.machine.irqfd_available and not d.machine.irqfds
    assert all(not i.kvm_accel and d.machine.has_fd_handler(i.interrupt) for i in d.irqs)


def test_an_irqfd_kvm_refuses_falls_back_to_user_space(platform, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOSPC, "no irqfd slots")
    d = platform().realize(irqfd=True)
    monkeypatch.setattr(d.machine, "add_irqfd", refuse)
    d.connect_irq(0, "spi 32")
    assert not d.irqs[0].kvm_accel and d.machine.has_fd_handler(d.irqs[0].interrupt)


def test_a_vfio_failure_after_kvm_took_the_irqfd_removes_it_and_aborts(vfio, platform):
    t = platform("level")
    pin = t.model.level.pin
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_SET_IRQS, pin, UNMASK_EVENTFD): errno.EINVAL})
    d = t.realize(via=host, irqfd=True)
    with pytest.raises(VFIOError) as e:
        d.connect_irq(pin, "spi 32")
    assert e.value.message == f"vfio {t.name}: vfio: failed to set signaling of irq {pin}.0"
    assert not d.machine.irqfds and not d.irqs[pin].kvm_accel


# -- the mmap timer: virtual time only --------------------------------------------------------
def handled_irq(t: Target, **options):
    """A device that has taken and ended one level interrupt (the lowering write is the EOI)."""
    d = t.connect_all(t.realize(**options))
    raise_level(t, d)
    t.model.level.lower(d)
    return d


def test_the_fast_path_comes_back_1100_ms_after_the_interrupt(platform):
    assert_fast_path_back_after(handled_irq(platform("level")), 1100)


def test_the_timer_rearms_while_an_irq_is_active(platform):
    t = platform("level")
    d = t.connect_all(t.realize())
    raise_level(t, d)
    d.machine.clock.advance(1100)
    assert not d.mmap_enabled() and d.mmap_timer.deadline == 2200
    d.machine.clock.advance(500)
    t.model.level.lower(d)
    assert_fast_path_back_after(d, 600)


def test_mmap_timeout_ms_sets_the_period(platform):
    assert_fast_path_back_after(handled_irq(platform("level"), mmap_timeout_ms=50), 50)


def test_a_zero_timeout_never_arms_the_timer(platform):
    d = handled_irq(platform("level"), mmap_timeout_ms=0)
    d.machine.clock.advance(100_000)
    assert not d.mmap_timer.pending and not d.mmap_enabled()


# -- ops, options, teardown -------------------------------------------------------------------
def test_needs_reset_is_always_true_and_the_multi_device_reset_fails_silently(platform):
    t = platform()
    d = t.realize()
    with TraceRecorder() as rec:
        d.reset()
    assert d.needs_reset
    assert not rec.named("error"), "QEMU's reset handler ignores the failed multi-device reset"
    with pytest.raises(VFIOError) as e:
        d.hot_reset_multi()
    assert e.value.errno == errno.EOPNOTSUPP and ident(t, d) == t.model.ident[2]


def test_the_machine_refuses_to_save_while_the_device_is_there(platform):
    """The seed's vmstate is unmigratable: QEMU's savevm refuses with the device's name, until
    it is gone."""
    t = platform()
    d = t.realize()
    migration = d.machine.migration
    with pytest.raises(VFIOError) as e:
        migration.savevm()
    assert e.value.message == f"State blocked by non-migratable device '{t.model.flavour.vmsd.name}'"
    d.exit()
    assert migration.savevm() == []


def test_an_option_string_sets_the_properties(vfio, platform):
    t = platform()
    machine = Machine(VirtualClock())
    space = AddressSpace(vfio.host, machine, t.iommu)
    flavour = t.model.flavour
    with flavour.from_options(space, machine, f"host={t.name},x-no-mmap=on,mmap-timeout-ms=7,x-irqfd=off") as d:
        assert (d.name, d.no_mmap, d.mmap_timeout, d.irqfd_allowed) == (t.name, True, 7, False)
        assert not d.mmap_enabled()
    for bad, message in (("x-no-mmap=maybe", "Parameter 'x-no-mmap' expects 'on' or 'off'"),
                         ("mmap-timeout-ms=-1", "Parameter 'mmap-timeout-ms' expects uint32_t"),
                         ("rombar=0", f"Property '{flavour.type_name}.rombar' not found")):
        with pytest.raises(VFIOError) as e:
            flavour.from_options(space, machine, f"host={t.name},{bad}")
        assert e.value.message == message
    assert not space.groups
    machine.close()


def test_exit_releases_every_fd_the_irqfds_and_the_group(vfio, platform):
    t = platform("level")
    before = process_fds()
    d = t.realize(irqfd=True)
    t.connect_all(d)
    t.model.level.raise_(d)
    t.model.level.lower(d)
    d.exit()
    assert not d.machine.irqfds and not d.machine.fd_handlers and not d.space.groups and d.vbasedev is None
    d.space.machine.close()
    assert vfio.kind == "fake" or not fds_opened_since(before)
    d.exit()


def test_connecting_an_irq_the_device_lacks_is_refused(platform):
    t = platform()
    d = t.connect_all(t.realize())
    missing = len(t.model.irqs)
    with pytest.raises(VFIOError) as e:
        d.connect_irq(missing, "spi 40")
    assert e.value.message == f"vfio {t.name}: no IRQ {missing}" and e.value.errno == errno.EINVAL
