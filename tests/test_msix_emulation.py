"""The PCI core's MSI-X (vfio_impl.hw.pci), fed config and table writes with no device around it:
the one implementation behind the vfio-pci flavour, the ivshmem model and the fake kernel."""

from __future__ import annotations

import pytest

from vfio_impl.hw.pci import MSIXDevice, default_write_config, msix_layout_valid

CAP, CONTROL = 0x40, 0x42
ENABLE, MASKALL = 0x8000, 0x4000
PBA_OFFSET = 0x800
ADDRESS = 0xFEE00000


class Device(MSIXDevice):
    """A config space with MSI-X at 0x40, the table and PBA in BAR 2, every vector in use; what it
    sends is recorded as (vector, address, data)."""

    def __init__(self, entries: int = 4) -> None:
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.sent: list[tuple[int, int, int]] = []
        self.msix_init(CAP, entries, 2, 0, 2, PBA_OFFSET)
        for vector in range(entries):
            self.msix_vector_use(vector)

    def msix_trigger(self, vector: int) -> None:
        self.sent.append((vector, *self.msix_get_message(vector)))

    def config_write(self, addr: int, value: int, size: int) -> None:
        default_write_config(self.config, self.wmask, addr, value, size)
        self.msix_write_config(addr, size)

    def program(self, vector: int, data: int, masked: bool = False) -> None:
        """The guest's entry: address, upper address, data, then the vector control dword."""
        for off, value in ((0, ADDRESS), (4, 0), (8, data), (12, int(masked))):
            self.msix_table_mmio_write(16 * vector + off, value, 4)

    def pba(self) -> int:
        return self.msix_pba_mmio_read(0, 8)


@pytest.fixture
def dev() -> Device:
    d = Device()
    d.config_write(CONTROL, ENABLE, 2)
    return d


# -- msix_init ------------------------------------------------------------------------------------
def test_init_writes_the_capability_and_masks_every_vector():
    d = Device(entries=5)
    assert int.from_bytes(d.config[CAP + 2:CAP + 12], "little") == (4 | (2 << 16) | ((PBA_OFFSET | 2) << 48))
    assert d.wmask[CAP:CAP + 12] == bytes(3) + b"\xc0" + bytes(8), "only ENABLE and MASKALL are writable"
    assert [d.msix_table_mmio_read(16 * v + 12, 4) for v in range(5)] == [1] * 5
    assert len(d.msix_table) == 5 * 16 and d.msix_pba == bytes(8)
    assert d.msix_present() and not d.msix_enabled() and d.msix_function_masked


def test_a_device_without_msix_init_has_none():
    d = MSIXDevice()
    d.config, d.wmask = bytearray(256), bytearray(256)
    assert not d.msix_present() and not d.msix_enabled()
    d.msix_write_config(0, 256)
    assert d.msix_save() == b""


# -- sending, masking, pending --------------------------------------------------------------------
def test_an_unmasked_vector_sends_its_message(dev):
    dev.program(1, 0x51)
    dev.msix_notify(1)
    assert dev.sent == [(1, ADDRESS, 0x51)] and dev.pba() == 0


def test_a_masked_vector_pends_and_unmasking_sends_it_once(dev):
    dev.program(2, 0x52, masked=True)
    dev.msix_notify(2)
    dev.msix_notify(2)
    assert dev.sent == [] and dev.pba() == 1 << 2 and dev.msix_is_pending(2)
    dev.msix_table_mmio_write(16 * 2 + 12, 0, 4)
    assert dev.sent == [(2, ADDRESS, 0x52)] and dev.pba() == 0


def test_the_message_is_read_when_sent_not_when_raised(dev):
    dev.program(0, 0x50, masked=True)
    dev.msix_notify(0)
    dev.msix_table_mmio_write(8, 0x99, 4)
    assert dev.sent == [], "a write to a masked entry's message sends nothing"
    dev.msix_table_mmio_write(12, 0, 4)
    assert dev.sent == [(0, ADDRESS, 0x99)]


def test_a_write_that_leaves_the_mask_alone_sends_nothing_pending(dev):
    dev.program(0, 0x50, masked=True)
    dev.msix_notify(0)
    dev.msix_table_mmio_write(12, 1, 4)
    assert dev.sent == [] and dev.msix_is_pending(0)


def test_the_function_mask_holds_every_vector_and_releases_the_unmasked_ones(dev):
    dev.program(0, 0x50)
    dev.program(1, 0x51, masked=True)
    dev.config_write(CONTROL, ENABLE | MASKALL, 2)
    assert dev.msix_function_masked and dev.msix_is_masked(0)
    dev.msix_notify(0)
    dev.msix_notify(1)
    assert dev.sent == [] and dev.pba() == 0b11
    dev.config_write(CONTROL, ENABLE, 2)
    assert dev.sent == [(0, ADDRESS, 0x50)] and dev.pba() == 0b10, "vector 1's own mask still holds it"


