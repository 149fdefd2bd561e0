"""The fault walker itself (conformance.reliability): it must see every kind of defect it exists to
find, in setup functions written to have them."""

import errno
import os

from conformance.reliability import PATHS, Rig, SetupPath, read_table, render_table, summarize, walk
from fakekernel import Topology
from vfio_impl import VFIOError, uapi
from vfio_impl.core.container import Group


def opens_then_reads(rig: Rig, close_on_error: bool = True) -> None:
    """Opens a group and reads its status; a careful version closes the fd when the read fails."""
    host = rig.kernel
    try:
        fd = host.open("/dev/vfio/3", os.O_RDWR)
    except OSError as e:
        raise VFIOError.from_oserror("open", e) from e
    try:
        host.ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, uapi.vfio_group_status.pack())
    except OSError as e:
        if close_on_error:
            host.close(fd)
        raise VFIOError.from_oserror("status", e) from e
    rig.later(host.close, fd)


def test_a_clean_path_walks_every_call_once():
    result = walk(SetupPath("careful", Topology.default, setup=opens_then_reads))
    assert result.clean and [p.call for p in result.points] == ["open /dev/vfio/3", "ioctl VFIO_GROUP_GET_STATUS"]
    assert [(p.outcome, p.message, p.hits) for p in result.points] == [("raises", "[EMFILE] open", 1),
                                                                        ("raises", "[EIO] status", 1)]


def test_an_fd_left_open_on_the_error_path_is_a_leak():
    result = walk(SetupPath("careless", Topology.default, setup=lambda rig: opens_then_reads(rig, False)))
    leaky = result.points[1]
    assert not result.clean and result.figures()["leaks"] == 1
    assert leaky.leaks["files"] == ({}, {"group": 1}) and leaky.leaks["groups"] == ({}, {3: (True, False, 0)})
    assert "!! LEAKED" in leaky.line()


def test_an_exception_other_than_vfioerror_is_a_crash():
    result = walk(SetupPath("raw", Topology.default, setup=lambda rig: rig.later(rig.kernel.close,
                                                                                 rig.kernel.open("/dev/vfio/3"))))
    (point,) = result.points
    assert point.outcome == "crashes" and not point.clean and point.message.startswith("OSError: [Errno 24]")


def test_references_the_driver_keeps_are_leaks_too():
    """A group the address space still holds is found before the machine goes."""
    def keeps_group(rig: Rig) -> None:
        Group.get(rig.space, 3)
    result = walk(SetupPath("keeps", Topology.default, setup=keeps_group))
    assert result.baseline_leaks["groups"] == [3] and not result.clean


def test_undo_must_bring_the_kernel_back_to_where_prepare_left_it():
    """Guest RAM added by the walked part and never removed by undo keeps its DMA mapping."""
    def add_two(rig: Rig) -> None:
        rig.machine.add_ram(0x100000, 0x1000)
        rig.machine.add_ram(0x200000, 0x1000)
    path = SetupPath("no undo", Topology.default, prepare=lambda rig: rig.later(Group.get(rig.space, 3).put),
                     setup=add_two, undo=lambda rig: None)
    first, second = walk(path).points
    assert first.outcome == "reports" and first.message.startswith("vfio_dma_map(0x100000, 0x1000,")
    assert first.leaks == second.leaks == {"dma mappings": (0, 1)}, "the section the listener did map stays"


def test_the_table_round_trips_and_a_new_call_shows_as_a_difference():
    careful = walk(SetupPath("careful", Topology.default, setup=opens_then_reads))
    pinned = read_table(render_table([careful]))
    assert pinned == {"careful": careful.render().splitlines()[1:]}

    def reads_twice(rig: Rig) -> None:
        opens_then_reads(rig)
        rig.kernel.exists("/dev/vfio/3")
    grown = walk(SetupPath("careful", Topology.default, setup=reads_twice))
    assert grown.render().splitlines()[1:] != pinned["careful"]
    assert grown.points[-1].call == "exists /dev/vfio/3" and grown.points[-1].outcome == "absorbs"


def test_the_summary_adds_up_walks_fuzz_and_hostile_clients():
    records = [walk(PATHS[0]).figures(), {"kind": "fuzz", "target": "ioctl", "examples": 10, "leaks": 0},
               {"kind": "hostile", "scenario": "garbage", "connections": 3, "fds_left": 0, "leaks": 0}]
    summary = summarize(records)
    assert summary["injection_points"] == summary["injection_points_clean"] == records[0]["points"]
    assert summary["fuzz_examples"] == 10 and summary["fuzz_targets"] == {"ioctl": 10}
    assert summary["hostile_clients"] == {"garbage": {"connections": 3, "fds_left": 0, "leaks": 0}}
    assert summary["leaks"] == 0
    assert summarize([{**records[0], "leaks": 2}])["leaks"] == 2


def test_errnos_are_the_kernels_answers_to_running_out():
    result = walk(SetupPath("careful", Topology.default, setup=opens_then_reads))
    assert [p.errno for p in result.points] == [errno.EMFILE, errno.EIO]
