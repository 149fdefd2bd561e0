"""The pieces of QEMU's PCI core (hw/pci/pci.c, hw/pci/msix.c) that every emulated device here
shares: the vfio-pci flavour's view of a device, the ivshmem device model and the fake kernel's PCI
functions each keep a config space with its write mask, and the MSI-X ones a table and a PBA, as
QEMU's PCIDevice does. One implementation for all three, so fakekernel imports it too (DESIGN 3);
it imports nothing but the uapi."""

from __future__ import annotations

from typing import Callable

from vfio_impl.uapi.pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_DATA,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
)

PCI_NUM_BARS = 6  # QEMU's name; the header has no such constant
U32 = 0xFFFFFFFF
MSIX_CAP_LENGTH = 12
# ENABLE and MASKALL sit in the control word's high byte.
MSIX_CONTROL_OFFSET = PCI_MSIX_FLAGS + 1
MSIX_ENABLE_MASK = PCI_MSIX_FLAGS_ENABLE >> 8
MSIX_MASKALL_MASK = PCI_MSIX_FLAGS_MASKALL >> 8


def register_bar(config: bytearray, wmask: bytearray, nr: int, size: int, attr: int) -> None:
    """pci_register_bar: the BAR register holds the type bits `attr`, its write mask the size, so
    a guest sizing the BAR reads the size back."""
    off = PCI_BASE_ADDRESS_0 + 4 * nr
    mask = ~(size - 1)
    io = attr & PCI_BASE_ADDRESS_SPACE_IO
    config[off:off + 4] = (attr & U32).to_bytes(4, "little")
    wmask[off:off + 4] = (mask & (PCI_BASE_ADDRESS_IO_MASK if io else PCI_BASE_ADDRESS_MEM_MASK) & U32).to_bytes(4, "little")
    if not io and attr & PCI_BASE_ADDRESS_MEM_TYPE_64 and nr + 1 < PCI_NUM_BARS:
        wmask[off + 4:off + 8] = ((mask >> 32) & U32).to_bytes(4, "little")


def default_write_config(config: bytearray, wmask: bytearray, addr: int, value: int, size: int) -> None:
    """The first half of pci_default_write_config: only the bits the write mask allows change."""
    for i in range(size):
        m = wmask[addr + i]
        config[addr + i] = (config[addr + i] & ~m) | ((value >> (8 * i)) & m)


def msix_pba_size(nentries: int) -> int:
    """One pending bit a vector, in whole qwords."""
    return (nentries + 63) // 64 * 8


def msix_layout_valid(nentries: int, table_offset: int, table_bar_size: int, pba_offset: int, pba_bar_size: int,
                      same_bar: bool) -> bool:
    """msix_init's sanity test, which callers run before they place the capability: a vector count
    the QSIZE field can hold, and a table and PBA that fit their BARs without overlapping."""
    table_size, pba_size = nentries * PCI_MSIX_ENTRY_SIZE, msix_pba_size(nentries)
    return (1 <= nentries <= PCI_MSIX_FLAGS_QSIZE + 1
            and not (same_bar and table_offset < pba_offset + pba_size and pba_offset < table_offset + table_size)
            and table_offset + table_size <= table_bar_size and pba_offset + pba_size <= pba_bar_size)


MSIVectorUseNotifier = Callable[[int, tuple[int, int]], None]
MSIVectorReleaseNotifier = Callable[[int], None]


