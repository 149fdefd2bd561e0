"""The vfio-ccw flavour, and the vfio_ccw driver under it, on whatever vfio-ccw mdev the backend
has: the s390x CI guest's virtio-blk-ccw subchannel and the fake's mirror of it, and the fake's
block store and broken mdevs where a test needs what no real subchannel shows.

Realize and each of its errors with nothing left open; start subchannel with every ret_code, the
PFCH cases and the programs the kernel translates or refuses; SENSE ID, NOOP, TIC and
virtio-ccw's READ_CONF and READ_FEAT through the channel subsystem; halt and clear through the
async command region; the I/O interrupt with every way reading the IRB can fail; store
subchannel through the schib region; channel reports through the CRW region; and each region's
misuse through the raw ABI. A kernel's refusals that a real subchannel cannot be made to give
are a host wrapper's (PlannedHost), so those tests run on real kernels too."""

import collections
import errno
import os
import struct

import pytest

from fakekernel.vfio_ccw import ChpEvent
from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW0, CCW1, ORB, SCHIB, SCSW, SenseID
from vfio_impl.vmm.css import ChannelSubsystem, IOInstEnding
from vfio_impl.vmm.machine import Machine, VirtualClock

from ..backends import subchannel_of
from ..ccw_models import PREFERENCE, ROLES, model_of
from ..leaks import fds_opened_since, report
from ..plugin import skip_test
from ..raw import RawSession, errno_of
from ..reliability import process_fds

pytestmark = pytest.mark.vfio(ccw=True)

RAM, RAM_SIZE = 0x10000, 0x10000
PROGRAM, TARGET, DATA, BUFFER = 0x10100, 0x10200, 0x11000, 0x12000
FMT_PFCH = css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH
# Kernel work (the I/O interrupt's) is asynchronous on a real kernel: a bound, not a sleep.
WAIT = 5.0
ENDED = css.SCSW_STCTL_PRIMARY | css.SCSW_STCTL_SECONDARY | css.SCSW_STCTL_STATUS_PEND
CHANNEL_CHECK = ENDED | css.SCSW_STCTL_ALERT
CE_DE = css.SCSW_DSTAT_CHANNEL_END | css.SCSW_DSTAT_DEVICE_END
COMMAND_REJECT = 0x80
OTHER_ERRNO = errno.EIO
TRIGGER_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
# vfio-ccw's regions, each at index << 10, in the order vfio_ccw registers them.
REGIONS = {"io": 0, "async": 1, "schib": 2, "crw": 3}
REGION_SIZES = {"io": uapi.ccw_io_region.size, "async": uapi.ccw_cmd_region.size,
                "schib": uapi.ccw_schib_region.size, "crw": uapi.ccw_crw_region.size}
RET_CODE = struct.Struct("=i")
IO_RET_CODE = uapi.ccw_io_region.offsetof("ret_code")
# The index field's place in vfio_region_info, vfio_irq_info and vfio_irq_set alike.
INDEX = struct.Struct("=I")
INDEX_AT = uapi.vfio_irq_set.offsetof("index")
# The fake's ccw topology: an mdev with only the I/O region, and broken ones (fakekernel/topology.py).
ONLY_IO = "0.0.0314"
UNUSABLE = object()
IDENTITIES = pytest.StashKey[dict]()


def fake_mdev(schid: str) -> str:
    """A mdev of the fake's ccw topology, by its subchannel (topology._mdev)."""
    return f"/sys/bus/mdev/devices/8a1c0bd0-7e7a-4f6a-9c3e-{int(schid[-4:], 16):012x}"


def at(region: str) -> int:
    return REGIONS[region] << 10


class PlannedHost:
    """The backend's host, answering some calls as a kernel out of luck would: planned answers to
    the vfio-ccw regions' accesses, each used once in order, per access "<region>-<read|write>"
    (an errno, or a short count, which a write returns without reaching the kernel); ioctls
    refused by (request, index); eventfds that fail. It logs every SET_IRQS as (index, flags,
    start, count) and every region write as (region, data)."""

    def __init__(self, host, *, ioctl=None, eventfd=None):
        self._host = host
        self._ioctl = ioctl or {}
        self._eventfd = eventfd
        self.plans: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.set_irqs: list[tuple[int, int, int, int]] = []
        self.writes: list[tuple[str, bytes]] = []
        self.ioctls: collections.Counter = collections.Counter()

    def __getattr__(self, name):
        return getattr(self._host, name)

    def plan(self, access: str, *, errno: int = 0, count: int | None = None) -> None:
        self.plans[access].append((errno, count))

    def _planned(self, region: str, op: str):
        queue = self.plans.get(f"{region}-{op}")
        return queue.popleft() if queue else None

    def pwrite(self, fd, data, offset):
        region = next(n for n, i in REGIONS.items() if i == offset >> 10)
        self.writes.append((region, bytes(data)))
        planned = self._planned(region, "write")
        if planned is None:
            return self._host.pwrite(fd, data, offset)
        code, count = planned
        if code:
            raise OSError(code, "planned by the test")
        return count

    def pread(self, fd, n, offset):
        planned = self._planned(next(r for r, i in REGIONS.items() if i == offset >> 10), "read")
        if planned is None:
            return self._host.pread(fd, n, offset)
        code, count = planned
        if code:
            raise OSError(code, "planned by the test")
        return self._host.pread(fd, count, offset)

    def ioctl(self, fd, request, arg=0):
        self.ioctls[request] += 1
        if request in (uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.VFIO_DEVICE_GET_IRQ_INFO, uapi.VFIO_DEVICE_SET_IRQS):
            code = self._ioctl.get((request, INDEX.unpack_from(arg, INDEX_AT)[0]))
            if code:
                raise OSError(code, "refused by the test")
            if request == uapi.VFIO_DEVICE_SET_IRQS:
                hdr = uapi.vfio_irq_set.unpack(arg)
                self.set_irqs.append((hdr.index, hdr.flags, hdr.start, hdr.count))
        return self._host.ioctl(fd, request, arg)

    def eventfd(self):
        if self._eventfd:
            raise OSError(self._eventfd, "refused by the test")
        return self._host.eventfd()


class Target:
    """One vfio-ccw mdev of the backend, with the model its SENSE ID named (None: not asked)."""

    def __init__(self, info, model, vfio, request, made: list):
        self.info, self.model, self.vfio = info, model, vfio
        self._request, self._made = request, made
        self.name, self.sysfs = info.bdf, info.sysfs
        self.subchannel = os.path.basename(subchannel_of(vfio.host, info.sysfs))

    def space(self, via=None, ram: bool = True, css: ChannelSubsystem | None = None):
        """A fresh machine on a virtual clock and its address space, through the backend's host or
        `via` a wrapper of it; guest RAM at RAM, which the space maps for DMA, so on a real backend
        only a destructive run may have it. Closed after the test, with what it realized."""
        if ram and not self.vfio.destructive:
            skip_test(self._request, "destructive",
                      "real backend: channel programs DMA from guest memory; pass --vfio-destructive to allow it")
        machine = Machine(VirtualClock())
        space = AddressSpace(via or self.vfio.host, machine)
        if ram:
            machine.add_ram(RAM, RAM_SIZE)
        self._made.append([space, css or ChannelSubsystem(), None])
        return self._made[-1]

    def realize(self, via=None, ram: bool = True, css: ChannelSubsystem | None = None, **options) -> VFIOCCWDevice:
        made = self.space(via, ram, css)
        options.setdefault("sysfsdev", self.sysfs)
        made[2] = VFIOCCWDevice.realize(made[0], made[0].machine, css=made[1], **options)
        return made[2]

    def device(self, **options) -> VFIOCCWDevice:
        """Realized, and its subchannel enabled by the guest with concurrent sense."""
        d = self.realize(**options)
        enable(d)
        return d

    def error(self, via=None, **options) -> VFIOError:
        """Realize's error, after checking it left no fd of its own open."""
        space, channel_subsystem, _ = self.space(via, ram=False)
        options.setdefault("sysfsdev", self.sysfs)
        before = process_fds()
        with pytest.raises(VFIOError) as e:
            VFIOCCWDevice.realize(space, space.machine, css=channel_subsystem, **options)
        assert process_fds() == before, "realize left an fd open"
        return e.value


