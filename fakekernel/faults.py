"""Fault injection at the fake kernel's syscall surface, and the census that finds what leaked.

A driver's error paths only run when the kernel says no, so the fake can be told to: a `Fault`
rule names the calls it matches (a kind of Host call, an ioctl request, a path, a region, any
predicate) and what they answer instead (an errno, an ioctl's return value, or a short read or
write). `FakeKernel.faults` holds the rules and can record every call, so a test can first
list the calls a setup path makes and then fail each in turn. A failed call fails at entry and
changes nothing, as a syscall refused before it does its work; `close` still releases the fd
(Linux always does) and `exists` answers False, as os.path.exists does on an error.

`census(kernel)` is everything the kernel holds for user space: open files, mmaps, DMA
mappings, group and device references, watched eventfds. Equal before and after = no leak.
"""

from __future__ import annotations

import errno as _errno
import fnmatch
import os
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from vfio_impl import uapi

from .err import error

if TYPE_CHECKING:
    from .kernel import FakeKernel

# The Host methods, each one a syscall a fault can hit.
SYSCALLS = ("open", "close", "ioctl", "pread", "pwrite", "mmap", "readlink", "exists", "stat", "listdir",
            "read_text", "write_text", "eventfd", "eventfd_read", "eventfd_write")
_PATH_CALLS = frozenset({"open", "readlink", "exists", "stat", "listdir", "read_text", "write_text"})
_FD_CALLS = frozenset({"close", "ioctl", "pread", "pwrite", "mmap", "eventfd_read", "eventfd_write"})


def _file_of(name: str) -> str:
    """The VFIO file an ioctl is sent to, by its name."""
    return "group" if name.startswith("VFIO_GROUP_") else "device" if name.startswith("VFIO_DEVICE_") else "container"


def _ioctl_names() -> dict[str, dict[int, str]]:
    """Request numbers by the file they are sent to: VFIO reuses numbers across fd types, and
    type1's names win over sPAPR's on a container."""
    names: dict[str, dict[int, str]] = {"container": {}, "group": {}, "device": {}}
    ordered = sorted(uapi.IOCTLS.items(), key=lambda kv: ("SPAPR" in kv[0] or "EEH" in kv[0], kv[0]))
    for name, number in ordered:
        names[_file_of(name)].setdefault(number, name)
    return names


IOCTL_NAMES = _ioctl_names()
_SET_IRQS_ACTIONS = {uapi.VFIO_IRQ_SET_ACTION_MASK: "MASK", uapi.VFIO_IRQ_SET_ACTION_UNMASK: "UNMASK",
                     uapi.VFIO_IRQ_SET_ACTION_TRIGGER: "TRIGGER"}
_SET_IRQS_DATA = {uapi.VFIO_IRQ_SET_DATA_NONE: "NONE", uapi.VFIO_IRQ_SET_DATA_BOOL: "BOOL",
                  uapi.VFIO_IRQ_SET_DATA_EVENTFD: "EVENTFD"}


def parse_request(request: str | int) -> tuple[int, str | None]:
    """An ioctl request given by uapi name (VFIO_IOMMU_MAP_DMA) or number: the number, and the
    file it is meant for when a name says so (VFIO numbers mean different things per file)."""
    if isinstance(request, int):
        return request, None
    if request in uapi.IOCTLS:
        return uapi.IOCTLS[request], _file_of(request)
    try:
        return int(request, 0), None
    except ValueError:
        raise ValueError(f"unknown ioctl {request!r}") from None


@dataclass(slots=True)
class Call:
    """One Host call as the fault rules see it; `name` describes it stably across runs (no fd
    numbers), so a recorded list of calls can be pinned in a table."""

    seq: int
    kind: str
    target: str = ""
    fd: int = -1
    path: str = ""
    request: int = 0
    region: int = -1
    offset: int = 0
    length: int = 0
    detail: str = ""

    @property
    def name(self) -> str:
        if self.kind in _PATH_CALLS:
            return f"{self.kind} {self.path}"
        if self.kind == "ioctl":
            request = IOCTL_NAMES.get(self.target, {}).get(self.request, f"{self.request:#x}")
            return f"ioctl {request}" + (f" {self.detail}" if self.detail else "")
        if self.kind in ("pread", "pwrite", "mmap") and self.region >= 0:
            return f"{self.kind} region {self.region}+{self.offset:#x} [{self.length:#x}]"
        if self.kind in _FD_CALLS:
            return f"{self.kind} {self.target}"
        return f"{self.kind} {self.path}" if self.path else self.kind


