"""pytest plugin: backend selection, the `vfio` fixtures, requirement markers, and the JSON report.

Installed under the pytest11 entry point, so a VMM's own tests can use `vfio`, `fake_kernel`
and `@pytest.mark.vfio(...)` with no glue.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter

import pytest

# The plugin loads before coverage starts, so the packages under test are imported lazily.

# What @pytest.mark.vfio takes: keyword arguments only, each read by the `vfio` fixture.
MARKER_ARGS = ("device", "topology", "destructive", "fake_only", "platform", "ccw", "faults")
# What the `vfio` fixture learnt about a test, for its report: why it skipped, which devices it used.
SKIP_KIND = pytest.StashKey[str]()
DEVICES_USED = pytest.StashKey[list]()
FIGURES = pytest.StashKey[list]()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("vfio", "VFIO conformance")
    group.addoption("--vfio-backend", choices=("fake", "real"), default="fake",
                    help="run on the embedded fake kernel (default) or on this machine's VFIO")
    group.addoption("--vfio-device", action="append", default=[], metavar="BDF|SYSFS",
                    help="a device bound to vfio-pci to test on the real backend (repeatable)")
    group.addoption("--vfio-kernel", metavar="NAME", default=None,
                    help="the fake kernel's version profile (default: 6.1); the real backend tests the running kernel")
    group.addoption("--vfio-destructive", action="store_true", default=False,
                    help="allow reset and DMA on real devices")
    group.addoption("--vfio-json", metavar="FILE", default=None, help="write the conformance JSON report")
    group.addoption("--vfio-fault", action="append", default=[], metavar="RULE",
                    help="fail kernel calls on the fake in every test, e.g. 'ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY' "
                         "(repeatable; see fakekernel.faults.Fault.parse)")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        f"vfio({', '.join(f'{name}=' for name in MARKER_ARGS)}): what a conformance test needs; anything the "
        "backend lacks skips the test with a reason naming it; faults are fakekernel.faults rules armed on the "
        "fake kernel for the test")
    _fault_rules(config.getoption("--vfio-fault", []))
    if config.getoption("--vfio-fault", []) and config.getoption("--vfio-backend", "fake") == "real":
        raise pytest.UsageError("--vfio-fault injects faults into the fake kernel; it needs --vfio-backend fake")
    _kernel_profile(config)
    named = config.getoption("--vfio-device", [])
    if named and not hasattr(config, "workerinput"):
        from .backends import DeviceError, check_named

        try:
            check_named(config.getoption("--vfio-backend", "fake"), named)
        except DeviceError as e:
            raise pytest.UsageError(str(e)) from None
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(RunReport(config), "vfio-run-report")


def _kernel_profile(config):
    """--vfio-kernel, checked once: a profile the fake has, and only for the fake."""
    from .backends import kernel_profile

    name = config.getoption("--vfio-kernel", None)
    kind = config.getoption("--vfio-backend", "fake")
    if name and kind == "real":
        raise pytest.UsageError("--vfio-kernel picks the fake kernel's profile; the real backend tests the "
                                "running kernel")
    try:
        return kernel_profile(kind, name)
    except ValueError as e:
        raise pytest.UsageError(f"--vfio-kernel: {e}") from None


def _fault_rules(specs) -> list:
    """Fresh rules (their counters start at zero) from command-line specs or Fault objects."""
    from fakekernel.faults import Fault

    try:
        return [Fault.parse(spec) if isinstance(spec, str) else spec for spec in specs]
    except ValueError as e:
        raise pytest.UsageError(f"--vfio-fault: {e}") from None


def _requirements(request) -> dict:
    marker = request.node.get_closest_marker("vfio")
    return dict(marker.kwargs) if marker else {}


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A vfio marker with an argument the fixture never reads (devcie="edu") would let its test
    pass without what it asked for; it is a collection error instead, as --strict-markers makes of
    an unknown marker. A marker belongs to one node (module, class or test), so each mistake is
    reported once, with that node's id."""
    report = yield
    if report.passed:
        seen = set()
        mistakes = []
        for node in (collector, *(n for n in report.result if isinstance(n, pytest.Item))):
            for mark in node.own_markers:
                if mark.name == "vfio" and id(mark) not in seen:
                    seen.add(id(mark))
                    mistakes += _marker_mistakes(node.nodeid, mark)
        if mistakes:
            report.outcome, report.longrepr, report.result = "failed", "\n".join(mistakes), []
    return report


