"""The pytest plugin as another project's tests meet it (pytester runs their test files): the vfio
marker refuses arguments it does not take, pyfakefs's `fs` and `vfio` work in either order, and a
leak is one message naming each thing left behind."""

import re

import pytest

from conformance.plugin import MARKER_ARGS

pytest_plugins = ["pytester"]

TAKES = "device=, topology=, destructive=, fake_only=, platform=, ccw=, faults="


@pytest.fixture
def run(pytester, monkeypatch):
    """An in-process run with the plugin loaded by name, nothing else autoloaded."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return lambda: pytester.runpytest("-p", "conformance.plugin", "-p", "no:cacheprovider")


def run_in_a_fresh_process(pytester):
    """As a user runs it: a new interpreter, every plugin from its entry point, and our packages
    imported by the fixtures (under pyfakefs, when `fs` comes first)."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)


MISTAKES = {
    "unknown": ("""
        import pytest

        @pytest.mark.vfio(devcie="edu")
        def test_attach(vfio):
            pass

        def test_unmarked():
            pass
    """, "test_mine.py::test_attach: @pytest.mark.vfio got an unknown argument 'devcie'"),
    # A module's marker is reported once, not once per test it covers.
    "positional": ("""
        import pytest

        pytestmark = pytest.mark.vfio("edu")

        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_attach(vfio, n):
            pass
    """, "test_mine.py: @pytest.mark.vfio got a positional argument 'edu'"),
}


@pytest.mark.parametrize("source, says", MISTAKES.values(), ids=MISTAKES)
def test_a_marker_mistake_is_one_collection_error_naming_it(pytester, run, source, says):
    pytester.makepyfile(test_mine=source)
    result = run()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(errors=1)
    assert result.stdout.lines.count(f"{says}; it takes only {TAKES}") == 1


def test_every_argument_the_marker_takes_is_accepted(pytester, run):
    assert ", ".join(f"{name}=" for name in MARKER_ARGS) == TAKES
    pytester.makepyfile(test_mine="""
        import pytest

        @pytest.mark.vfio(device="edu", topology="vm", destructive=True, fake_only="the fake kernel",
                          platform=False, ccw=False, faults=[])
        def test_attach(vfio, vfio_device):
            assert vfio_device.model == "edu"
    """)
    run().assert_outcomes(passed=1)


def test_fs_and_vfio_work_in_either_order(pytester):
    """The fake kernel is made under pyfakefs when `fs` comes first; it, the driver and the leak
    check keep the real os, while the test's own files stay fake."""
    pytester.makepyfile(test_mine="""
        import os
        import pytest
        from vfio_impl import AddressSpace, Device

        EDU_ID = 0x010000ED

        def my_files_are_fake(fs):
            fs.create_file("/etc/my-vmm.conf", contents="edu")
            assert open("/etc/my-vmm.conf").read() == "edu" and not os.path.exists("/proc/self/fd")

        def bar0_id(vfio, vfio_device):
            with AddressSpace(vfio.host) as space, Device.attach(space, vfio_device.sysfs) as dev:
                bar0 = dev.region(0)
                trapped = bar0.read(0, 4)
                bar0.mmap()
                return trapped, bar0.read(0, 4)

        @pytest.mark.vfio(device="edu")
        def test_fs_first(fs, vfio, vfio_device):
            my_files_are_fake(fs)
            assert bar0_id(vfio, vfio_device) == (EDU_ID, EDU_ID)

        @pytest.mark.vfio(device="edu")
        def test_vfio_first(vfio, vfio_device, fs):
            my_files_are_fake(fs)
            assert bar0_id(vfio, vfio_device) == (EDU_ID, EDU_ID)

        @pytest.mark.vfio(device="edu")
        def test_fs_first_then_a_leak(fs, vfio):
            os.eventfd(0)
    """)
    result = run_in_a_fresh_process(pytester)
    result.assert_outcomes(passed=3, errors=1)
    assert leak_reports(result) == {"test_fs_first_then_a_leak": ["fd N: an eventfd"]}