@dataclass(eq=False)
class Fault:
    """A rule: the calls it matches and what they answer.

    kind     a Host method name ("ioctl", "open", "pread", "mmap", "eventfd", ...) or "*" for any
    request  ioctls only: a uapi name or number
    path     path calls only: a glob (fnmatch) the path must match
    region   pread, pwrite and mmap only: the region index on a device fd
    when     any predicate over the Call
    nth      the first matching call that fails (1 = the next one), counted from when the rule
             is added
    times    how many matching calls fail from nth on; None: every one
    errno    the errno the call fails with
    ret      the value the call returns without doing anything (an ioctl's positive answer)
    count    preads and pwrites move at most this many bytes (a short read or write)
    """

    kind: str = "*"
    request: str | int | None = None
    path: str | None = None
    region: int | None = None
    when: Callable[[Call], bool] | None = None
    nth: int = 1
    times: int | None = 1
    errno: int = 0
    ret: int | None = None
    count: int | None = None
    target: str | None = field(default=None, init=False)
    seen: int = field(default=0, init=False)
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind != "*" and self.kind not in SYSCALLS:
            raise ValueError(f"unknown call kind {self.kind!r}; known: {', '.join(SYSCALLS)}")
        if sum(x is not None and x != 0 for x in (self.errno, self.ret, self.count)) != 1:
            raise ValueError("a fault answers with exactly one of errno=, ret= or count=")
        if self.count is not None and self.kind not in ("pread", "pwrite"):
            raise ValueError("count= shortens a pread or pwrite only")
        if self.nth < 1 or (self.times is not None and self.times < 1):
            raise ValueError("nth and times count from 1")
        if self.request is not None:
            self.request, self.target = parse_request(self.request)

    def matches(self, call: Call) -> bool:
        return ((self.kind == "*" or self.kind == call.kind)
                and (self.request is None or (call.kind == "ioctl" and call.request == self.request
                                              and self.target in (None, call.target)))
                and (self.path is None or (call.kind in _PATH_CALLS and fnmatch.fnmatchcase(call.path, self.path)))
                and (self.region is None or call.region == self.region)
                and (self.when is None or self.when(call)))

    def due(self, call: Call) -> bool:
        """Counts a matching call; True when it is among those this rule fails."""
        if not self.matches(call):
            return False
        self.seen += 1
        return self.seen >= self.nth and (self.times is None or self.seen < self.nth + self.times)

    @property
    def spent(self) -> bool:
        return self.times is not None and self.seen >= self.nth + self.times - 1

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        """The command-line form: KIND[:MATCH],key=value,... with keys nth, times (a number or
        'all'), errno (a name or number), ret and count. MATCH is the ioctl request for ioctl,
        the region index for pread/pwrite/mmap, a path glob for path calls. For example
        'ioctl:VFIO_IOMMU_MAP_DMA,errno=EBUSY', 'open:/dev/vfio/vfio,errno=EMFILE,nth=2',
        'pread:7,count=2,times=all'."""
        head, *options = [part.strip() for part in spec.split(",")]
        kind, _, match = head.partition(":")
        kwargs: dict = {"kind": kind or "*"}
        if match:
            if kind == "ioctl":
                kwargs["request"] = match
            elif kind in ("pread", "pwrite", "mmap"):
                kwargs["region"] = int(match, 0)
            elif kind in _PATH_CALLS:
                kwargs["path"] = match
            else:
                raise ValueError(f"fault {spec!r}: {kind or '*'} takes no ':' match")
        for option in options:
            key, _, value = option.partition("=")
            if key == "errno":
                code = getattr(_errno, value, None) if not value.lstrip("-").isdigit() else int(value)
                if not isinstance(code, int) or code <= 0:
                    raise ValueError(f"fault {spec!r}: unknown errno {value!r}")
                kwargs["errno"] = code
            elif key == "times":
                kwargs["times"] = None if value == "all" else int(value)
            elif key in ("nth", "ret", "count"):
                kwargs[key] = int(value, 0)
            else:
                raise ValueError(f"fault {spec!r}: unknown key {key!r} (nth, times, errno, ret, count)")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"fault {spec!r}: {e}") from None

    def __str__(self) -> str:
        match = (f":{IOCTL_NAMES.get(self.target or '', {}).get(self.request, hex(self.request))}"
                 if self.request is not None else f":{self.path}" if self.path is not None
                 else f":{self.region}" if self.region is not None else "")
        answer = (f"errno={_errno.errorcode.get(self.errno, self.errno)}" if self.errno
                  else f"ret={self.ret}" if self.ret is not None else f"count={self.count}")
        times = "all" if self.times is None else self.times
        return f"{self.kind}{match},{answer},nth={self.nth},times={times}"