def _identify(vfio, info) -> object:
    """The model SENSE ID names (None when the backend may not DMA, so nothing is asked, or when
    the suite does not know it), or UNUSABLE for an mdev the flavour cannot realize."""
    machine = Machine(VirtualClock())
    space = AddressSpace(vfio.host, machine)
    if vfio.destructive:
        machine.add_ram(RAM, RAM_SIZE)
    try:
        d = VFIOCCWDevice.realize(space, machine, sysfsdev=info.sysfs, css=ChannelSubsystem())
    except VFIOError:
        machine.close()
        return UNUSABLE
    try:
        if not vfio.destructive:
            return None
        enable(d)
        cc, irb = start(d, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, css.SENSE_ID_SIZE, BUFFER))
        return model_of(SenseID.unpack(memory(d), BUFFER - RAM)) if irb.scsw.dstat == CE_DE else None
    finally:
        d.unrealize()
        machine.close()


@pytest.fixture
def ccw(request, vfio):
    """`ccw(role)`: the backend's best vfio-ccw mdev for a role of ccw_models.ROLES, each mdev's
    model told by its SENSE ID once a session, or the test skips naming what is missing.
    Everything realized is unrealized after the test and must have put its group and subchannel
    back; on a real backend the test must leave no fd open."""
    made = []
    before = process_fds()
    identities = request.config.stash.setdefault(IDENTITIES, {})
    # An identity holds for a device as long as nothing changes what it answers: the fake's
    # topology and the faults armed on it are part of the key.
    topology = getattr(getattr(vfio.host, "topology", None), "name", None)
    faults = tuple(map(str, getattr(getattr(vfio.host, "faults", None), "rules", ())))

    def pick(role: str = "any") -> Target:
        what, fits = ROLES[role]
        found = []
        for info in (d for d in vfio.devices if d.bus == "ccw"):
            key = (vfio.kind, vfio.kernel, vfio.destructive, topology, faults, info.sysfs)
            if key not in identities:
                identities[key] = _identify(vfio, info)
            if identities[key] is not UNUSABLE and fits(identities[key]):
                found.append((info, identities[key]))
        if not found:
            kind = "device" if vfio.destructive or ROLES[role][1](None) else "destructive"
            skip_test(request, kind, f"{vfio.kind} backend: no {what}"
                      + ("" if kind == "device" else " (telling one needs a SENSE ID, which DMAs)"))
        info, model = min(found, key=lambda f: (PREFERENCE.index(f[1] and f[1].name), f[0].bdf))
        vfio.use(info)
        return Target(info, model, vfio, request, made)

    yield pick
    for _, _, dev in reversed(made):
        if dev:
            dev.unrealize()
    for space, channel_subsystem, _ in made:
        assert not space.groups, "the device left its group open"
        assert not channel_subsystem.subchannels, "the device left its subchannel behind"
        space.machine.close()
    # The fake's own check (conformance.leaks) knows which fds are its kernel's; on real, any fd
    # this process gained is one the flavour left.
    left = fds_opened_since(before) if vfio.kind == "real" else []
    assert not left, report(left)


@pytest.fixture
def target(ccw):
    return ccw()


@pytest.fixture
def dev(target):
    return target.device()


@pytest.fixture
def fake(fake_kernel):
    return fake_kernel


@pytest.fixture
def raw(target, vfio):
    """The target's device fd through the raw ABI, in a type1 container with nothing mapped:
    (session, device fd)."""
    session = RawSession(vfio.host, target.info)
    _, _, fd = session.open_device()
    yield session, fd
    session.close()


def enable(d, csense=True, isc=3, intparm=0xC0FFEE) -> None:
    schib = SCHIB()
    schib.pmcw.flags = css.PMCW_FLAGS_MASK_ENA | isc << 11
    schib.pmcw.intparm = intparm
    schib.pmcw.chars = css.PMCW_CHARS_MASK_CSENSE if csense else 0
    assert d.sch.msch(schib) is IOInstEnding.CC_EXPECTED


def memory(d):
    return d.machine.ram[0].memory


def program(d, *ccws: CCW1 | CCW0, at: int = PROGRAM) -> None:
    mem, pos = memory(d), at - RAM
    for i, ccw in enumerate(ccws):
        mem[pos + 8 * i:pos + 8 * i + 8] = ccw.pack()


def orb(ctrl0=FMT_PFCH, intparm=0x1234, lpm=0, cpa=PROGRAM) -> ORB:
    return ORB(intparm, ctrl0, lpm, 0, cpa)


def interrupted(d, before: int) -> bool:
    return d.machine.run_until(lambda: len(d.css.io_interrupts) > before, WAIT)


def start(d, *ccws: CCW1 | CCW0, **orb_fields):
    """The guest starts a channel program and takes its interrupt: (cc of ssch, IRB of tsch)."""
    if ccws:
        program(d, *ccws)
    before = len(d.css.io_interrupts)
    cc = d.sch.ssch(orb(**orb_fields))
    assert cc is not IOInstEnding.CC_EXPECTED or interrupted(d, before), "no I/O interrupt came"
    return cc, d.sch.tsch()[1]


def read(d, address: int, n: int) -> bytes:
    return bytes(memory(d)[address - RAM:address - RAM + n])


def sense(d, irb) -> int:
    """The first sense byte of the unit check an IRB reports: in the IRB when the kernel's
    subchannel has concurrent sense, from a BASIC SENSE otherwise."""
    if irb.scsw.flags & css.SCSW_FLAGS_MASK_ECTL:
        return irb.ecw[0]
    cc, after = start(d, CCW1(css.CCW_CMD_BASIC_SENSE, css.CCW_FLAG_SLI, css.SENSE_DATA_SIZE, BUFFER))
    assert after.scsw.dstat == CE_DE
    return read(d, BUFFER, 1)[0]


def messages(rec: TraceRecorder, kind: str) -> list[str]:
    return [f["message"] for f in rec.named(kind)]


def assert_unit_exception(d, interrupts_before: int) -> None:
    scsw = d.sch.scsw
    assert scsw.dstat == css.SCSW_DSTAT_UNIT_EXCEP
    assert scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK
    assert not scsw.ctrl & css.SCSW_ACTL_START_PEND
    assert len(d.css.io_interrupts) == interrupts_before + 1