def test_disabled_msix_is_a_masked_function(dev):
    dev.program(3, 0x53)
    dev.config_write(CONTROL, 0, 2)
    dev.msix_notify(3)
    assert dev.sent == [] and dev.msix_is_pending(3)
    dev.config_write(CONTROL, ENABLE, 2)
    assert dev.sent == [(3, ADDRESS, 0x53)]


def test_disabling_does_not_send_or_drop_what_is_pending(dev):
    dev.program(0, 0x50, masked=True)
    dev.msix_notify(0)
    dev.config_write(CONTROL, ENABLE | MASKALL, 2)
    dev.config_write(CONTROL, 0, 2)
    assert dev.sent == [] and dev.msix_is_pending(0)


def test_only_a_write_covering_the_control_byte_updates_the_function_mask(dev):
    dev.program(0, 0x50)
    dev.config[CONTROL + 1] |= MASKALL >> 8   # behind the core's back
    dev.config_write(CAP + 4, 0, 4)
    assert not dev.msix_function_masked
    dev.config_write(CAP, (ENABLE | MASKALL) << 16, 4)
    assert dev.msix_function_masked


def test_unused_and_out_of_range_vectors_are_dropped(dev):
    dev.program(1, 0x51, masked=True)
    dev.msix_notify(1)
    dev.msix_vector_unuse(1)
    assert not dev.msix_is_pending(1), "the last unuse clears the pending bit"
    dev.msix_notify(1)
    dev.msix_notify(4)
    dev.msix_table_mmio_write(16 + 12, 0, 4)
    assert dev.sent == [] and dev.pba() == 0 and dev.msix_entry_used == [1, 0, 1, 1]
    dev.msix_vector_unuse(1)
    assert dev.msix_entry_used == [1, 0, 1, 1], "a use count never goes below 0"


# -- the table and PBA as the BAR shows them ------------------------------------------------------
def test_the_table_takes_any_width_little_endian(dev):
    dev.msix_table_mmio_write(16, 0x1122334455667788, 8)
    dev.msix_table_mmio_write(16 + 8, 0xBEEF, 2)
    dev.msix_table_mmio_write(16 + 10, 0xAD, 1)
    assert dev.msix_get_message(1) == (0x1122334455667788, 0xADBEEF)
    assert dev.msix_table_mmio_read(16 + 4, 4) == 0x11223344 and dev.msix_table_mmio_read(16 + 9, 2) == 0xADBE


@pytest.mark.parametrize("off,size,value", [(12, 2, 0xFFFE), (12, 1, 0), (8, 8, 0x00000000_00000042)],
                         ids=["2-byte control", "1-byte control", "data and control in one qword"])
def test_a_narrow_or_wide_write_of_the_control_dword_unmasks(dev, off, size, value):
    dev.program(0, 0x42, masked=True)
    dev.msix_notify(0)
    dev.msix_table_mmio_write(off, value, size)
    assert dev.sent == [(0, ADDRESS, 0x42)]


def test_a_write_past_the_table_end_stays_inside_it(dev):
    dev.msix_table_mmio_write(4 * 16 - 4, 0xAABBCCDD_00000001, 8)
    assert len(dev.msix_table) == 4 * 16 and dev.msix_table_mmio_read(4 * 16 - 4, 8) == 1


def test_pba_bits_are_vector_order_across_qwords():
    d = Device(entries=70)
    d.config_write(CONTROL, ENABLE, 2)
    for vector in (0, 9, 63, 64, 69):
        d.msix_notify(vector)
    assert len(d.msix_pba) == 16
    assert d.msix_pba_mmio_read(0, 8) == (1 << 0) | (1 << 9) | (1 << 63)
    assert d.msix_pba_mmio_read(8, 4) == (1 << 0) | (1 << 5)
    assert d.msix_pba_mmio_read(1, 1) == 1 << 1 and d.msix_pba_mmio_read(4, 4) == 1 << 31


# -- vector notifiers -----------------------------------------------------------------------------
class Notifiers:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def use(self, vector: int, msg: tuple[int, int]) -> None:
        self.calls.append(("use", vector, msg))

    def release(self, vector: int) -> None:
        self.calls.append(("release", vector))


def test_setting_notifiers_uses_the_unmasked_vectors_at_once(dev):
    dev.program(1, 0x51)
    dev.program(2, 0x52, masked=True)
    n = Notifiers()
    dev.msix_set_vector_notifiers(n.use, n.release)
    assert n.calls == [("use", 1, (ADDRESS, 0x51))]


def test_setting_notifiers_under_the_function_mask_uses_nothing(dev):
    dev.program(1, 0x51)
    dev.config_write(CONTROL, ENABLE | MASKALL, 2)
    n = Notifiers()
    dev.msix_set_vector_notifiers(n.use, n.release)
    assert n.calls == []