class Injector:
    """Fault rules and call recorders for one source of calls; Faults is the fake kernel's, and a
    source of other calls (a module's own syscalls) can be one too. `_arm` and `_disarm_if_idle`
    are the source's to hook its calls in while any rule or recorder is active."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[Fault] = []
        self._recorders: list[list[Call]] = []
        self._seq = 0

    def add(self, *faults: Fault | str) -> list[Fault]:
        """Arm rules (Fault objects or their command-line form). Every rule counts the calls it
        matches; when several are due on one call, the first added answers it."""
        rules = [Fault.parse(f) if isinstance(f, str) else f for f in faults]
        with self._lock:
            self.rules.extend(rules)
        self._arm()
        return rules

    def remove(self, *faults: Fault) -> None:
        with self._lock:
            self.rules = [r for r in self.rules if r not in faults]
        self._disarm_if_idle()

    def clear(self) -> None:
        """Every rule and recorder gone; the source back to its plain calls."""
        with self._lock:
            self.rules.clear()
            self._recorders.clear()
        self._disarm_if_idle()

    @contextmanager
    def inject(self, *faults: Fault | str) -> Iterator[list[Fault]]:
        """The rules armed for a block; each rule's `hits` says how often it fired."""
        rules = self.add(*faults)
        try:
            yield rules
        finally:
            self.remove(*rules)

    @contextmanager
    def record(self) -> Iterator[list[Call]]:
        """Every call made in the block, in order."""
        calls: list[Call] = []
        with self._lock:
            self._recorders.append(calls)
        self._arm()
        try:
            yield calls
        finally:
            with self._lock:
                self._recorders.remove(calls)
            self._disarm_if_idle()

    def _arm(self) -> None:
        pass

    def _disarm_if_idle(self) -> None:
        pass

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _answering(self, call: Call) -> Fault | None:
        """Records the call, lets every rule count it, and returns the first one due (its hit)."""
        with self._lock:
            for calls in self._recorders:
                calls.append(call)
            due = [r for r in self.rules if r.due(call)]
            if due:
                due[0].hits += 1
        return due[0] if due else None


class Faults(Injector):
    """The fault rules and call recorders of one FakeKernel.

    While any rule or recorder is active, the kernel's Host methods are wrapped (on the
    instance), so a kernel with none costs nothing extra per call.
    """

    def __init__(self, kernel: "FakeKernel"):
        super().__init__()
        # A weak reference, so a kernel nobody holds is freed at once, not by the cycle collector.
        self._kernel_ref = weakref.ref(kernel)
        self._saved: dict[str, object] | None = None

    # -- the wrapped syscalls -------------------------------------------------------------------
    def _arm(self) -> None:
        if self._saved is not None:
            return
        kernel = self._kernel_ref()
        self._saved = {name: kernel.__dict__.get(name) for name in SYSCALLS}
        for name in SYSCALLS:
            setattr(kernel, name, self._wrap(name, getattr(kernel, name)))

    def _disarm_if_idle(self) -> None:
        if self._saved is None or self.rules or self._recorders:
            return
        kernel = self._kernel_ref()
        for name, saved in self._saved.items():
            if saved is None:
                del kernel.__dict__[name]
            else:
                setattr(kernel, name, saved)
        self._saved = None

    def _wrap(self, kind: str, method: Callable) -> Callable:
        def syscall(*args):
            call = self._describe(kind, args)
            rule = self._answering(call)
            if rule is None:
                return method(*args)
            return self._answer(rule, call, method, args)

        syscall.__name__ = kind
        return syscall

    @staticmethod
    def _answer(rule: Fault, call: Call, method: Callable, args: tuple):
        if rule.count is not None:
            fd, what, offset = args[:3]
            return method(fd, what[:rule.count] if call.kind == "pwrite" else min(what, rule.count), offset)
        if rule.ret is not None:
            return rule.ret
        if call.kind == "exists":
            return False
        if call.kind == "close":
            method(*args)
        raise error(rule.errno, f"injected at {call.name}")

    def _describe(self, kind: str, args: tuple) -> Call:
        call = Call(self._next_seq(), kind)
        if kind in _PATH_CALLS:
            call.path = args[0]
            return call
        if kind not in _FD_CALLS:
            return call
        call.fd = args[0]
        f = self._kernel_ref().files.get(call.fd)
        call.target = f.kind if f is not None else _fd_kind(call.fd)
        if kind == "ioctl":
            call.request = args[1]
            call.detail = _ioctl_detail(call.target, args[1], args[2] if len(args) > 2 else 0)
        elif kind in ("pread", "pwrite", "mmap") and call.target == "device" and len(args) > 2:
            shift = f.device.offset_shift
            offset = args[2]
            call.region, call.offset = offset >> shift, offset & ((1 << shift) - 1)
            call.length = len(args[1]) if kind == "pwrite" else args[1]
        return call