def assert_program_check(irb) -> None:
    assert irb.scsw.cstat == css.SCSW_CSTAT_PROG_CHECK and irb.scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK


# -- realize ----------------------------------------------------------------------------------
def test_realize_names_the_subchannel_and_finds_every_region(target):
    d = target.realize(ram=False)
    assert (d.name, d.mdevid, str(d.hostid)) == (target.subchannel, target.name, target.subchannel)
    assert [(r.size, r.info.offset) for r in (d.io_region, d.async_cmd_region, d.schib_region, d.crw_region)] == \
        [(REGION_SIZES[name], at(name)) for name in REGIONS]
    assert sorted(d.notifiers) == [uapi.VFIO_CCW_IO_IRQ_INDEX, uapi.VFIO_CCW_CRW_IRQ_INDEX]
    assert all(d.machine.has_fd_handler(fd) for fd in d.notifiers.values())
    assert d.balloon_allowed and not d.needs_reset and d.migratable is False


def test_the_guest_subchannel_is_built_from_the_hosts_sysfs(target, vfio):
    d = target.realize(ram=False)
    pmcw = d.sch.curr_status.pmcw
    base = f"/sys/bus/css/devices/{target.subchannel}"
    pim, pam, pom = (int(w, 16) for w in vfio.host.read_text(f"{base}/pimpampom").split())
    chpids = bytes(int(w, 16) for w in vfio.host.read_text(f"{base}/chpids").split())
    assert d.sch.name == "fe.0.0000" and pmcw.devno == 0 and pmcw.flags == css.PMCW_FLAGS_MASK_DNV
    assert (pmcw.pim, pmcw.pam, pmcw.pom, pmcw.chpid) == (pim, pam, pom, chpids)
    assert d.css.chpids == {c: int(vfio.host.read_text(f"/sys/devices/css0/chp0.{c:02x}/type"), 16)
                            for c in filter(None, chpids)}


def test_sysfsdev_may_name_the_mdev_under_its_subchannel(target):
    d = target.realize(ram=False, sysfsdev=f"/sys/bus/css/devices/{target.subchannel}/{target.name}/")
    assert d.name == target.subchannel and d.mdevid == target.name


@pytest.mark.vfio(ccw=True, fake_only="the fake's second vfio-ccw mdev (the CI guest has one)")
def test_two_devices_get_two_guest_subchannels(target, ccw):
    shared = ChannelSubsystem()
    first = target.realize(ram=False, css=shared)
    second = ccw("store").realize(ram=False, css=shared)
    assert (first.sch.name, second.sch.name) == ("fe.0.0000", "fe.0.0001")


def test_no_sysfsdev(target):
    e = target.error(sysfsdev=None)
    assert e.message == "No host device provided" and e.errno == errno.EINVAL


def test_a_sysfsdev_that_does_not_exist(target):
    e = target.error(sysfsdev="/sys/bus/mdev/devices/nothing")
    assert e.message == "Host device '/sys/bus/mdev/devices/nothing' not found" and e.errno == errno.ENOENT


def test_a_sysfsdev_not_under_a_subchannel(target):
    e = target.error(sysfsdev=f"/sys/bus/css/devices/{target.subchannel}")
    assert e.message == "Failed to read css0"


@pytest.mark.vfio(ccw=True, fake_only="the fake's 0.0.0320, an I/O subchannel with no chpids attribute")
def test_a_subchannel_without_channel_paths_has_no_schib(target):
    with TraceRecorder() as rec:
        e = target.error(sysfsdev=fake_mdev("0.0.0320"))
    assert e.message == "s390_ccw_realize: Failed to build initial schib" and e.errno == errno.EINVAL
    assert messages(rec, "error") == ["css_sch_get_chpids: open /sys/bus/css/devices/0.0.0320/chpids failed"]


@pytest.mark.vfio(ccw=True, fake_only="the fake's broken vfio-ccw mdevs, one per check of QEMU's realize")
@pytest.mark.parametrize("schid, message, code", [
    ("0.0.0315", "vfio: no iommu_group found", errno.ENOENT),
    ("0.0.0316", "vfio: failed to read ../../../../kernel/iommu_groups/bogus", errno.EINVAL),
    ("0.0.0317", "vfio: Um, this isn't a vfio-ccw device", errno.EINVAL),
    ("0.0.0318", "vfio: too few regions (0), expected at least 1", errno.EINVAL),
    ("0.0.0319", "vfio: Unexpected size of the I/O region", errno.EINVAL),
    ("0.0.031a", "vfio: Unexpected size of the async cmd region", errno.EINVAL),
    ("0.0.031b", "vfio: Unexpected size of the schib region", errno.EINVAL),
    ("0.0.031c", "vfio: Unexpected size of the CRW region", errno.EINVAL),
    ("0.0.031d", "vfio: unexpected number of io irqs 0", errno.EINVAL),
    ("0.0.031e", "vfio: Error getting irq info", errno.EINVAL),
], ids=["no-group", "group-not-a-number", "not-ccw", "no-regions", "io-size", "async-size", "schib-size",
        "crw-size", "no-irqs", "io-irq-without-vectors"])
def test_each_broken_mdev_fails_realize_in_qemus_words(target, schid, message, code):
    e = target.error(sysfsdev=fake_mdev(schid))
    assert (e.message, e.errno) == (message, code)


def test_a_subchannel_attached_twice(target):
    first = target.realize(ram=False)
    with pytest.raises(VFIOError) as e:
        VFIOCCWDevice.realize(first.space, first.machine, sysfsdev=target.sysfs, css=first.css)
    assert e.value.message == f"vfio: subchannel {target.subchannel} has already been attached"
    assert e.value.errno == errno.EBUSY and len(first.css.subchannels) == 1 and first.vbasedev.fd >= 0


@pytest.mark.parametrize("ioctl, index, code, message", [
    (uapi.VFIO_DEVICE_GET_REGION_INFO, 0, errno.EFAULT, "vfio: Error getting config info"),
    (uapi.VFIO_DEVICE_GET_IRQ_INFO, 0, errno.EINVAL, "vfio: Error getting irq info"),
    (uapi.VFIO_DEVICE_SET_IRQS, 0, errno.EINVAL, "vfio: failed to set signaling of irq 0.0"),
    (uapi.VFIO_DEVICE_SET_IRQS, 1, errno.EINVAL, "vfio: failed to set signaling of irq 1.0"),
], ids=["config-region-info", "io-irq-info", "io-set-irqs", "crw-set-irqs"])
def test_each_refused_ioctl_fails_realize(target, vfio, ioctl, index, code, message):
    host = PlannedHost(vfio.host, ioctl={(ioctl, index): code})
    e = target.error(via=host)
    assert (e.message, e.errno) == (message, code)
    if index == uapi.VFIO_CCW_CRW_IRQ_INDEX:
        assert host.set_irqs[-1] == (uapi.VFIO_CCW_IO_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1), \
            "the unwind did not tear the I/O trigger down"


def test_no_eventfd_for_the_io_notifier(target, vfio):
    e = target.error(via=PlannedHost(vfio.host, eventfd=errno.EMFILE))
    assert e.message == "vfio: Unable to init event notifier for IO" and e.errno == errno.EMFILE


