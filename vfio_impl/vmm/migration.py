"""QEMU's migration core as a device meets it: the state each device registers to be saved
(savevm.c's handlers, a VMStateDescription that may be unmigratable) and the migration blockers
a device holds while it cannot be moved (migration.c). A save is refused, with QEMU's message,
while any registered state is unmigratable or any blocker is held."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vfio_impl.core.errors import VFIOError


@dataclass(slots=True, frozen=True)
class VMStateDescription:
    """A device class's state as migration knows it; unmigratable refuses every save."""

    name: str
    version_id: int = 0
    unmigratable: bool = False


@dataclass(slots=True, frozen=True)
class Section:
    """One device's state in a saved stream."""

    idstr: str
    instance_id: int
    version_id: int
    data: bytes


@dataclass(slots=True)
class SaveStateEntry:
    idstr: str
    instance_id: int
    version_id: int
    opaque: object
    save: Callable[[], bytes] | None
    load: Callable[[bytes, int], int] | None
    unmigratable: bool = False


class Migration:
    """One VM's savevm handlers and migration blockers."""

    def __init__(self) -> None:
        self.handlers: list[SaveStateEntry] = []
        # Newest first, as migrate_add_blocker prepends: a refused save names the newest.
        self.blockers: list[str] = []

    # -- what devices register ----------------------------------------------------------------
    def register_savevm(self, idstr: str, version_id: int, save: Callable[[], bytes],
                        load: Callable[[bytes, int], int], opaque: object) -> None:
        self.handlers.append(SaveStateEntry(idstr, self._new_instance_id(idstr), version_id, opaque, save, load))

    def vmstate_register(self, vmsd: VMStateDescription, opaque: object) -> None:
        """A device's VMStateDescription; an unmigratable one has nothing to save."""
        self.handlers.append(SaveStateEntry(vmsd.name, self._new_instance_id(vmsd.name), vmsd.version_id, opaque,
                                            None, None, vmsd.unmigratable))

    def _new_instance_id(self, idstr: str) -> int:
        """Instances of one idstr are told apart by the next free instance id, as QEMU does."""
        return 1 + max((e.instance_id for e in self.handlers if e.idstr == idstr), default=-1)

    def unregister_savevm(self, opaque: object) -> None:
        """Whatever `opaque` registered, savevm handler or vmstate."""
        self.handlers = [e for e in self.handlers if e.opaque is not opaque]

    def migrate_add_blocker(self, reason: str) -> None:
        self.blockers.insert(0, reason)

    def migrate_del_blocker(self, reason: str) -> None:
        if reason in self.blockers:
            self.blockers.remove(reason)

    # -- the migration core ---------------------------------------------------------------------
    def blocked(self) -> str | None:
        """Why a save is refused: the first unmigratable state, else the newest blocker."""
        for entry in self.handlers:
            if entry.unmigratable:
                return f"State blocked by non-migratable device '{entry.idstr}'"
        return self.blockers[0] if self.blockers else None

    def savevm(self) -> list[Section]:
        """qemu_savevm_state: every registered device's state, or VFIOError naming what blocks."""
        reason = self.blocked()
        if reason is not None:
            raise VFIOError(reason)
        return [Section(e.idstr, e.instance_id, e.version_id, e.save()) for e in self.handlers if e.save]

    def loadvm(self, sections: list[Section]) -> None:
        """qemu_loadvm_state: each section to the device registered under its idstr and instance."""
        for section in sections:
            entry = next((e for e in self.handlers if (e.idstr, e.instance_id) == (section.idstr, section.instance_id)
                          and e.load), None)
            if entry is None:
                raise VFIOError(f"Unknown savevm section or instance '{section.idstr}' {section.instance_id}")
            ret = entry.load(section.data, section.version_id)
            if ret < 0:
                raise VFIOError(f"error while loading state for instance {section.instance_id:#x} of device "
                                f"'{section.idstr}'", -ret)