def _fd_kind(fd: int) -> str:
    """What a non-VFIO fd is, as /proc names it (an eventfd, a socket, a file)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed fd"
    return "eventfd" if target == "anon_inode:[eventfd]" else "fd"


def _ioctl_detail(target: str, request: int, arg) -> str:
    """The part of an ioctl's argument that tells one call of a setup path from another."""
    if isinstance(arg, int):
        return str(arg) if target == "container" and request in (uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SET_IOMMU) \
            else ""
    buf = bytes(arg)
    if target == "device" and request in (uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.VFIO_DEVICE_GET_IRQ_INFO) \
            and len(buf) >= 12:
        return f"index={int.from_bytes(buf[8:12], sys.byteorder)}"
    if target == "device" and request == uapi.VFIO_DEVICE_SET_IRQS and len(buf) >= uapi.vfio_irq_set.size:
        s = uapi.vfio_irq_set.unpack(buf)
        action = "|".join(n for bit, n in _SET_IRQS_ACTIONS.items() if s.flags & bit)
        data = "|".join(n for bit, n in _SET_IRQS_DATA.items() if s.flags & bit)
        return f"index={s.index} start={s.start} count={s.count} {action} {data}"
    if target == "container" and request in (uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA) \
            and len(buf) >= uapi.vfio_iommu_type1_dma_unmap.size:
        m = uapi.vfio_iommu_type1_dma_unmap.unpack(buf) if request == uapi.VFIO_IOMMU_UNMAP_DMA \
            else uapi.vfio_iommu_type1_dma_map.unpack(buf)
        return f"iova={m.iova:#x} size={m.size:#x}"
    if target == "group" and request == uapi.VFIO_GROUP_GET_DEVICE_FD:
        return buf.split(b"\0", 1)[0].decode("ascii", "replace")
    return ""


def census(kernel: "FakeKernel") -> dict[str, object]:
    """What the kernel holds for user space, in a form two snapshots compare with ==."""
    containers = {id(f): f for f in kernel.files.values() if f.kind == "container"}
    containers.update((id(g.container), g.container) for g in kernel.groups.values() if g.container)
    devices = {**kernel.vfio_devices, **kernel.platform_devices, **kernel.ccw_devices}
    return {
        "files": dict(sorted(kernel.open_files().items())),
        "mmaps": kernel.live_mappings(),
        "containers": len(containers),
        "dma mappings": sum(len(c.iommu) for c in containers.values() if c.iommu is not None),
        "groups": {n: (g.opened is not None, g.container is not None, g.device_fds)
                   for n, g in kernel.groups.items() if g.opened or g.container or g.device_fds},
        "device opens": {name: d.open_count for name, d in devices.items() if d.open_count},
        "watched fds": kernel.watched(),
    }


def leaks(before: dict[str, object], after: dict[str, object]) -> dict[str, tuple[object, object]]:
    """The census entries that changed: {what: (before, after)}."""
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