@pytest.mark.vfio(ccw=True, fake_only="the fake's 0.0.031f, whose mdev has a CRW region but one IRQ")
def test_a_crw_region_without_its_irq_unwinds_the_io_notifier(target, fake):
    e = target.error(sysfsdev=fake_mdev("0.0.031f"))
    assert e.message == "vfio: IRQ 1 not available (number of irqs 1)"
    assert fake.ccw_device("0.0.031f").set_irqs_log == [(0, TRIGGER_EVENTFD, 0, 1)] * 2
    assert fake.ccw_device("0.0.031f").irqs[0].trigger is None, "the unwind did not tear the I/O trigger down"


@pytest.mark.vfio(ccw=True, fake_only=f"the fake's {ONLY_IO}, a vfio-ccw mdev with only the I/O region")
def test_without_a_crw_region_there_is_no_crw_notifier(target):
    d = target.realize(ram=False, sysfsdev=fake_mdev(ONLY_IO))
    assert d.async_cmd_region is d.schib_region is d.crw_region is None
    assert list(d.notifiers) == [uapi.VFIO_CCW_IO_IRQ_INDEX]


# -- start subchannel: what every device answers ----------------------------------------------
def test_sense_id_names_the_control_unit(ccw):
    t = ccw("identified")
    d = t.device()
    cc, irb = start(d, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, css.SENSE_ID_SIZE, BUFFER))
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.ctrl == css.SCSW_FCTL_START_FUNC | ENDED
    assert (irb.scsw.dstat, irb.scsw.cstat, irb.scsw.cpa) == (CE_DE, 0, PROGRAM + 8)
    assert SenseID.unpack(read(d, BUFFER, 8)) == t.model.sense_id


def test_a_sense_id_shorter_than_256_without_sli_is_a_program_check(dev):
    """css.c wants the whole 256 bytes unless the length is suppressed."""
    cc, irb = start(dev, CCW1(css.CCW_CMD_SENSE_ID, 0, 8, BUFFER))
    assert_program_check(irb)
    assert irb.scsw.cpa == PROGRAM + 8


def test_a_sense_id_too_short_for_the_control_unit_stores_no_ff(dev):
    memory(dev)[BUFFER - RAM:BUFFER - RAM + 4] = b"\xAA" * 4
    cc, irb = start(dev, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, 3, BUFFER))
    assert irb.scsw.dstat == CE_DE and read(dev, BUFFER, 4)[0] == 0 and read(dev, BUFFER, 4)[3] == 0xAA


def test_the_interrupt_carries_the_orbs_parameter_and_the_guests_isc(dev):
    before = len(dev.css.io_interrupts)
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0), intparm=0xFEEDF00D)
    interrupt = dev.css.io_interrupts[before]
    assert (interrupt.io_int_parm, interrupt.isc, interrupt.subchannel_nr) == (0xFEEDF00D, 3, dev.sch.schid)


def test_a_tic_to_a_tic_is_a_program_check(dev):
    cc, irb = start(dev, CCW1(css.CCW_CMD_TIC, 0, 0, PROGRAM + 8), CCW1(css.CCW_CMD_TIC, 0, 0, PROGRAM))
    assert_program_check(irb)
    assert irb.scsw.cpa == PROGRAM + 16, "the second TIC's address did not come back as the guest's"


def test_a_format_0_program_runs_as_the_kernel_converts_it(dev):
    cc, irb = start(dev, CCW0(css.CCW_CMD_NOOP, 0, 0, 0, 0, 0), ctrl0=css.ORB_CTRL0_MASK_PFCH)
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE and irb.scsw.cpa == PROGRAM + 8


def test_an_idal_without_64_bit_idaws_is_refused(dev):
    """vfio_ccw translates only format-2 IDALs of 4 KiB blocks: EOPNOTSUPP, a unit exception."""
    before = len(dev.css.io_interrupts)
    program(dev, CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_IDA, 1, DATA))
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)


def test_a_channel_program_in_unmapped_memory_is_a_unit_exception(dev):
    before = len(dev.css.io_interrupts)
    assert dev.sch.ssch(orb(cpa=RAM + RAM_SIZE + 0x100)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)


def test_a_transport_mode_orb_is_a_unit_exception(dev):
    before = len(dev.css.io_interrupts)
    assert dev.sch.ssch(orb(ctrl0=FMT_PFCH | css.ORB_CTRL0_MASK_INVALID)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)


def test_an_unknown_command_is_a_command_reject_with_its_sense(dev):
    with TraceRecorder() as rec:
        cc, irb = start(dev, CCW1(0x17, 0, 8, BUFFER))
    assert irb.scsw.dstat & css.SCSW_DSTAT_UNIT_CHECK and irb.scsw.ctrl & css.SCSW_STCTL_ALERT
    assert sense(dev, irb) == COMMAND_REJECT
    assert not any(dev.sch.sense_data), "tsch left the sense data behind"
    assert rec.named("vfio_region_read"), "the IRB was not read from the I/O region"


def test_without_concurrent_sense_the_sense_data_is_not_copied(target):
    d = target.realize()
    enable(d, csense=False)
    cc, irb = start(d, CCW1(0x17, 0, 8, BUFFER))
    assert irb.scsw.dstat & css.SCSW_DSTAT_UNIT_CHECK and not any(irb.ecw) and not any(d.sch.sense_data)


# -- start subchannel: virtio-ccw ---------------------------------------------------------------
def test_a_chained_noop_and_tic_lead_to_read_conf_and_the_capacity(ccw):
    t = ccw("virtio-blk")
    d = t.device()
    program(d, CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0), CCW1(css.CCW_CMD_TIC, 0, 0, TARGET))
    program(d, CCW1(css.CCW_CMD_READ_CONF, 0, 8, DATA), at=TARGET)
    cc, irb = start(d)
    assert cc is IOInstEnding.CC_EXPECTED and (irb.scsw.dstat, irb.scsw.cstat) == (CE_DE, 0)
    assert irb.scsw.cpa == TARGET + 8, "the address past READ_CONF did not come back as the guest's"
    assert int.from_bytes(read(d, DATA, 8), "big") == t.model.capacity


def test_read_conf_through_a_guest_idal(ccw):
    """A format-2 IDAL whose first IDAW starts a 4 KiB block. One that starts mid-block (data
    split over two blocks) ends with CE+DE on Linux 6.1 and QEMU 7.2, but none of the data
    reaches guest memory; the fake does not model that loss, so no test depends on it."""
    t = ccw("virtio-blk")
    d = t.device()
    memory(d)[DATA - RAM:DATA - RAM + 16] = BUFFER.to_bytes(8, "big") + (BUFFER + 0x2000).to_bytes(8, "big")
    cc, irb = start(d, CCW1(css.CCW_CMD_READ_CONF, css.CCW_FLAG_IDA, 8, DATA), ctrl0=FMT_PFCH | css.ORB_CTRL0_MASK_C64)
    assert irb.scsw.dstat == CE_DE
    assert int.from_bytes(read(d, BUFFER, 8), "big") == t.model.capacity