def test_mask_changes_use_and_release_through_the_notifiers(dev):
    n = Notifiers()
    dev.msix_set_vector_notifiers(n.use, n.release)
    dev.program(0, 0x50)
    dev.msix_table_mmio_write(12, 1, 4)
    dev.msix_table_mmio_write(8, 0x60, 4)
    dev.msix_table_mmio_write(12, 0, 4)
    assert n.calls == [("use", 0, (ADDRESS, 0x50)), ("release", 0), ("use", 0, (ADDRESS, 0x60))]
    n.calls.clear()
    dev.config_write(CONTROL, ENABLE | MASKALL, 2)
    dev.config_write(CONTROL, ENABLE, 2)
    assert n.calls == [("release", 0), ("use", 0, (ADDRESS, 0x60))]


def test_unsetting_releases_the_held_unmasked_vectors_then_goes_quiet(dev):
    n = Notifiers()
    dev.msix_set_vector_notifiers(n.use, n.release)
    for vector in (0, 1, 3):
        dev.program(vector, 0x50 + vector)
    n.calls.clear()
    dev.msix_unset_vector_notifiers(lambda vector: vector != 1)
    assert n.calls == [("release", 0), ("release", 3)]
    dev.msix_table_mmio_write(12, 1, 4)
    assert n.calls == [("release", 0), ("release", 3)]


def test_disabling_msix_tells_the_notifiers_nothing_and_unsetting_then_releases_nothing(dev):
    """vfio-pci tears its vectors down itself when the guest turns MSI-X off."""
    n = Notifiers()
    dev.msix_set_vector_notifiers(n.use, n.release)
    dev.program(0, 0x50)
    n.calls.clear()
    dev.config_write(CONTROL, 0, 2)
    assert n.calls == []
    dev.msix_unset_vector_notifiers(lambda vector: True)
    assert n.calls == []


# -- reset and migration --------------------------------------------------------------------------
def test_reset_masks_and_zeroes_everything_but_keeps_use_counts(dev):
    dev.program(0, 0x50, masked=True)
    dev.msix_notify(0)
    dev.msix_reset()
    assert not dev.msix_enabled() and dev.msix_function_masked and dev.pba() == 0
    assert dev.msix_table == (bytes(12) + b"\x01" + bytes(3)) * 4 and dev.msix_entry_used == [1] * 4


def test_save_and_load_carry_table_and_pending_and_send_what_load_unmasks(dev):
    dev.program(0, 0x50, masked=True)
    dev.program(1, 0x51, masked=True)
    dev.msix_notify(0)
    dev.msix_notify(1)
    dev.msix_table_mmio_write(12, 0, 4)
    dev.sent.clear()
    dev.msix_table_mmio_write(12, 1, 4)
    dev.msix_notify(0)
    state = dev.msix_save()
    assert len(state) == 4 * 16 + 1 and state[-1] == 0b11

    target = Device()
    target.config[:] = dev.config
    target.msix_load(state[:12] + b"\0" + state[13:])
    assert target.sent == [(0, ADDRESS, 0x50)], "the loaded state unmasks vector 0, pending since the save"
    assert target.pba() == 0b10 and target.msix_get_message(1) == (ADDRESS, 0x51)


# -- the masked config write ----------------------------------------------------------------------
def test_default_write_config_changes_only_writable_bits_of_the_bytes_it_covers():
    config, wmask = bytearray(b"\x12\x34\x56\x78"), bytearray(b"\xff\x0f\x00\xf0")
    default_write_config(config, wmask, 0, 0xFFFFFFFF, 4)
    assert config == bytearray(b"\xff\x3f\x56\xf8")
    default_write_config(config, wmask, 1, 0x0000, 2)
    assert config == bytearray(b"\xff\x30\x56\xf8")


# -- msix_init's sanity test ----------------------------------------------------------------------
@pytest.mark.parametrize("entries,table,table_bar_size,pba,pba_bar_size,same_bar,valid", [
    (128, 0, 4096, 2048, 4096, True, True),
    (129, 0, 4096, 2048, 4096, True, False),
    (0, 0, 4096, 2048, 4096, True, False),
    (2049, 0, 1 << 20, 1 << 16, 1 << 20, True, False),
    (8, 0x3000, 0x10000, 0x3000, 0x1000, False, False),
    (8, 0x3000, 0x10000, 0x0FF8, 0x1000, False, True),
    (8, 0xFF80, 0x10000, 0, 0x1000, False, True),
    (8, 0xFF90, 0x10000, 0, 0x1000, False, False),
], ids=["exclusive-bar-full", "table-into-pba", "no-vectors", "qsize-overflow", "pba-past-its-bar",
        "pba-at-its-bar-end", "table-at-its-bar-end", "table-past-its-bar"])
def test_layout_validity(entries, table, table_bar_size, pba, pba_bar_size, same_bar, valid):
    assert msix_layout_valid(entries, table, table_bar_size, pba, pba_bar_size, same_bar) is valid
