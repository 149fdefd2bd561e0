"""The machine: virtual clock timers, the fd loop, guest RAM and listeners, IRQ lines."""

import errno
import os

import pytest

from vfio_impl.vmm.machine import Machine, RealClock, VirtualClock


def test_virtual_clock_fires_timers_in_order():
    clock = VirtualClock()
    m = Machine(clock)
    fired = []
    a, b = m.new_timer(lambda: fired.append("a")), m.new_timer(lambda: fired.append("b"))
    a.mod(1100)
    b.mod(500)
    clock.advance(1099)
    assert fired == ["b"] and a.pending
    clock.advance(1)
    assert fired == ["b", "a"] and not a.pending


def test_rearming_replaces_the_deadline():
    clock = VirtualClock()
    m = Machine(clock)
    fired = []
    t = m.new_timer(lambda: fired.append(clock.now_ms()))
    t.mod(100)
    t.mod(300)
    clock.advance(200)
    assert fired == []
    clock.advance(100)
    assert fired == [300]


def test_timer_rearmed_from_its_callback():
    clock = VirtualClock()
    m = Machine(clock)
    fired = []

    def cb():
        fired.append(clock.now_ms())
        if len(fired) < 3:
            t.mod(clock.now_ms() + 10)

    t = m.new_timer(cb)
    t.mod(10)
    clock.advance(100)
    assert fired == [10, 20, 30]


def test_deleted_timer_does_not_fire():
    clock = VirtualClock()
    m = Machine(clock)
    t = m.new_timer(lambda: (_ for _ in ()).throw(AssertionError("fired")))
    t.mod(5)
    t.delete()
    clock.advance(10)
    assert m.next_deadline() is None


def test_fd_handler_runs_on_poll():
    m = Machine()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = []
    m.set_fd_handler(fd, lambda: seen.append(os.eventfd_read(fd)))
    assert m.has_fd_handler(fd)
    os.eventfd_write(fd, 3)
    assert m.run_until(lambda: seen == [3], timeout=1)
    m.set_fd_handler(fd, None)
    assert not m.has_fd_handler(fd)
    assert not m.run_until(lambda: False, timeout=0.01)
    os.close(fd)
    m.close()


def test_a_handler_removed_by_another_in_the_same_round_does_not_run():
    """Both fds are ready in one poll and each handler removes the other's: one runs, as in
    QEMU's loop, which skips a handler deleted since the poll returned."""
    m = Machine()
    a, b = os.eventfd(1, os.EFD_NONBLOCK), os.eventfd(1, os.EFD_NONBLOCK)
    ran = []
    m.set_fd_handler(a, lambda: (ran.append(a), m.set_fd_handler(b, None)))
    m.set_fd_handler(b, lambda: (ran.append(b), m.set_fd_handler(a, None)))
    assert m.poll(0) == 1 and len(ran) == 1 and list(m.fd_handlers) == ran
    m.close()
    os.close(a)
    os.close(b)


def test_a_reader_closed_before_its_handler_is_removed():
    """epoll forgets a closed fd by itself; removing or reusing its number still works."""
    m = Machine()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    m.set_fd_handler(fd, lambda: None)
    os.close(fd)
    again = os.eventfd(1, os.EFD_NONBLOCK)
    assert again == fd
    seen = []
    m.set_fd_handler(again, lambda: seen.append(os.eventfd_read(again)))
    assert m.poll(0) == 1 and seen == [1]
    m.set_fd_handler(again, None)
    assert not m.fd_handlers
    m.close()
    os.close(again)


def test_ram_listener_sees_existing_and_new_areas():
    m = Machine()
    events = []

    class Listener:
        def region_add(self, area):
            events.append(("add", area.gpa))

        def region_del(self, area):
            events.append(("del", area.gpa))

    first = m.add_ram(0x1000, 0x1000)
    listener = Listener()
    m.register_listener(listener)
    second = m.add_ram(0x10000, 0x2000)
    assert second.vaddr and first.vaddr != second.vaddr
    m.remove_ram(first)
    m.unregister_listener(listener)
    m.close()
    assert events == [("add", 0x1000), ("add", 0x10000), ("del", 0x1000)]