LEAKS = """
    import ctypes
    import mmap
    import os
    import socket

    import pytest
    from conformance.raw import RawSession
    from vfio_impl import AddressSpace, Device, uapi
    from vfio_impl.core.irq import eventfds

    KEPT = []   # what a test leaks stays referenced: no collector closes it before the check

    def leak_device(vfio, group, name, index):
        session = RawSession(vfio.host, None)
        container, group = session.container(), session.group(group)
        session.set_container(group, container)
        vfio.host.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        device = session.device(group, name)
        vfio.host.ioctl(device, uapi.VFIO_DEVICE_SET_IRQS, eventfds(index, 0, [session.eventfd()]))
        KEPT.append(session)
        return container, device

    @pytest.mark.vfio(device="edu")
    def test_everything(vfio):
        container, device = leak_device(vfio, 1, "0000:00:03.0", uapi.VFIO_PCI_INTX_IRQ_INDEX)
        ram = mmap.mmap(-1, 4096)
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        vfio.host.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map.pack(
            flags=uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE, vaddr=vaddr, iova=0x100000, size=4096))
        KEPT.extend([ram, vfio.host.mmap(device, 4096, 0), os.memfd_create("guest-ram"), socket.socketpair(),
                     os.pipe(), open(__file__)])

    @pytest.mark.vfio(device="edu")
    def test_msi(vfio):
        leak_device(vfio, 1, "0000:00:03.0", uapi.VFIO_PCI_MSI_IRQ_INDEX)

    @pytest.mark.vfio(platform=True)
    def test_platform(vfio):
        leak_device(vfio, 20, "c0000000.platform-test", 0)

    @pytest.mark.vfio(ccw=True)
    def test_ccw(vfio):
        leak_device(vfio, 30, "8a1c0bd0-7e7a-4f6a-9c3e-000000000313", uapi.VFIO_CCW_IO_IRQ_INDEX)

    @pytest.mark.vfio(device="edu")
    def test_the_same_work_closed(vfio, vfio_device):
        with AddressSpace(vfio.host) as space, Device.attach(space, vfio_device.sysfs) as dev:
            dev.set_irq_signaling(uapi.VFIO_PCI_INTX_IRQ_INDEX, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, dev.new_eventfd())
            dev.region(0).mmap()
            space.dma_buffer(4096, 0x100000).close()
"""


def test_a_leak_names_each_thing_left_behind_in_one_message(pytester):
    pytester.makepyfile(test_mine=LEAKS)
    result = run_in_a_fresh_process(pytester)
    result.assert_outcomes(passed=5, errors=4)
    vfio_files = ["fd N: /dev/vfio/vfio, a container", "fd N: an eventfd"]
    assert leak_reports(result) == {
        "test_everything": sorted([
            *vfio_files, "fd N: /dev/vfio/1, group 1",
            "fd N: the device fd of 0000:00:03.0 (edu), IRQs wired to eventfds: INTx",
            "1 mmap of a device region, never unmapped", "a DMA mapping at iova 0x100000, size 0x1000",
            "fd N: a memfd 'guest-ram'", "fd N: a socket", "fd N: a socket", "fd N: a pipe", "fd N: a pipe",
            f"fd N: {pytester.path / 'test_mine.py'}"]),
        "test_msi": sorted([*vfio_files, "fd N: /dev/vfio/1, group 1",
                            "fd N: the device fd of 0000:00:03.0 (edu), IRQs wired to eventfds: MSI vector 0"]),
        "test_platform": sorted([*vfio_files, "fd N: /dev/vfio/20, group 20",
                                 "fd N: the device fd of c0000000.platform-test, IRQs wired to eventfds: IRQ 0"]),
        "test_ccw": sorted([*vfio_files, "fd N: /dev/vfio/30, group 30",
                            "fd N: the device fd of 8a1c0bd0-7e7a-4f6a-9c3e-000000000313 (subchannel 0.0.0313), "
                            "IRQs wired to eventfds: I/O"]),
    }


def leak_reports(result) -> dict[str, list[str]]:
    """Each teardown error's text by test, its lines sorted with fd numbers as N. A report is
    exactly `the test leaked:` and its indented lines: a traceback would add lines and fail it."""
    reports: dict[str, list[str]] = {}
    lines = None
    for line in result.stdout.lines:
        if m := re.fullmatch(r"_+ ERROR at teardown of (\S+) _+", line):
            lines = reports.setdefault(m[1], [])
        elif line.startswith(("_", "=")):
            lines = None
        elif lines is not None and line:
            lines.append(line)
    for name, lines in reports.items():
        assert lines[0] == "the test leaked:" and all(line.startswith("  ") for line in lines[1:]), (name, lines)
        reports[name] = sorted(re.sub(r"^fd \d+", "fd N", line.strip()) for line in lines[1:])
    return reports