class MSIXDevice:
    """QEMU's MSI-X support for a PCI device (hw/pci/msix.c), mixed into a device model that keeps
    `config` and `wmask` bytearrays. The model places the capability, calls msix_init, and says in
    msix_trigger how a message leaves it; who else hears of mask changes is what the vector notifiers
    plug in. Until msix_init the device has no MSI-X (msix_cap 0)."""

    config: bytearray
    wmask: bytearray
    msix_cap = 0
    msix_entries_nr = 0
    # Empty and immutable until msix_init gives the device its own.
    msix_table: bytearray = b""
    msix_pba: bytearray = b""
    msix_entry_used: list[int] = ()
    msix_function_masked = True
    msix_vector_use_notifier: MSIVectorUseNotifier | None = None
    msix_vector_release_notifier: MSIVectorReleaseNotifier | None = None

    def msix_trigger(self, vector: int) -> None:
        """Sends an unmasked vector's message: msi_send_message, which each device routes its way."""
        raise NotImplementedError

    # -- set-up --------------------------------------------------------------------------------
    def msix_init(self, cap: int, nentries: int, table_bar: int, table_offset: int, pba_bar: int,
                  pba_offset: int) -> None:
        """msix_init on a capability the caller has placed (each device chains its own way): the
        registers, ENABLE and MASKALL writable, and a table with every vector masked."""
        self.config[cap + PCI_MSIX_FLAGS:cap + PCI_MSIX_FLAGS + 2] = (nentries - 1).to_bytes(2, "little")
        self.config[cap + PCI_MSIX_TABLE:cap + PCI_MSIX_TABLE + 4] = (table_offset | table_bar).to_bytes(4, "little")
        self.config[cap + PCI_MSIX_PBA:cap + PCI_MSIX_PBA + 4] = (pba_offset | pba_bar).to_bytes(4, "little")
        self.wmask[cap + MSIX_CONTROL_OFFSET] |= MSIX_ENABLE_MASK | MSIX_MASKALL_MASK
        self.msix_cap, self.msix_entries_nr = cap, nentries
        self.msix_table = bytearray(nentries * PCI_MSIX_ENTRY_SIZE)
        self.msix_pba = bytearray(msix_pba_size(nentries))
        self.msix_entry_used = [0] * nentries
        self.msix_reset()

    def msix_uninit(self) -> None:
        """The capability is gone: MSI-X reads as disabled and config writes no longer reach it."""
        self.msix_cap = 0

    def msix_reset(self) -> None:
        """ENABLE and MASKALL off, a zeroed table with every vector masked, nothing pending; vector
        use counts stay, as in QEMU."""
        if not self.msix_present():
            return
        self.config[self.msix_cap + MSIX_CONTROL_OFFSET] &= ~self.wmask[self.msix_cap + MSIX_CONTROL_OFFSET]
        self.msix_table[:] = bytes(len(self.msix_table))
        self.msix_pba[:] = bytes(len(self.msix_pba))
        for vector in range(self.msix_entries_nr):
            self.msix_table[vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self._msix_update_function_masked()

    # -- state ---------------------------------------------------------------------------------
    def msix_present(self) -> bool:
        return bool(self.msix_cap)

    def msix_enabled(self) -> bool:
        return bool(self.msix_cap) and bool(self.config[self.msix_cap + MSIX_CONTROL_OFFSET] & MSIX_ENABLE_MASK)

    def _msix_vector_masked(self, vector: int, fmask: bool) -> bool:
        return fmask or bool(self.msix_table[vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL]
                             & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def msix_is_masked(self, vector: int) -> bool:
        return self._msix_vector_masked(vector, self.msix_function_masked)

    def msix_is_pending(self, vector: int) -> bool:
        return bool(self.msix_pba[vector // 8] & (1 << (vector % 8)))

    def _msix_set_pending(self, vector: int) -> None:
        self.msix_pba[vector // 8] |= 1 << (vector % 8)

    def _msix_clr_pending(self, vector: int) -> None:
        self.msix_pba[vector // 8] &= ~(1 << (vector % 8))

    def msix_get_message(self, vector: int) -> tuple[int, int]:
        """The (address, data) the guest programmed into the vector's entry."""
        entry = vector * PCI_MSIX_ENTRY_SIZE
        return (int.from_bytes(self.msix_table[entry:entry + PCI_MSIX_ENTRY_DATA], "little"),
                int.from_bytes(self.msix_table[entry + PCI_MSIX_ENTRY_DATA:entry + PCI_MSIX_ENTRY_VECTOR_CTRL], "little"))

    # -- sending -------------------------------------------------------------------------------
    def msix_notify(self, vector: int) -> None:
        """An unused vector is dropped; a masked one waits in the PBA until it is unmasked."""
        if vector >= self.msix_entries_nr or not self.msix_entry_used[vector]:
            return
        if self.msix_is_masked(vector):
            self._msix_set_pending(vector)
            return
        self.msix_trigger(vector)

    def msix_vector_use(self, vector: int) -> None:
        """PCI lets software use fewer vectors than the device has; only used ones are sent."""
        self.msix_entry_used[vector] += 1

    def msix_vector_unuse(self, vector: int) -> None:
        if vector >= self.msix_entries_nr or not self.msix_entry_used[vector]:
            return
        self.msix_entry_used[vector] -= 1
        if not self.msix_entry_used[vector]:
            self._msix_clr_pending(vector)

    # -- mask changes --------------------------------------------------------------------------
    def _msix_handle_mask_update(self, vector: int, was_masked: bool) -> None:
        """A vector that changes mask state is told to the notifiers, and a pending one sent."""
        is_masked = self.msix_is_masked(vector)
        if is_masked == was_masked:
            return
        if self.msix_vector_use_notifier:
            if is_masked:
                self.msix_vector_release_notifier(vector)
            else:
                self.msix_vector_use_notifier(vector, self.msix_get_message(vector))
        if not is_masked and self.msix_is_pending(vector):
            self._msix_clr_pending(vector)
            self.msix_notify(vector)

    def _msix_update_function_masked(self) -> None:
        self.msix_function_masked = (not self.msix_enabled()
                                     or bool(self.config[self.msix_cap + MSIX_CONTROL_OFFSET] & MSIX_MASKALL_MASK))

    def msix_write_config(self, addr: int, size: int) -> None:
        """After a config write: a change of the function mask is a mask change of every vector."""
        enable_pos = self.msix_cap + MSIX_CONTROL_OFFSET
        if not self.msix_present() or not addr <= enable_pos < addr + size:
            return
        was_masked = self.msix_function_masked
        self._msix_update_function_masked()
        if not self.msix_enabled() or self.msix_function_masked == was_masked:
            return
        for vector in range(self.msix_entries_nr):
            self._msix_handle_mask_update(vector, self._msix_vector_masked(vector, was_masked))

    # -- the table and PBA in their BAR(s): callers decide which access sizes reach them --------
    def msix_table_mmio_read(self, addr: int, size: int) -> int:
        return int.from_bytes(self.msix_table[addr:addr + size], "little")

    def msix_table_mmio_write(self, addr: int, value: int, size: int) -> None:
        """The bytes inside the table change; the entry the write starts in may unmask."""
        vector = addr // PCI_MSIX_ENTRY_SIZE
        was_masked = self.msix_is_masked(vector)
        n = min(size, len(self.msix_table) - addr)
        self.msix_table[addr:addr + n] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:n]
        self._msix_handle_mask_update(vector, was_masked)

    def msix_pba_mmio_read(self, addr: int, size: int) -> int:
        """The PBA is read-only: there is no write."""
        return int.from_bytes(self.msix_pba[addr:addr + size], "little")

    # -- vector notifiers ----------------------------------------------------------------------
    def msix_set_vector_notifiers(self, use: MSIVectorUseNotifier, release: MSIVectorReleaseNotifier) -> None:
        """From now on mask changes use and release vectors; the unmasked ones are used at once."""
        self.msix_vector_use_notifier, self.msix_vector_release_notifier = use, release
        if self.msix_enabled() and not self.msix_function_masked:
            for vector in range(self.msix_entries_nr):
                if not self.msix_is_masked(vector):
                    use(vector, self.msix_get_message(vector))

    def msix_unset_vector_notifiers(self, held: Callable[[int], bool]) -> None:
        """The unmasked vectors are released, then mask changes go unheard. `held` names the ones the
        use notifier really took: vfio-pci's gives up on a vector it has no eventfd for."""
        if self.msix_enabled() and not self.msix_function_masked:
            for vector in range(self.msix_entries_nr):
                if not self.msix_is_masked(vector) and held(vector):
                    self.msix_vector_release_notifier(vector)
        self.msix_vector_use_notifier = self.msix_vector_release_notifier = None

    # -- migration -----------------------------------------------------------------------------
    def msix_save(self) -> bytes:
        """The table, then one pending bit a vector."""
        if not self.msix_present():
            return b""
        return bytes(self.msix_table) + bytes(self.msix_pba[:(self.msix_entries_nr + 7) // 8])

    def msix_load(self, data: bytes) -> None:
        """msix_save's bytes, after the config space: every vector the state unmasks is sent what
        it has pending."""
        if not self.msix_present():
            return
        table, pba = len(self.msix_table), (self.msix_entries_nr + 7) // 8
        self.msix_pba[:] = bytes(len(self.msix_pba))
        self.msix_table[:] = data[:table].ljust(table, b"\0")
        self.msix_pba[:pba] = data[table:table + pba].ljust(pba, b"\0")
        self._msix_update_function_masked()
        for vector in range(self.msix_entries_nr):
            self._msix_handle_mask_update(vector, True)
