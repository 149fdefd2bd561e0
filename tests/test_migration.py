"""The migration core a Machine holds (vfio_impl.vmm.migration): savevm handlers and vmstates
by idstr and instance, the save refused while any state is unmigratable or any blocker held, with
QEMU's words, and a stream loaded back section by section."""

import errno

import pytest

from vfio_impl import VFIOError
from vfio_impl.vmm.machine import Machine
from vfio_impl.vmm.migration import Migration, Section, VMStateDescription


class Dev:
    """A device with a byte of state; load answers what `answer` says."""

    def __init__(self, state: bytes, answer: int = 0):
        self.state, self.answer, self.loaded = state, answer, []

    def save(self) -> bytes:
        return self.state

    def load(self, data: bytes, version_id: int) -> int:
        self.loaded.append((data, version_id))
        return self.answer


def register(migration: Migration, dev: Dev, idstr: str = "dev", version_id: int = 0) -> None:
    migration.register_savevm(idstr, version_id, dev.save, dev.load, dev)


def test_every_machine_has_its_own_and_an_empty_one_saves_nothing():
    a, b = Machine(), Machine()
    assert a.migration is not b.migration and a.migration.savevm() == []
    a.close()
    b.close()


def test_instances_of_one_idstr_are_numbered_in_order_and_saved_in_order():
    m = Migration()
    first, second, other = Dev(b"1"), Dev(b"2"), Dev(b"o")
    register(m, first)
    register(m, other, "other", version_id=3)
    register(m, second)
    assert m.savevm() == [Section("dev", 0, 0, b"1"), Section("other", 0, 3, b"o"), Section("dev", 1, 0, b"2")]
    m.unregister_savevm(first)
    register(m, first)
    assert [(s.idstr, s.instance_id, s.data) for s in m.savevm()] == [("other", 0, b"o"), ("dev", 1, b"2"),
                                                                      ("dev", 2, b"1")]


def test_an_unmigratable_vmstate_refuses_the_save_by_its_name_until_unregistered():
    m = Migration()
    dev, platform = Dev(b"x"), object()
    register(m, dev)
    m.vmstate_register(VMStateDescription("vfio-platform", unmigratable=True), platform)
    with pytest.raises(VFIOError) as e:
        m.savevm()
    assert e.value.message == "State blocked by non-migratable device 'vfio-platform'" and e.value.errno == 0
    m.unregister_savevm(platform)
    assert m.savevm() == [Section("dev", 0, 0, b"x")]


def test_a_migratable_vmstate_blocks_nothing_and_saves_nothing_of_its_own():
    m = Migration()
    m.vmstate_register(VMStateDescription("quiet"), object())
    assert m.blocked() is None and m.savevm() == []


def test_the_newest_blocker_names_the_refusal_and_each_is_dropped_alone():
    m = Migration()
    m.migrate_add_blocker("first reason")
    m.migrate_add_blocker("second reason")
    m.migrate_add_blocker("first reason")
    with pytest.raises(VFIOError, match="^first reason$"):
        m.savevm()
    m.migrate_del_blocker("first reason")
    assert m.blocked() == "second reason"
    m.migrate_del_blocker("second reason")
    assert m.blocked() == "first reason"
    m.migrate_del_blocker("first reason")
    m.migrate_del_blocker("never added")
    assert m.blocked() is None and m.savevm() == []


def test_unmigratable_state_is_named_before_any_blocker():
    m = Migration()
    m.migrate_add_blocker("a blocker")
    m.vmstate_register(VMStateDescription("vfio-ccw", unmigratable=True), object())
    assert m.blocked() == "State blocked by non-migratable device 'vfio-ccw'"


def test_load_hands_each_section_to_its_instance():
    source, target = Migration(), Migration()
    a, b = Dev(b"a"), Dev(b"b")
    register(source, a, version_id=1)
    register(source, b, version_id=1)
    into_a, into_b = Dev(b""), Dev(b"")
    register(target, into_a)
    register(target, into_b)
    target.loadvm(source.savevm())
    assert into_a.loaded == [(b"a", 1)] and into_b.loaded == [(b"b", 1)]


def test_load_refuses_an_unknown_section_and_reports_a_device_that_refuses():
    m = Migration()
    refusing = Dev(b"", answer=-errno.EINVAL)
    register(m, refusing, "ivshmem")
    with pytest.raises(VFIOError) as e:
        m.loadvm([Section("ivshmem", 1, 0, b"")])
    assert e.value.message == "Unknown savevm section or instance 'ivshmem' 1"
    m.vmstate_register(VMStateDescription("no-load"), object())
    with pytest.raises(VFIOError, match="Unknown savevm section or instance 'no-load' 0"):
        m.loadvm([Section("no-load", 0, 0, b"")])
    with pytest.raises(VFIOError) as e:
        m.loadvm([Section("ivshmem", 0, 0, b"x")])
    assert e.value.message == "error while loading state for instance 0x0 of device 'ivshmem'"
    assert e.value.errno == errno.EINVAL and refusing.loaded == [(b"x", 0)]
