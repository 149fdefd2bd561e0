"""What the fake's kernel profiles change, each difference on both profiles with each one's answer,
and /proc/interrupts, which names the vectors vfio-pci has wired on either."""

import errno
import os
from contextlib import contextmanager

import pytest

from conformance.backends import describe
from conformance.raw import RawSession, chain_offsets, errno_of, wired_vectors
from conformance.reliability import ROM_MSI, pci_topology
from fakekernel import FakeKernel, Profile, Topology
from fakekernel.profile import LINUX_6_1, LINUX_6_12, PROFILES
from fakekernel.topology import PciDeviceSpec
from fakekernel.vfio_main import info_cap_chain
from vfio_impl import uapi
from vfio_impl.core import irq

EDU, E1000E = "0000:00:03.0", "0000:01:00.0"
INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
TRIGGER = uapi.VFIO_IRQ_SET_ACTION_TRIGGER
E1000E_VECTORS = 5


@contextmanager
def device(profile: str, bdf: str = EDU, topology: Topology | None = None):
    """A fake kernel with `bdf` open through vfio-pci: (kernel, raw session, container fd, device fd)."""
    topology = topology or Topology([PciDeviceSpec(EDU, "edu", 3, interrupt_line=11),
                                     PciDeviceSpec(E1000E, "e1000e", 9, interrupt_line=10)], "profiles")
    with FakeKernel(topology, profile) as kernel:
        raw = RawSession(kernel, describe(kernel, bdf))
        try:
            c, _, d = raw.open_device()
            yield kernel, raw, c, d
        finally:
            raw.close()


def set_irqs(raw, d, buf):
    return raw.host.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, buf)


def test_6_12_is_6_1_with_a_newer_vfio_core():
    """Same runner, same IOMMU: only the VFIO answers differ."""
    assert PROFILES == {"6.1": LINUX_6_1, "6.12": LINUX_6_12} and LINUX_6_12.release == "6.12.0-fake"
    for field in ("type1_extensions", "dma_cc_iommu", "iova_pgsizes", "iova_ranges", "dma_entry_limit"):
        assert getattr(LINUX_6_12, field) == getattr(LINUX_6_1, field), field


@pytest.mark.parametrize("release, name", [("6.1.0-56-amd64", "6.1"), ("6.12.118+deb12-amd64", "6.12"),
                                           ("6.12.0-fake", "6.12"), ("6.10.3", None), ("5.10.0-30-amd64", None)])
def test_a_release_is_modelled_by_the_profile_of_its_version(release, name):
    assert Profile.modelling(release) is (PROFILES[name] if name else None)


# -- VFIO_GROUP_SET_CONTAINER (group.c) ----------------------------------------------------------

@pytest.mark.parametrize("profile, expected", [("6.1", errno.EINVAL), ("6.12", errno.EBADFD)])
def test_set_container_with_a_fd_that_is_no_container(profile, expected):
    with FakeKernel(None, profile) as kernel:
        raw = RawSession(kernel, describe(kernel, EDU))
        try:
            group = raw.group()
            devnull = raw.track(os.open("/dev/null", os.O_RDWR))
            assert errno_of(raw.set_container, group, group) == errno_of(raw.set_container, group, devnull) == expected
            assert errno_of(raw.set_container, group, 12345) == errno.EBADF, "a closed fd stays EBADF"
            raw.set_container(group, raw.container())
            assert errno_of(raw.set_container, group, devnull) == errno.EINVAL, "a group's container comes first"
        finally:
            raw.close()


# -- capability chains (vfio_info_cap_add) -------------------------------------------------------

def iommu_info(raw, c, argsz: int):
    buf = bytearray(max(argsz, uapi.vfio_iommu_type1_info.size))
    uapi.vfio_iommu_type1_info.pack_into(buf, 0, argsz=argsz)
    raw.host.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf)
    return uapi.vfio_iommu_type1_info.unpack(buf), buf