def _marker_mistakes(nodeid: str, mark) -> list[str]:
    wrong = [f"a positional argument {arg!r}" for arg in mark.args]
    wrong += [f"an unknown argument {name!r}" for name in mark.kwargs if name not in MARKER_ARGS]
    takes = ", ".join(f"{name}=" for name in MARKER_ARGS)
    return [f"{nodeid}: @pytest.mark.vfio got {what}; it takes only {takes}" for what in wrong]


def pytest_sessionstart(session) -> None:
    """pyfakefs's `fs` puts fakes of `os` and `open` into every loaded module it is not told to
    skip. The VFIO stack needs the real ones whichever of `fs` and `vfio` a test asks for first:
    RealHost opens the real /dev/vfio, the fake kernel has its own filesystem and real eventfds
    and memfds, the leak check reads /proc/self/fd. So its modules go on Patcher.SKIPNAMES, the
    list pyfakefs's documentation has pytest plugins extend."""
    from pyfakefs.fake_filesystem_unittest import Patcher

    Patcher.SKIPNAMES.update(_stack_modules())


def _stack_modules() -> set[str]:
    """Every module of vfio_impl, fakekernel and conformance by its full name, which is what
    pyfakefs matches (a package name does not cover its modules), found without importing them."""
    import importlib.util
    from pathlib import Path

    names = set()
    for package in ("vfio_impl", "fakekernel", "conformance"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            names.add(".".join((package, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"))
    return names


@pytest.fixture
def vfio(request):
    """The backend under test: a fresh FakeKernel per test, or this machine's /dev/vfio.

    On the fake, a test that leaves anything behind (an fd, a VFIO file, an mmap, a DMA mapping)
    fails with each leftover named (conformance.leaks).
    """
    from fakekernel.topology import DEFAULT_TOPOLOGY

    from .backends import (REAL_MISSING, Backend, describe, device_exists, fake_kernel, real_available,
                           real_backend, vfio_bound)
    from .leaks import fds_opened_since, kernel_leftovers, report
    from .reliability import process_fds

    need = _requirements(request)
    kind = request.config.getoption("--vfio-backend")
    if kind == "real":
        if not real_available():
            skip_test(request, "backend", REAL_MISSING)
        if need.get("fake_only"):
            skip_test(request, "runner", f"real backend: needs {need['fake_only']}")
        if need.get("faults"):
            skip_test(request, "runner", "real backend: needs the fake kernel's fault injection")
        if need.get("topology"):
            skip_test(request, "runner", f"real backend: needs the fake kernel's {need['topology']!r} topology")
        backend = real_backend(request.config.getoption("--vfio-device"),
                               request.config.getoption("--vfio-destructive"))
        if need.get("destructive") and not backend.destructive:
            skip_test(request, "destructive",
                  "real backend: destructive test (reset/DMA); pass --vfio-destructive to allow it")
        _require_device(request, backend, need)
        yield backend
        request.node.stash[DEVICES_USED] = backend.used
        return
    before = process_fds()
    default = "platform" if need.get("platform") else "ccw" if need.get("ccw") else DEFAULT_TOPOLOGY
    with fake_kernel(need.get("topology") or default, request.config.getoption("--vfio-kernel")) as kernel:
        backend = Backend("fake", kernel, f"fake {kernel.profile.name}", destructive=True, profile=kernel.profile)
        named = request.config.getoption("--vfio-device")
        if named and not need.get("topology"):
            backend.devices = [describe(kernel, name) for name in named if device_exists(kernel, name)]
        else:
            backend.devices = [describe(kernel, spec.bdf) for spec in kernel.topology.devices]
            backend.devices += [d for d in vfio_bound(kernel) if d.bus != "pci"]
        _require_device(request, backend, need)
        kernel.faults.add(*_fault_rules([*request.config.getoption("--vfio-fault"), *need.get("faults", ())]))
        yield backend
        request.node.stash[DEVICES_USED] = backend.used
        left = kernel_leftovers(kernel)
    left += fds_opened_since(before)
    if left:
        pytest.fail(report(left), pytrace=False)


def _require_device(request, backend, need: dict) -> None:
    model = need.get("device")
    if model and not any(d.model == model for d in backend.devices):
        skip_test(request, "device", f"{backend.kind} backend: no {model} device bound to vfio-pci")
    if need.get("platform") and not any(d.bus in ("platform", "amba") for d in backend.devices):
        skip_test(request, "device", f"{backend.kind} backend: no device bound to vfio-platform or vfio-amba")
    if need.get("ccw") and not any(d.bus == "ccw" for d in backend.devices):
        skip_test(request, "device", f"{backend.kind} backend: no vfio-ccw mdev (an I/O subchannel bound to "
                                     "vfio_ccw, with an mdev of type vfio_ccw-io)")


def skip_test(request, kind: str, reason: str) -> None:
    """Skips, remembering why in a word the report can judge by: "runner" (the real runner
    cannot build what the test needs: a fake topology, fake internals, a bus it lacks),
    "backend" (no VFIO at all), "device" (no such device bound) or "destructive"."""
    request.node.stash[SKIP_KIND] = kind
    pytest.skip(reason)


@pytest.fixture
def vfio_device(request, vfio):
    """The device the test's marker asked for."""
    model = _requirements(request).get("device")
    if not model:
        raise pytest.UsageError("vfio_device needs @pytest.mark.vfio(device=...)")
    return vfio.find(model)


@pytest.fixture
def vfio_pci(request, vfio):
    """Realizes the marker's device through vfio_impl's PCI flavour, as a VMM would: a Machine on
    a virtual clock, its address space, then `VFIOPCIDevice.realize(**options)`. A factory, so a
    test picks the realize options, and `irqfd=True` for a machine that plays KVM's irqfd (one
    machine of each kind a test); everything it realized is torn down after the test."""
    from vfio_impl.core.container import AddressSpace
    from vfio_impl.flavours.pci import VFIOPCIDevice
    from vfio_impl.vmm.machine import Machine, VirtualClock

    model = _requirements(request).get("device")
    if not model:
        raise pytest.UsageError("vfio_pci needs @pytest.mark.vfio(device=...)")
    spaces: dict[bool, AddressSpace] = {}
    realized = []

    def realize(irqfd: bool = False, **options):
        if irqfd not in spaces:
            spaces[irqfd] = AddressSpace(vfio.host, Machine(VirtualClock(), irqfd=irqfd))
        space = spaces[irqfd]
        dev = VFIOPCIDevice.realize(space, space.machine, sysfsdev=vfio.find(model).sysfs, **options)
        realized.append(dev)
        return dev

    try:
        yield realize
    finally:
        for dev in reversed(realized):
            dev.exit()
        for space in spaces.values():
            space.close()
            space.machine.close()


@pytest.fixture
def ivshmem_peer(vfio):
    """A second peer at the ivshmem-doorbell's server: `id`, `device_id` (the id the server gave
    the device under test), `vectors`, `ring(vector)`, `wait_doorbell(vector, timeout)`,
    `read_shm(offset, n)` and `write_shm(offset, data)`."""
    from .ivshmem_peer import peer_for

    peer = peer_for(vfio)
    yield peer
    peer.close()


@pytest.fixture
def fake_kernel(request, vfio):
    """The FakeKernel itself, for tests that inspect fake state; skipped on real backends."""
    if vfio.kind != "fake":
        skip_test(request, "runner", "real backend: needs the fake kernel's internal state")
    return vfio.host


@pytest.fixture
def raw(vfio, request):
    """A RawSession on the device the test's marker names (or none), closed after the test."""
    from .raw import RawSession

    model = _requirements(request).get("device")
    session = RawSession(vfio.host, vfio.find(model) if model else None)
    yield session
    session.close()


@pytest.fixture
def record_reliability(request):
    """Records a reliability figure (a dict) for the JSON report's `reliability` section. Kept
    off `record_property`, whose values JUnit files would carry inside <testcase>."""
    figures = request.node.stash.setdefault(FIGURES, [])
    return figures.append


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Adds what the report needs and only this process knows (the exception object, the
    fixture's stash) to the test report, which xdist carries to the controller as is."""
    report = yield
    extra = {"vfio": "vfio" in getattr(item, "fixturenames", ())}
    if call.excinfo is not None and report.failed:
        from .reasons import failure_reason

        extra["reason"] = failure_reason(call.excinfo, item.path, item.config.rootpath)
    if report.skipped and SKIP_KIND in item.stash:
        extra["skip"] = item.stash[SKIP_KIND]
    if call.when == "teardown":
        extra["devices"] = item.stash.get(DEVICES_USED, [])
        extra["figures"] = item.stash.get(FIGURES, [])
    report.vfio_details = extra
    return report


def area_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    name = module.removesuffix(".py")
    return name.removeprefix("test_").replace("_", "-")


class RunReport:
    """One outcome per test (controller side under xdist), the verdict on the run, and the JSON.

    A run in which no test that asked for `vfio` passed, or in which a named device had no
    passing test, tested nothing that was asked for: it ends with exit status 5 (pytest's "no
    tests"), whatever the skips, and one line saying why."""

    def __init__(self, config):
        self.config = config
        self.tests: dict[str, dict] = {}
        self.reliability: list[dict] = []
        self.uses_vfio: set[str] = set()
        self.verdict = ""

    def pytest_runtest_logreport(self, report) -> None:
        details = getattr(report, "vfio_details", {})
        self.reliability += details.get("figures", [])
        if details.get("vfio"):
            self.uses_vfio.add(report.nodeid)
        entry = self.tests.setdefault(report.nodeid, {"id": report.nodeid, "area": area_of(report.nodeid),
                                                      "outcome": "passed", "reason": "", "duration": 0.0,
                                                      "devices": []})
        entry["duration"] = round(entry["duration"] + report.duration, 6)
        if details.get("devices"):
            entry["devices"] = details["devices"]
        if report.skipped and report.when in ("setup", "call"):
            entry["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            entry["reason"] = reason.removeprefix("Skipped: ")
            entry["skip"] = details.get("skip", "test")
        elif report.failed and entry["outcome"] != "failed":
            entry["outcome"] = "failed"
            entry["reason"] = details.get("reason") or _last_line(report)
            if report.when != "call":
                entry["reason"] = f"in {report.when}: {entry['reason']}"

    def pytest_sessionfinish(self, session) -> None:
        if session.exitstatus == pytest.ExitCode.OK:
            self.verdict = self._nothing_tested()
            if self.verdict:
                session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
        path = self.config.getoption("--vfio-json")
        if path:
            with open(path, "w") as f:
                json.dump(self.document(session), f, indent=1)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.verdict:
            terminalreporter.write_line(f"vfio: {self.verdict}", red=True, bold=True)

    def _nothing_tested(self) -> str:
        ran = [self.tests[i] for i in self.uses_vfio if i in self.tests]
        passed = [t for t in ran if t["outcome"] == "passed"]
        if ran and not passed:
            reasons = Counter(t["reason"] for t in ran if t["outcome"] == "skipped")
            why = f"; {reasons.most_common(1)[0][1]} skipped because: {reasons.most_common(1)[0][0]}" if reasons else ""
            return f"nothing tested: none of {len(ran)} VFIO tests passed{why}"
        from .backends import device_name

        for name in self.config.getoption("--vfio-device"):
            bdf = device_name(name)
            if not any(bdf in t["devices"] for t in passed):
                return f"nothing tested on --vfio-device {name}: no test that uses it passed"
        return ""

    def document(self, session) -> dict:
        cfg = self.config
        from .backends import kernel_label, kernel_profile

        kind = cfg.getoption("--vfio-backend")
        tests = sorted(self.tests.values(), key=lambda t: t["id"])
        summary = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "skipped")}
        devices = sorted({bdf for t in tests for bdf in t["devices"]})
        profile = kernel_profile(kind, cfg.getoption("--vfio-kernel"))
        report = {"backend": kind, "kernel": kernel_label(kind, cfg.getoption("--vfio-kernel")),
                  "profile": profile.name if profile else None, "host": socket.gethostname(),
                  "host_kernel": os.uname().release, "devices": devices, "summary": summary,
                  "exitstatus": int(session.exitstatus), "tests": tests}
        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            report["interrupted"] = True
        if self.verdict:
            report["verdict"] = self.verdict
        if cfg.getoption("--vfio-fault"):
            report["faults"] = cfg.getoption("--vfio-fault")
        if self.reliability:
            from .reliability import summarize

            report["reliability"] = summarize(self.reliability)
        return report


def _last_line(report) -> str:
    text = (report.longreprtext or "").strip()
    return text.splitlines()[-1] if text else report.when