def test_read_conf_longer_than_the_configuration_needs_sli(ccw):
    d = ccw("virtio").device()
    cc, irb = start(d, CCW1(css.CCW_CMD_READ_CONF, 0, 0x100, DATA))
    assert_program_check(irb)
    cc, irb = start(d, CCW1(css.CCW_CMD_READ_CONF, css.CCW_FLAG_SLI, 0x100, DATA))
    assert irb.scsw.dstat == CE_DE


def test_read_feat_of_a_legacy_device(ccw):
    """No revision negotiated: index 0 holds the device's low 32 bits, index 1 nothing; the
    residual count is the count less VirtioFeatDesc's 5 bytes."""
    d = ccw("virtio").device()
    memory(d)[DATA - RAM + 4] = 0
    cc, irb = start(d, CCW1(css.CCW_CMD_READ_FEAT, css.CCW_FLAG_SLI, 8, DATA))
    assert irb.scsw.dstat == CE_DE and irb.scsw.count == 3 and any(read(d, DATA, 4))
    memory(d)[DATA - RAM + 4] = 1
    cc, irb = start(d, CCW1(css.CCW_CMD_READ_FEAT, 0, 5, DATA))
    assert irb.scsw.dstat == CE_DE and irb.scsw.count == 0 and read(d, DATA, 4) == bytes(4)


@pytest.mark.parametrize("command", [css.CCW_CMD_READ, css.CCW_CMD_WRITE], ids=["read", "write"])
def test_virtio_ccw_has_no_plain_read_or_write(ccw, command):
    d = ccw("virtio").device()
    cc, irb = start(d, CCW1(command, 0, 8, DATA))
    assert irb.scsw.dstat == css.SCSW_DSTAT_UNIT_CHECK and irb.scsw.cpa == PROGRAM + 8
    assert sense(d, irb) == COMMAND_REJECT


# -- start subchannel: the fake's block store ---------------------------------------------------
STORE = "the fake's ccw-block store: virtio-ccw has no plain READ or WRITE"


@pytest.mark.vfio(ccw=True, fake_only=STORE)
def test_a_channel_program_writes_then_reads_a_block_through_guest_memory(ccw, fake):
    d = ccw("store").device()
    block = bytes(range(256)) * 2
    memory(d)[DATA - RAM:DATA - RAM + len(block)] = block
    cc, irb = start(d, CCW1(css.CCW_CMD_WRITE, 0, len(block), DATA))
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.ctrl == css.SCSW_FCTL_START_FUNC | ENDED
    assert (irb.scsw.dstat, irb.scsw.cstat, irb.scsw.cpa) == (CE_DE, 0, PROGRAM + 8)
    cc, irb = start(d, CCW1(css.CCW_CMD_READ, 0, len(block), BUFFER))
    assert irb.scsw.dstat == CE_DE and read(d, BUFFER, len(block)) == block


@pytest.mark.vfio(ccw=True, fake_only=STORE)
def test_chained_commands_and_a_tic_run_in_order(ccw):
    d = ccw("store").device()
    memory(d)[DATA - RAM:DATA - RAM + 8] = b"ABCDEFGH"
    program(d, CCW1(css.CCW_CMD_WRITE, css.CCW_FLAG_CC, 4, DATA),
            CCW1(css.CCW_CMD_TIC, 0, 0, PROGRAM + 24), CCW1(0xFF, 0, 0, 0),
            CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0), CCW1(css.CCW_CMD_WRITE, 0, 4, DATA + 4))
    cc, irb = start(d)
    assert irb.scsw.dstat == CE_DE and irb.scsw.cpa == PROGRAM + 40
    cc, irb = start(d, CCW1(css.CCW_CMD_READ, 0, 8, BUFFER))
    assert read(d, BUFFER, 8) == b"ABCDEFGH"