@pytest.mark.parametrize("profile, argsz, offsets", [("6.1", 116, [24, 56, 68]), ("6.12", 120, [24, 56, 72])])
def test_iommu_info_caps_are_rounded_up_to_the_profiles_alignment(profile, argsz, offsets):
    """Migration (32 bytes), DMA_AVAIL (12) and the two IOVA ranges (48): DMA_AVAIL takes 16 on 6.12."""
    with device(profile) as (_, raw, c, _):
        assert iommu_info(raw, c, 24)[0].argsz == argsz
        info, buf = iommu_info(raw, c, 512)
        assert chain_offsets(buf, info.cap_offset) == offsets
        assert [type(cap) for cap in uapi.parse_chain(buf, info.cap_offset, "iommu")] == [
            uapi.MigrationCap, uapi.DmaAvailCap, uapi.IovaRangeCap]


@pytest.mark.parametrize("profile, answer", [("6.1", (116, 24)), ("6.12", (120, 0))])
def test_iommu_info_with_argsz_116(profile, answer):
    """Enough for 6.1's chain; 6.12 asks for 120 and leaves cap_offset 0."""
    with device(profile) as (_, raw, c, _):
        info, _ = iommu_info(raw, c, 116)
        assert (info.argsz, info.cap_offset) == answer and info.flags & uapi.VFIO_IOMMU_INFO_CAPS


@pytest.mark.parametrize("align, size, second", [(1, 24, 36), (8, 32, 40)])
def test_info_cap_chain_pads_each_capability(align, size, second):
    chain = info_cap_chain([uapi.DmaAvailCap(5), uapi.DmaAvailCap(6)], 24, "iommu", align)
    assert len(chain) == size and chain_offsets(bytes(24) + chain, 24) == [24, second]
    assert uapi.parse_chain(bytes(24) + chain, 24, "iommu") == [uapi.DmaAvailCap(5), uapi.DmaAvailCap(6)]


# -- dynamic MSI-X (vfio_pci_core.c, vfio_pci_intrs.c) ---------------------------------------------

@pytest.mark.parametrize("profile, msix_flags", [("6.1", 9), ("6.12", 1)])
def test_msix_irq_info_drops_noresize_only_for_a_device_with_msix(profile, msix_flags):
    with device(profile, E1000E) as (_, raw, _, d):
        assert raw.irq_info(d, MSIX).flags == msix_flags
        assert raw.irq_info(d, MSI).flags == uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE
    with device(profile, EDU) as (_, raw, _, d):
        assert raw.irq_info(d, MSIX).flags == uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE


@pytest.mark.parametrize("profile, accepted", [("6.1", 1), ("6.12", E1000E_VECTORS)])
def test_msix_triggers_are_bounded_by_the_vectors_enabled_only_on_6_1(profile, accepted):
    """MSI-X on with one vector: 6.1 takes a trigger for vector 0 only; 6.12 for any vector of the
    table, firing none that has no eventfd."""
    with device(profile, E1000E) as (_, raw, _, d):
        efd = raw.eventfd()
        set_irqs(raw, d, irq.eventfds(MSIX, 0, [efd]))
        answers = [errno_of(set_irqs, raw, d, irq.data_bool(MSIX, nr, [True], TRIGGER))
                   for nr in range(E1000E_VECTORS + 1)]
        assert answers == [0] * accepted + [errno.EINVAL] * (E1000E_VECTORS + 1 - accepted)
        assert raw.host.eventfd_read(efd) == 1


@pytest.mark.parametrize("profile, answer, wired", [("6.1", errno.EINVAL, {0}), ("6.12", 0, {0, 3})])
def test_an_eventfd_for_a_new_vector_while_msix_is_enabled(profile, answer, wired):
    """6.12 allocates vector 3 with MSI-X still on, and its loopback fires."""
    with device(profile, E1000E) as (kernel, raw, _, d):
        first, fourth = raw.eventfd(), raw.eventfd()
        set_irqs(raw, d, irq.eventfds(MSIX, 0, [first]))
        assert errno_of(set_irqs, raw, d, irq.eventfds(MSIX, 3, [fourth])) == answer
        assert wired_vectors(kernel, E1000E, "msix") == wired
        assert errno_of(set_irqs, raw, d, irq.data_none(MSIX, 3, 1, TRIGGER)) == answer
        assert raw.host.eventfd_read(fourth) == (1 if answer == 0 else 0)
        assert raw.host.eventfd_read(first) == 0


