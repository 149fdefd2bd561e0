"""The machine: virtual clock timers, the fd loop, guest RAM and listeners, IRQ lines."""

import os

from vfio_impl.machine import Machine, RealClock, VirtualClock


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