def test_irq_line_history_and_msi():
    m = Machine()
    line = m.irq_line("intx")
    line.set(True)
    line.set(True)
    line.set(False)
    assert m.irq_line("intx") is line and line.history == [True, False] and line.raised == 1
    got = []
    m.msi_handlers.append(lambda a, d: got.append((a, d)))
    m.msi_notify(0xFEE00000, 0x41)
    assert got == m.msi_messages == [(0xFEE00000, 0x41)]
    assert RealClock().now_ms() > 0


def test_irqfd_is_opt_in():
    m = Machine()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    with pytest.raises(OSError) as e:
        m.add_irqfd(fd, m.irq_line("spi 5"))
    assert e.value.errno == errno.ENOSYS
    assert not m.irqfd_available and not m.irqfds
    os.close(fd)
    m.close()


def test_an_irqfd_without_resample_is_an_edge():
    m = Machine(irqfd=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    line = m.irq_line("spi 6")
    m.add_irqfd(fd, line)
    os.eventfd_write(fd, 1)
    assert m.run_until(lambda: line.history, timeout=1)
    assert line.history == [True, False] and not line.level
    assert not m.eoi("spi 6"), "an edge irqfd has nothing to resample"
    m.remove_irqfd(fd)
    os.close(fd)
    m.close()


def test_a_resampling_irqfd_holds_the_line_until_the_eoi_writes_the_resample_fd():
    m = Machine(irqfd=True)
    trigger, resample = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    line = m.irq_line("spi 7")
    m.add_irqfd(trigger, line, resample)
    user = []
    m.set_fd_handler(trigger, lambda: user.append("user"))
    m.set_fd_handler(trigger, None)
    os.eventfd_write(trigger, 1)
    assert m.run_until(lambda: line.level, timeout=1), "removing a user handler removed the irqfd"
    assert m.poll(0) == 0 and line.history == [True] and not user
    assert m.eoi("spi 7") and not line.level
    assert os.eventfd_read(resample) == 1
    assert not m.eoi("spi 8")
    for fd in (trigger, resample):
        os.close(fd)
    m.close()


def test_an_irqfd_on_an_msi_route_sends_its_message_and_routes_need_irqfd():
    with pytest.raises(OSError) as e:
        Machine().add_msi_route(0xFEE00000, 0x41)
    assert e.value.errno == errno.ENOSYS
    m = Machine(irqfd=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    first, route = m.add_msi_route(0xFEE00000, 0x40), m.add_msi_route(0xFEE01000, 0x41)
    assert first.virq != route.virq and m.msi_routes == {first.virq: first, route.virq: route}
    m.add_irqfd(fd, route)
    os.eventfd_write(fd, 1)
    assert m.run_until(lambda: m.msi_messages, timeout=1)
    assert m.msi_messages == [(0xFEE01000, 0x41)] and not m.eoi("spi 5")
    m.remove_irqfd(fd)
    m.release_virq(route)
    assert m.msi_routes == {first.virq: first}
    os.close(fd)
    m.close()


def test_a_second_irqfd_on_one_eventfd_is_refused_and_removal_empties_the_loop():
    m = Machine(irqfd=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    m.add_irqfd(fd, m.irq_line("a"))
    with pytest.raises(OSError) as e:
        m.add_irqfd(fd, m.irq_line("b"))
    assert e.value.errno == errno.EBUSY
    m.remove_irqfd(fd)
    m.remove_irqfd(fd)
    assert not m.irqfds and not m.fd_handlers
    os.eventfd_write(fd, 1)
    assert m.poll(0) == 0 and not m.irq_line("a").history
    os.close(fd)
    m.close()
