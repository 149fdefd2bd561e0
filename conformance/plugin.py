"""pytest plugin: backend selection, the `vfio` fixtures, requirement markers, and the JSON report.

Installed under the pytest11 entry point, so a VMM's own tests can use `vfio`, `fake_kernel`
and `@pytest.mark.vfio(...)` with no glue.
"""

from __future__ import annotations

import json
import os

import pytest

# The plugin loads before coverage starts, so the packages under test are imported lazily.

# The fake mirrors the CI VM by default, so every test that runs on real also runs on the fake.
FAKE_TOPOLOGY = "vm"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("vfio", "VFIO conformance")
    group.addoption("--vfio-backend", choices=("fake", "real"), default="fake",
                    help="run on the embedded fake kernel (default) or on this machine's VFIO")
    group.addoption("--vfio-device", action="append", default=[], metavar="BDF|SYSFS",
                    help="a device bound to vfio-pci to test on the real backend (repeatable)")
    group.addoption("--vfio-destructive", action="store_true", default=False,
                    help="allow reset and DMA on real devices")
    group.addoption("--vfio-json", metavar="FILE", default=None, help="write the conformance JSON report")
    group.addoption("--vfio-fault", action="append", default=[], metavar="RULE",
                    help="fail kernel calls on the fake in every test, e.g. 'ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY' "
                         "(repeatable; see fakekernel.faults.Fault.parse)")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "vfio(device=None, topology=None, destructive=False, fake_only=None, platform=False, ccw=False, faults=()): "
        "what a conformance test needs; anything the backend lacks skips the test with a reason naming it; "
        "faults are fakekernel.faults rules armed on the fake kernel for the test")
    _fault_rules(config.getoption("--vfio-fault", []))
    if config.getoption("--vfio-fault", []) and config.getoption("--vfio-backend", "fake") == "real":
        raise pytest.UsageError("--vfio-fault injects faults into the fake kernel; it needs --vfio-backend fake")
    if config.getoption("--vfio-json", None) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(JSONReport(config), "vfio-json-report")


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


def _open_fds() -> set[int]:
    return set(int(fd) for fd in os.listdir("/proc/self/fd"))


@pytest.fixture
def vfio(request):
    """The backend under test: a fresh FakeKernel per test, or this machine's /dev/vfio.

    On the fake, every open fd is counted before and after the test: a leak fails it.
    """
    from fakekernel import FakeKernel, Topology

    from .backends import REAL_MISSING, Backend, describe, real_available, real_backend

    need = _requirements(request)
    kind = request.config.getoption("--vfio-backend")
    if kind == "real":
        if not real_available():
            pytest.skip(REAL_MISSING)
        if need.get("platform"):
            pytest.skip("real backend: no vfio-platform device")
        if need.get("ccw"):
            pytest.skip("real backend: no vfio-ccw device")
        if need.get("fake_only"):
            pytest.skip(f"real backend: needs {need['fake_only']}")
        if need.get("faults"):
            pytest.skip("real backend: needs the fake kernel's fault injection")
        if need.get("topology"):
            pytest.skip(f"real backend: needs the fake kernel's {need['topology']!r} topology")
        backend = real_backend(request.config.getoption("--vfio-device"),
                               request.config.getoption("--vfio-destructive"))
        if need.get("destructive") and not backend.destructive:
            pytest.skip("real backend: destructive test (reset/DMA); pass --vfio-destructive to allow it")
        _require_device(backend, need)
        yield backend
        return
    before = _open_fds()
    default = "platform" if need.get("platform") else "ccw" if need.get("ccw") else FAKE_TOPOLOGY
    kernel = FakeKernel(Topology.named(need.get("topology") or default))
    backend = Backend("fake", kernel, f"fake {kernel.profile.name}", destructive=True)
    backend.devices = [describe(kernel, spec.bdf) for spec in kernel.topology.devices]
    try:
        _require_device(backend, need)
        kernel.faults.add(*_fault_rules([*request.config.getoption("--vfio-fault"), *need.get("faults", ())]))
        yield backend
    finally:
        kernel.close_all()
    leaked = _open_fds() - before
    assert not leaked, f"test leaked file descriptors {sorted(leaked)}"


def _require_device(backend, need: dict) -> None:
    model = need.get("device")
    if model and backend.find(model) is None:
        pytest.skip(f"{backend.kind} backend: no {model} device bound to vfio-pci")


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
    test picks the realize options; everything it realized is torn down after the test."""
    from vfio_impl.container import AddressSpace
    from vfio_impl.machine import Machine, VirtualClock
    from vfio_impl.pci import VFIOPCIDevice

    model = _requirements(request).get("device")
    if not model:
        raise pytest.UsageError("vfio_pci needs @pytest.mark.vfio(device=...)")
    machine = Machine(VirtualClock())
    space = AddressSpace(vfio.host, machine)
    realized = []

    def realize(**options):
        dev = VFIOPCIDevice.realize(space, machine, sysfsdev=vfio.find(model).sysfs, **options)
        realized.append(dev)
        return dev

    try:
        yield realize
    finally:
        for dev in reversed(realized):
            dev.exit()
        space.close()
        machine.close()


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
def fake_kernel(vfio):
    """The FakeKernel itself, for tests that inspect fake state; skipped on real backends."""
    if vfio.kind != "fake":
        pytest.skip("real backend: needs the fake kernel's internal state")
    return vfio.host


@pytest.fixture
def raw(vfio, request):
    """A RawSession on the device the test's marker names (or none), closed after the test."""
    from .raw import RawSession

    model = _requirements(request).get("device")
    session = RawSession(vfio.host, vfio.find(model) if model else None)
    yield session
    session.close()


def area_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    name = module.removesuffix(".py")
    return name.removeprefix("test_").replace("_", "-")


class JSONReport:
    """Collects one outcome per test (controller side under xdist) and writes the report."""

    def __init__(self, config):
        self.config = config
        self.tests: dict[str, dict] = {}
        self.reliability: dict[str, list[dict]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        figures = [value for name, value in report.user_properties if name == "reliability"]
        if figures:
            self.reliability[report.nodeid] = figures
        entry = self.tests.setdefault(report.nodeid, {"id": report.nodeid, "area": area_of(report.nodeid),
                                                      "outcome": "passed", "reason": ""})
        if report.skipped and report.when in ("setup", "call"):
            entry["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            entry["reason"] = reason.removeprefix("Skipped: ")
        elif report.failed:
            entry["outcome"] = "failed"
            entry["reason"] = (report.longreprtext or "").strip().splitlines()[-1:][0] if report.longreprtext else report.when

    def pytest_sessionfinish(self, session) -> None:
        cfg = self.config
        kind = cfg.getoption("--vfio-backend")
        if kind == "real":
            kernel = os.uname().release
        else:
            from fakekernel.profile import LINUX_6_1

            kernel = f"fake {LINUX_6_1.name}"
        tests = sorted(self.tests.values(), key=lambda t: t["id"])
        summary = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "skipped")}
        report = {"backend": kind, "kernel": kernel, "summary": summary, "tests": tests}
        if cfg.getoption("--vfio-fault"):
            report["faults"] = cfg.getoption("--vfio-fault")
        if self.reliability:
            from .reliability import summarize

            report["reliability"] = summarize([f for figures in self.reliability.values() for f in figures])
        path = cfg.getoption("--vfio-json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