@pytest.mark.parametrize("profile, beyond", [("6.1", errno.EINVAL), ("6.12", 0)])
def test_msi_allocates_no_vector_after_enable_on_either(profile, beyond):
    """Only MSI-X is dynamic: an eventfd for an MSI vector past those enabled is EINVAL on both;
    6.12 only stops refusing the triggers and the unsetting of such a vector."""
    with device(profile, ROM_MSI, pci_topology()) as (kernel, raw, _, d):
        set_irqs(raw, d, irq.eventfds(MSI, 0, [raw.eventfd()]))
        assert errno_of(set_irqs, raw, d, irq.eventfds(MSI, 2, [raw.eventfd()])) == errno.EINVAL
        assert errno_of(set_irqs, raw, d, irq.data_none(MSI, 2, 1, TRIGGER)) == beyond
        assert errno_of(set_irqs, raw, d, irq.eventfds(MSI, 2, [-1])) == beyond
        assert wired_vectors(kernel, ROM_MSI, "msi") == {0}


# -- /proc/interrupts (both profiles alike) --------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_proc_interrupts_names_each_wired_vector_until_it_is_unwired(profile):
    with device(profile, E1000E) as (kernel, raw, _, d):
        efds = [raw.eventfd() for _ in range(3)]
        set_irqs(raw, d, irq.eventfds(MSIX, 0, [-1, efds[1], efds[2]]))
        assert wired_vectors(kernel, E1000E, "msix") == {1, 2}, "vector 0 is allocated but has no handler"
        set_irqs(raw, d, irq.eventfds(MSIX, 2, [-1]))
        assert wired_vectors(kernel, E1000E, "msix") == {1}
        set_irqs(raw, d, irq.data_none(MSIX, 0, 0, TRIGGER))
        assert "vfio-" not in kernel.read_text("/proc/interrupts")
        set_irqs(raw, d, irq.eventfds(INTX, 0, [efds[0]]))
        lines = kernel.read_text("/proc/interrupts").splitlines()
        assert lines[0].split() == ["CPU0"] and lines[1].split() == [
            "10:", "0", "IR-IO-APIC", "10-fasteoi", f"vfio-intx({E1000E})"]
        set_irqs(raw, d, irq.eventfds(INTX, 0, [-1]))
        assert f"vfio-intx({E1000E})" in kernel.read_text("/proc/interrupts"), "the INTx handler outlives its eventfd"
    assert kernel.read_text("/proc/interrupts").splitlines()[1:] == [], "closing the device frees its handlers"


@pytest.mark.parametrize("profile", PROFILES)
def test_msi_vectors_take_the_numbers_after_the_legacy_irqs(profile):
    with device(profile, ROM_MSI, pci_topology()) as (kernel, raw, _, d):
        set_irqs(raw, d, irq.eventfds(MSI, 0, [raw.eventfd(), -1, raw.eventfd()]))
        lines = kernel.read_text("/proc/interrupts").splitlines()[1:]
        assert [line.split() for line in lines] == [
            ["24:", "0", f"IR-PCI-MSI-{ROM_MSI}", "0-edge", f"vfio-msi[0]({ROM_MSI})"],
            ["26:", "0", f"IR-PCI-MSI-{ROM_MSI}", "2-edge", f"vfio-msi[2]({ROM_MSI})"]]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_bad_eventfd_leaves_the_vector_unwired(profile):
    """vfio_msi_set_vector_signal frees the old handler before it looks at the new fd."""
    with device(profile, E1000E) as (kernel, raw, _, d):
        efd = raw.eventfd()
        set_irqs(raw, d, irq.eventfds(MSIX, 0, [efd]))
        assert errno_of(set_irqs, raw, d, irq.eventfds(MSIX, 0, [12345])) == errno.EBADF
        assert wired_vectors(kernel, E1000E, "msix") == set()
        set_irqs(raw, d, irq.data_none(MSIX, 0, 1, TRIGGER))
        assert raw.host.eventfd_read(efd) == 0