# -- start subchannel: what becomes of the kernel's answer --------------------------------------
@pytest.mark.parametrize("ret_code, cc, unit_exception", [
    (0, IOInstEnding.CC_EXPECTED, False),
    (-errno.EBUSY, IOInstEnding.CC_BUSY, False),
    (-errno.ENODEV, IOInstEnding.CC_NOT_OPERATIONAL, False),
    (-errno.EACCES, IOInstEnding.CC_NOT_OPERATIONAL, False),
    (-errno.EFAULT, IOInstEnding.CC_EXPECTED, True),
    (-OTHER_ERRNO, IOInstEnding.CC_EXPECTED, True),
])
def test_each_ret_code_of_a_start_becomes_a_condition_code(target, vfio, ret_code, cc, unit_exception):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    program(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    if ret_code:
        host.plan("io-write", errno=-ret_code)
    before = len(d.css.io_interrupts)
    with TraceRecorder() as rec:
        assert d.sch.ssch(orb()) is cc
    errors = messages(rec, "error")
    if unit_exception:
        assert_unit_exception(d, before)
    elif cc is IOInstEnding.CC_EXPECTED:
        assert interrupted(d, before) and d.sch.tsch()[1].scsw.dstat == CE_DE
    else:
        assert len(d.css.io_interrupts) == before and d.sch.scsw.ctrl == 0, "a refused start left the SCSW changed"
    assert errors == ([f"vfio-ccw: write I/O region failed with errno={-ret_code}"] if ret_code else [])


def test_a_start_retries_after_eagain(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    host.plan("io-write", errno=errno.EAGAIN)
    with TraceRecorder() as rec:
        cc, irb = start(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE
    assert len(rec.named("vfio_ccw_write_retry")) == 1 and not rec.named("error")
    assert [r for r, _ in host.writes] == ["io", "io"]


def test_a_short_write_of_the_io_region_is_a_unit_exception(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    host.plan("io-write", count=uapi.ccw_io_region.size - 4)
    before = len(d.css.io_interrupts)
    with TraceRecorder() as rec:
        assert d.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(d, before)
    assert messages(rec, "error") == ["vfio-ccw: write I/O region failed with errno=0"]


@pytest.mark.vfio(ccw=True, fake_only="the fake's subchannel held in start-pending (QEMU's ends every start at once)")
def test_a_start_while_the_kernel_still_runs_one_is_busy(dev, fake):
    sch = fake.ccw_device(dev.name).subchannel
    sch.hold = True
    program(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert dev.handle_request() is IOInstEnding.CC_BUSY
    before = len(dev.css.io_interrupts)
    sch.finish()
    assert interrupted(dev, before) and dev.sch.tsch()[1].scsw.dstat == CE_DE


@pytest.mark.vfio(ccw=True, fake_only="the fake's subchannel with its only channel path taken away")
def test_a_start_with_no_path_available_is_not_operational(dev, fake):
    fake.ccw_device(dev.name).subchannel.schib.pmcw.pam = 0
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_NOT_OPERATIONAL


# -- PFCH --------------------------------------------------------------------------------------
def test_an_orb_without_pfch_is_refused_with_a_unit_exception(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    before = len(d.css.io_interrupts)
    with TraceRecorder() as rec:
        assert d.sch.ssch(orb(ctrl0=css.ORB_CTRL0_MASK_FMT)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(d, before)
    assert messages(rec, "warning") == ["vfio-ccw (devno fe.0.0000): requires PFCH flag set"]
    assert not host.writes, "the kernel saw a request QEMU refuses"


def test_the_pfch_warning_comes_once(dev):
    with TraceRecorder() as rec:
        for _ in range(3):
            dev.sch.ssch(orb(ctrl0=css.ORB_CTRL0_MASK_FMT))
            dev.sch.tsch()
    assert len(rec.named("warning")) == 1 and dev.warned_orb_pfch


def test_force_orb_pfch_sets_the_flag_and_warns_once(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host, force_orb_pfch=True)
    with TraceRecorder() as rec:
        for _ in range(2):
            cc, irb = start(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0), ctrl0=css.ORB_CTRL0_MASK_FMT)
            assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE
    assert messages(rec, "warning") == ["vfio-ccw (devno fe.0.0000): PFCH flag forced"]
    orbs = [ORB.unpack(data) for region, data in host.writes if region == "io"]
    assert len(orbs) == 2 and all(o.ctrl0 & css.ORB_CTRL0_MASK_PFCH for o in orbs)


# -- halt and clear ---------------------------------------------------------------------------
HALT_OK = (0, -errno.EBUSY, -errno.ENODEV, -errno.EACCES)
CLEAR_OK = (0, -errno.ENODEV, -errno.EACCES)
FUNCTION_BITS = {"halt": css.SCSW_FCTL_HALT_FUNC, "clear": css.SCSW_FCTL_CLEAR_FUNC}


@pytest.mark.parametrize("function, ret_code", [
    *(("halt", r) for r in (*HALT_OK[1:], -errno.EFAULT, -OTHER_ERRNO)),
    *(("clear", r) for r in (*CLEAR_OK[1:], -errno.EBUSY, -errno.EFAULT, -OTHER_ERRNO)),
])
def test_each_ret_code_of_halt_and_clear(target, vfio, function, ret_code):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    host.plan("async-write", errno=-ret_code)
    before = len(d.css.io_interrupts)
    assert getattr(d, f"handle_{function}")() == 0
    if ret_code in (HALT_OK if function == "halt" else CLEAR_OK):
        assert len(d.css.io_interrupts) == before and d.sch.scsw.dstat == 0
    else:
        assert_unit_exception(d, before)


@pytest.mark.parametrize("function", ["halt", "clear"])
def test_halt_and_clear_retry_after_eagain(target, vfio, function):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    host.plan("async-write", errno=errno.EAGAIN)
    before = len(d.css.io_interrupts)
    with TraceRecorder() as rec:
        assert getattr(d, f"handle_{function}")() == 0
    assert len(rec.named("vfio_ccw_write_retry")) == 1
    assert interrupted(d, before), "the kernel's halt or clear never interrupted"
    assert d.sch.scsw.ctrl & css.SCSW_CTRL_MASK_FCTL == FUNCTION_BITS[function]


def test_a_halt_of_an_idle_subchannel_reports_device_end(dev):
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    before = len(dev.css.io_interrupts)
    assert dev.sch.hsch() is IOInstEnding.CC_EXPECTED and interrupted(dev, before)
    cc, irb = dev.sch.tsch()
    assert irb.scsw.ctrl == css.SCSW_FCTL_HALT_FUNC | css.SCSW_STCTL_STATUS_PEND
    assert (irb.scsw.dstat, irb.scsw.cstat) == (css.SCSW_DSTAT_DEVICE_END, 0)


def test_a_clear_after_a_program_reports_the_kernels_own_address(dev):
    """The program is freed when it ends, so nothing turns the address the clear reports back into
    the guest's: it is where the kernel's copy of the program was."""
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    before = len(dev.css.io_interrupts)
    assert dev.sch.csch() is IOInstEnding.CC_EXPECTED and interrupted(dev, before)
    cc, irb = dev.sch.tsch()
    assert irb.scsw.ctrl == css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND
    assert (irb.scsw.dstat, irb.scsw.cstat) == (0, 0)
    assert irb.scsw.cpa not in (0, PROGRAM + 8), "the clear's address was translated, or lost"


@pytest.mark.vfio(ccw=True, fake_only="the fake's subchannel held in start-pending (QEMU's ends every start at once)")
def test_a_halt_ends_a_start_the_device_still_holds(dev, fake):
    """css_do_hsch takes the start function off; the start stays pending in the activity."""
    sch = fake.ccw_device(dev.name).subchannel
    sch.hold = True
    program(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    before = len(dev.css.io_interrupts)
    assert dev.sch.hsch() is IOInstEnding.CC_EXPECTED and interrupted(dev, before)
    cc, irb = dev.sch.tsch()
    assert irb.scsw.ctrl & css.SCSW_CTRL_MASK_FCTL == css.SCSW_FCTL_HALT_FUNC
    assert irb.scsw.ctrl & css.SCSW_ACTL_START_PEND and sch.programs == 0


@pytest.mark.vfio(ccw=True, fake_only=f"the fake's {ONLY_IO}, a vfio-ccw mdev with no async command region")
def test_without_the_async_region_halt_and_clear_are_emulated(target, fake):
    d = target.realize(sysfsdev=fake_mdev(ONLY_IO))
    enable(d)
    assert d.handle_halt() == -errno.ENOSYS and d.handle_clear() == -errno.ENOSYS
    before = len(d.css.io_interrupts)
    assert d.sch.csch() is IOInstEnding.CC_EXPECTED
    assert len(d.css.io_interrupts) == before + 1 and not fake.ccw_device(ONLY_IO).subchannel.started
    cc, irb = d.sch.tsch()
    assert irb.scsw.ctrl == css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND


# -- the I/O interrupt ------------------------------------------------------------------------
@pytest.mark.parametrize("code, cstat", [(errno.EFAULT, css.SCSW_CSTAT_DATA_CHECK),
                                         (OTHER_ERRNO, css.SCSW_CSTAT_PROG_CHECK),
                                         (errno.EINVAL, css.SCSW_CSTAT_PROG_CHECK)])
def test_a_failed_irb_read_is_a_channel_check(target, vfio, code, cstat):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    program(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    host.plan("io-read", errno=code)
    before = len(d.css.io_interrupts)
    assert d.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED and interrupted(d, before)
    scsw = d.sch.scsw
    assert scsw.cstat == cstat and scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK
    assert not scsw.ctrl & css.SCSW_ACTL_START_PEND and scsw.ctrl & css.SCSW_FCTL_START_FUNC


def test_a_short_irb_read_is_a_channel_control_check(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    program(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    host.plan("io-read", count=uapi.ccw_io_region.size // 2)
    before = len(d.css.io_interrupts)
    d.sch.ssch(orb())
    assert interrupted(d, before)
    assert d.sch.scsw.cstat == css.SCSW_CSTAT_CHN_CTRL_CHK
    assert d.sch.scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK


def test_enodev_reading_the_irb_is_a_deferred_cc_3(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    program(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    host.plan("io-read", errno=errno.ENODEV)
    before = len(d.css.io_interrupts)
    d.sch.ssch(orb())
    assert interrupted(d, before)
    scsw = d.sch.scsw
    assert scsw.cc == 3 and scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == css.SCSW_STCTL_ALERT | css.SCSW_STCTL_STATUS_PEND
    assert scsw.ctrl & css.SCSW_ACTL_START_PEND and scsw.cstat == 0


def test_a_wakeup_with_nothing_signalled_injects_nothing(dev):
    handler = dev.machine.fd_handlers[dev.notifiers[uapi.VFIO_CCW_IO_IRQ_INDEX]]
    handler()
    assert dev.css.io_interrupts == []


# -- store subchannel and channel reports -----------------------------------------------------
def test_store_subchannel_takes_the_path_bits_the_kernel_has(dev):
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    host = SCHIB.unpack(dev.schib_region.pread(0, SCHIB.SIZE)).pmcw
    cc, schib = dev.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED
    assert (schib.pmcw.pnom, schib.pmcw.lpum, schib.pmcw.pam, schib.pmcw.pom) == (host.pnom, host.lpum, host.pam,
                                                                                   host.pom)
    assert schib.pmcw.intparm == 0x1234 and schib.pmcw.devno == 0


@pytest.mark.vfio(ccw=True, fake_only="the fake's channel-path events (a path going offline)")
def test_store_subchannel_sees_a_path_gone_from_the_kernel(dev, fake):
    sch = fake.ccw_device(dev.name)
    chpid = sch.spec.chpids[0]
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    sch.chp_event(chpid, ChpEvent.OFFLINE)
    sch.subchannel.schib.scsw.flags |= css.SCSW_FLAGS_MASK_PNO
    cc, schib = dev.sch.stsch()
    assert (schib.pmcw.pam, schib.pmcw.pom) == (0, 0xFF) and schib.scsw.flags & css.SCSW_FLAGS_MASK_PNO


def test_a_failed_schib_read_is_reported_and_changes_nothing(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    before = SCHIB.unpack(d.sch.curr_status.pack())
    host.plan("schib-read", errno=errno.ENODEV)
    with TraceRecorder() as rec:
        cc, schib = d.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED and schib.pmcw == before.pmcw
    assert messages(rec, "error") == ["vfio-ccw: store region read failed with errno=19"]


@pytest.mark.vfio(ccw=True, fake_only=f"the fake's {ONLY_IO}, a vfio-ccw mdev with no schib region")
def test_without_a_schib_region_store_subchannel_reads_nothing(target):
    d = target.realize(ram=False, sysfsdev=fake_mdev(ONLY_IO))
    with TraceRecorder() as rec:
        cc, schib = d.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED and schib.pmcw.pam == 0x80 and not rec.named("vfio_region_read")


def test_a_crw_signal_with_none_queued_reads_a_zero_crw_and_queues_nothing(dev):
    with TraceRecorder() as rec:
        dev.vbasedev.trigger_irq(uapi.VFIO_CCW_CRW_IRQ_INDEX)
        assert dev.machine.run_until(lambda: rec.named("vfio_region_read"), WAIT), "the CRW region was not read"
    assert not dev.css.pending_crws and dev.css.crw_mchks == 0


def test_a_failed_crw_read_is_reported_and_queues_nothing(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    host.plan("crw-read", errno=errno.EFAULT)
    with TraceRecorder() as rec:
        d.vbasedev.trigger_irq(uapi.VFIO_CCW_CRW_IRQ_INDEX)
        assert d.machine.run_until(lambda: rec.named("error"), WAIT)
    assert messages(rec, "error") == ["vfio-ccw: Read crw region failed with errno=14"]
    assert not d.css.pending_crws


@pytest.mark.vfio(ccw=True, fake_only="the fake's channel-path events (a path going offline)")
def test_a_channel_path_going_offline_queues_its_crw_for_the_guest(dev, fake):
    chpid = fake.ccw_device(dev.name).spec.chpids[0]
    fake.ccw_device(dev.name).chp_event(chpid, ChpEvent.OFFLINE)
    assert dev.machine.run_until(lambda: dev.css.pending_crws, WAIT), "no CRW reached the guest"
    crw = dev.css.stcrw()
    assert (crw.rsc, crw.erc, crw.rsid) == (css.CRW_RSC_CHP, css.CRW_ERC_PERRN, chpid)
    assert dev.css.crw_mchks == 1 and dev.css.stcrw() is None and dev.css.do_crw_mchk


@pytest.mark.vfio(ccw=True, fake_only="the fake's channel-path events (a path going offline, and back)")
def test_every_queued_crw_is_read_in_order(dev, fake):
    sch = fake.ccw_device(dev.name)
    sch.chp_event(sch.spec.chpids[0], ChpEvent.OFFLINE)
    sch.chp_event(sch.spec.chpids[0], ChpEvent.ONLINE)
    assert dev.machine.run_until(lambda: len(dev.css.pending_crws) == 2, WAIT)
    assert [c.erc for c in dev.css.pending_crws] == [css.CRW_ERC_PERRN, css.CRW_ERC_INIT]
    assert dev.css.crw_mchks == 1 and not sch.crws


# -- reset, options, unrealize ----------------------------------------------------------------
def test_reset_is_vfio_device_reset(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.device(via=host)
    with TraceRecorder() as rec:
        d.reset()
    d.compute_needs_reset()
    assert host.ioctls[uapi.VFIO_DEVICE_RESET] == 1 and not rec.named("vfio_ccw_reset_failed") and not d.needs_reset
    cc, irb = start(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert irb.scsw.dstat == CE_DE, "the subchannel did not work after the reset"


def test_an_option_string_sets_the_properties(target, vfio):
    space, channel_subsystem, _ = target.space(ram=False)
    with VFIOCCWDevice.from_options(space, space.machine, f"sysfsdev={target.sysfs},force-orb-pfch=on",
                                    css=channel_subsystem) as d:
        assert (d.name, d.force_orb_pfch) == (target.subchannel, True)


@pytest.mark.parametrize("option, message", [
    ("force-orb-pfch=maybe", "Parameter 'force-orb-pfch' expects 'on' or 'off'"),
    ("devno=fe.0.0001", "Property 'vfio-ccw.devno' not found"),
])
def test_a_bad_option_is_refused_before_anything_opens(target, option, message):
    space, channel_subsystem, _ = target.space(ram=False)
    before = process_fds()
    with pytest.raises(VFIOError) as e:
        VFIOCCWDevice.from_options(space, space.machine, f"sysfsdev={target.sysfs},{option}", css=channel_subsystem)
    assert e.value.message == message and process_fds() == before


def test_unrealize_tears_the_notifiers_down_and_releases_everything(target, vfio):
    host = PlannedHost(vfio.host)
    d = target.realize(via=host, ram=False)
    before = len(host.set_irqs)
    d.unrealize()
    assert host.set_irqs[before:] == [(1, TRIGGER_EVENTFD, 0, 1), (0, TRIGGER_EVENTFD, 0, 1)]
    assert not d.machine.fd_handlers and not d.space.groups and not d.css.subchannels and d.vbasedev is None
    d.unrealize()


def test_a_channel_program_from_realize_to_unrealize_leaves_nothing_open(target):
    """What a VMM does with the mdev: realize, the guest enables its subchannel and asks SENSE ID
    through the channel subsystem, unrealize; every fd opened on the way is closed again."""
    space, channel_subsystem, _ = target.space()
    before = process_fds()
    d = VFIOCCWDevice.realize(space, space.machine, sysfsdev=target.sysfs, css=channel_subsystem)
    enable(d)
    cc, irb = start(d, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, css.SENSE_ID_SIZE, BUFFER))
    assert irb.scsw.dstat == CE_DE and read(d, BUFFER, 1) == b"\xff"
    d.unrealize()
    assert process_fds() == before and not space.groups and not channel_subsystem.subchannels


# -- the raw ABI: what vfio_ccw answers, and its misuse -----------------------------------------
def test_device_info_regions_and_irqs_are_vfio_ccws(raw):
    """As the CI guest's mdev answered: CCW|RESET, 4 regions, 3 IRQs; the I/O region plain, the
    others at index << 10 with their type capability."""
    session, fd = raw
    info = uapi.vfio_device_info.pack(argsz=uapi.vfio_device_info.size)
    session.host.ioctl(fd, uapi.VFIO_DEVICE_GET_INFO, info)
    info = uapi.vfio_device_info.unpack(info)
    assert (info.flags, info.num_regions, info.num_irqs) == (0x11, 4, 3)
    caps = uapi.VFIO_REGION_INFO_FLAG_CAPS
    rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
    expected = {"io": (rw, None), "async": (rw | caps, uapi.VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD),
                "schib": (uapi.VFIO_REGION_INFO_FLAG_READ | caps, uapi.VFIO_REGION_SUBTYPE_CCW_SCHIB),
                "crw": (uapi.VFIO_REGION_INFO_FLAG_READ | caps, uapi.VFIO_REGION_SUBTYPE_CCW_CRW)}
    for name, (flags, subtype) in expected.items():
        region, buf = session.region_info(fd, REGIONS[name], 64)
        assert (region.flags, region.size, region.offset) == (flags, REGION_SIZES[name], at(name))
        chain = uapi.parse_chain(buf, region.cap_offset, "region") if subtype else []
        assert chain == ([uapi.RegionTypeCap(uapi.VFIO_REGION_TYPE_CCW, subtype)] if subtype else [])
    assert [(i.flags, i.count) for i in (session.irq_info(fd, n) for n in range(3))] == \
        [(uapi.VFIO_IRQ_INFO_EVENTFD, 1)] * 3


def test_indexes_past_the_last_region_and_irq_are_einval(raw):
    session, fd = raw
    assert errno_of(session.region_info, fd, 4) == errno.EINVAL
    assert errno_of(session.irq_info, fd, uapi.VFIO_CCW_NUM_IRQS) == errno.EINVAL
    assert errno_of(session.host.pread, fd, 4, 4 << 10) == errno.EINVAL
    assert errno_of(session.host.pwrite, fd, bytes(4), 4 << 10) == errno.EINVAL


@pytest.mark.parametrize("region", list(REGIONS))
def test_every_region_bounds_its_access_by_its_struct(raw, region):
    session, fd = raw
    size = REGION_SIZES[region]
    assert len(session.host.pread(fd, size, at(region))) == size
    assert errno_of(session.host.pread, fd, size + 1, at(region)) == errno.EINVAL
    assert errno_of(session.host.pread, fd, 4, at(region) + size - 2) == errno.EINVAL


@pytest.mark.parametrize("region", ["schib", "crw"])
def test_the_schib_and_crw_regions_are_read_only(raw, region):
    session, fd = raw
    assert errno_of(session.host.pwrite, fd, bytes(REGION_SIZES[region]), at(region)) == errno.EINVAL


def test_nothing_can_be_mmapped(raw):
    session, fd = raw
    assert errno_of(session.host.mmap, fd, 4096, 0) == errno.EINVAL


def test_the_schib_region_is_the_kernels_store_subchannel(raw, target, vfio):
    """Enabled by the open with vfio_ccw's ISC 3, the device number and path masks sysfs shows."""
    session, fd = raw
    pmcw = SCHIB.unpack(session.host.pread(fd, SCHIB.SIZE, at("schib"))).pmcw
    base = f"/sys/bus/css/devices/{target.subchannel}"
    pim, pam, pom = (int(w, 16) for w in vfio.host.read_text(f"{base}/pimpampom").split())
    devno = int(vfio.host.read_text(f"{base}/dev_busid").strip().rsplit(".", 1)[1], 16)
    assert pmcw.flags & css.PMCW_FLAGS_MASK_ENA and pmcw.flags & css.PMCW_FLAGS_MASK_DNV and pmcw.isc == 3
    assert (pmcw.devno, pmcw.pim, pmcw.pam, pmcw.pom) == (devno, pim, pam, pom)


def test_the_crw_region_reads_a_zero_crw_when_none_is_queued(raw):
    session, fd = raw
    assert session.host.pread(fd, uapi.ccw_crw_region.size, at("crw")) == bytes(uapi.ccw_crw_region.size)


def test_an_unknown_async_command_is_einval(raw):
    session, fd = raw
    assert errno_of(session.host.pwrite, fd, bytes(uapi.ccw_cmd_region.pack(command=0x80)), at("async")) == errno.EINVAL
    data = session.host.pread(fd, uapi.ccw_cmd_region.size, at("async"))
    assert uapi.ccw_cmd_region.unpack(data).command == 0x80
    assert RET_CODE.unpack_from(data, uapi.ccw_cmd_region.offsetof("ret_code"))[0] == -errno.EINVAL


def test_a_write_with_no_function_returns_the_ret_code_it_brought(raw):
    """vfio_ccw returns a non-zero ret_code as it is: negative an errno, positive a byte count."""
    session, fd = raw
    region = bytearray(uapi.ccw_io_region.size)
    assert session.host.pwrite(fd, bytes(region), at("io")) == len(region)
    RET_CODE.pack_into(region, IO_RET_CODE, -errno.E2BIG)
    assert errno_of(session.host.pwrite, fd, bytes(region), at("io")) == errno.E2BIG
    RET_CODE.pack_into(region, IO_RET_CODE, 7)
    assert session.host.pwrite(fd, bytes(region), at("io")) == 7


@pytest.mark.parametrize("function", [css.SCSW_FCTL_HALT_FUNC, css.SCSW_FCTL_CLEAR_FUNC], ids=["halt", "clear"])
def test_halt_or_clear_through_the_io_region_is_not_supported(raw, function):
    session, fd = raw
    region = bytearray(uapi.ccw_io_region.size)
    scsw_at = uapi.ccw_io_region.offsetof("scsw_area")
    region[scsw_at:scsw_at + SCSW.STRUCT.size] = SCSW(ctrl=function).pack()
    assert errno_of(session.host.pwrite, fd, bytes(region), at("io")) == errno.EOPNOTSUPP


def test_set_irqs_takes_the_trigger_of_one_vector_only(raw):
    session, fd = raw
    trigger, mask = uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_ACTION_MASK
    for arg in (irq.data_none(0, 0, 1, mask), irq.data_none(0, 1, 1, trigger), irq.data_none(3, 0, 1, trigger),
                irq.eventfds(1, 0, [-2])):
        assert errno_of(session.host.ioctl, fd, uapi.VFIO_DEVICE_SET_IRQS, arg) == errno.EINVAL


def test_device_reset(raw):
    session, fd = raw
    assert session.host.ioctl(fd, uapi.VFIO_DEVICE_RESET) == 0
