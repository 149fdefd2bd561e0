"""RealHost over os/fcntl/mmap, checked on files every Linux has, and the trace hook."""

import errno
import os

import pytest

from vfio_impl.core.host import Host, RealHost
from vfio_impl.core.trace import TraceRecorder, trace, warn


def test_realhost_is_a_host():
    assert isinstance(RealHost(), Host)


def test_realhost_files_and_sysfs(tmp_path):
    h = RealHost()
    p = tmp_path / "f"
    h.write_text(str(p), "hello")
    assert h.read_text(str(p)) == "hello" and h.exists(str(p)) and h.listdir(str(tmp_path)) == ["f"]
    os.symlink("f", tmp_path / "l")
    assert h.readlink(str(tmp_path / "l")) == "f"
    fd = h.open(str(p))
    assert h.pread(fd, 5, 0) == b"hello" and h.pwrite(fd, b"J", 0) == 1
    m = h.mmap(fd, 5, 0)
    assert m[:5] == b"Jello"
    m.close()
    h.close(fd)


def test_realhost_ioctl_errors_are_oserror():
    h = RealHost()
    fd = h.open("/dev/null")
    try:
        with pytest.raises(OSError) as exc:
            h.ioctl(fd, 0x3B64, 0)
        assert exc.value.errno == errno.ENOTTY
        with pytest.raises(OSError):
            h.ioctl(fd, 0x3B6A, b"name\0")
    finally:
        h.close(fd)


def test_eventfd_helpers():
    h = RealHost()
    fd = h.eventfd()
    assert h.eventfd_read(fd) == 0
    h.eventfd_write(fd, 2)
    assert h.eventfd_read(fd) == 2
    h.close(fd)


def test_trace_recorder():
    with TraceRecorder() as rec:
        trace("vfio_test_event", x=1)
        warn("careful")
    trace("after", x=2)
    assert rec.named("vfio_test_event") == [{"x": 1}]
    assert rec.named("warning") == [{"message": "careful"}]
    assert not rec.named("after")
