"""ci/vm/lib.sh, the host-side logic of ci/real-vm.sh, called with fake inputs: what --arch and --kernel
name, a kernel's module directory and load order, the vmlinux inside a bzImage, the arm64 Image, what a
kernel build's config lost, the guest kernel command line, the auto-mode choice of accelerator and its
memo, the foreign guests' private apt state and package lists, and reading a boot's console; and
ci/vm/guest_wheels.py. No VM boots; one test runs the tiny KVM probe guest under TCG when QEMU and
binutils are here."""

from __future__ import annotations

import gzip
import lzma
import re
import shlex
import struct
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parents[1] / "ci"
LIB = CI / "vm" / "lib.sh"

# Stand-ins for the host: /dev/kvm, the facts the memo is keyed by, and the probe guest
# (which records its calls and passes or fails as told).
FAKE_HOST = r"""
kvm_usable() { [ "${FAKE_KVM_DEV:-yes}" = yes ]; }
kvm_host_facts() {
    echo "kernel: ${FAKE_KERNEL:-6.1.0-test}"
    echo "qemu: QEMU emulator version ${FAKE_QEMU:-7.2.0}"
    echo "cpu: ${FAKE_CPU:-Test CPU}"
}
probe_image() { echo /fake/kvm-probe.elf; }
probe_guest() {
    echo "$*" >> "$work/probe-calls"
    probe_why="KVM internal error. Suberror: 1"
    [ "${FAKE_PROBE:-fail}" = pass ]
}
"""


def bash(script: str, work: Path, env: dict[str, str] | None = None, stdin: str | None = None):
    """Runs SCRIPT in bash -euo pipefail with lib.sh sourced and work=WORK, in WORK."""
    full = f"set -euo pipefail\nwork={shlex.quote(str(work))}\n. {shlex.quote(str(LIB))}\n{script}"
    return subprocess.run(["bash", "-c", full], capture_output=True, text=True, input=stdin, cwd=work,
                          env=None if env is None else {"PATH": "/usr/bin:/bin", **env}, timeout=60)


def choose(work: Path, mode: str = "auto", **fake: str) -> tuple[str, str]:
    """(accel, accel_why) from choose_accel MODE on the fake host; FAKE_* settings as keywords."""
    r = bash(FAKE_HOST + f'choose_accel {mode}\nprintf "%s\\n%s\\n" "$accel" "$accel_why"', work,
             env={f"FAKE_{k.upper()}": v for k, v in fake.items()})
    assert r.returncode == 0, r.stderr
    accel, why = r.stdout.splitlines()
    return accel, why


def probe_calls(work: Path) -> list[str]:
    f = work / "probe-calls"
    return f.read_text().splitlines() if f.exists() else []


def memos(work: Path) -> list[Path]:
    return sorted((work / "accel").glob("kvm-failed-*"))


# --- what --kernel names --------------------------------------------------------------------

def elf(notes: list[tuple[bytes, int, bytes]], banner: bytes = b"") -> bytes:
    """A minimal ELF64 file: one PT_NOTE segment with NOTES (name, type, descriptor), then BANNER."""
    body = b""
    for name, kind, desc in notes:
        name += b"\0"
        body += struct.pack("<III", len(name), len(desc), kind)
        body += name.ljust(-(-len(name) // 4) * 4, b"\0") + desc.ljust(-(-len(desc) // 4) * 4, b"\0")
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    return ehdr + phdr + body + banner


PVH_NOTE = (b"Xen", 18, struct.pack("<Q", 0x1000000))  # XEN_ELFNOTE_PHYS32_ENTRY
VMLINUX = elf([(b"Xen", 6, b"linux\0"), PVH_NOTE], banner=b"Linux version 6.99.0-test (ci@test) #1\0")


def compress(data: bytes, fmt: str) -> bytes:
    """DATA as the kernel build packs it into a bzImage: all but gzip end in the 4-byte size."""
    size = struct.pack("<I", len(data))
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if fmt == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout + size
    return bytes.fromhex("02214c18") + bytes(32) + size  # lz4


def bzimage(payload: bytes, release: str = "6.99.0-test") -> bytes:
    """A bzImage's boot header (one setup sector) and PAYLOAD, 16 bytes into the protected-mode part,
    with more after it, as in a real one."""
    head = bytearray(1024 + 16)
    head[0x1f1] = 1  # setup_sects
    head[0x202:0x206] = b"HdrS"
    head[0x20e:0x210] = struct.pack("<H", 0x300 - 0x200)  # kernel_version
    version = f"{release} (ci@test) #1 SMP\0".encode()
    head[0x300:0x300 + len(version)] = version
    head[0x248:0x250] = struct.pack("<II", 16, len(payload))  # payload_offset, payload_length
    return bytes(head) + payload + b"code after the payload" * 8


def spec(work: Path, *args: str, arch: str = "amd64") -> dict[str, str]:
    """kernel_spec ARCH ARGS: its status and the variables it sets."""
    names = ["kernel_kind", "kernel_meta", "kernel_file", "kernel_modules", "kernel_error"]
    r = bash(f"rc=0\nkernel_spec {shlex.join([arch, *args])} || rc=$?\n"
             + "".join(f'echo "{n}=${n}"\n' for n in ["rc", *names]), work)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


@pytest.mark.parametrize("arch, track, meta", [
    ("amd64", "6.1", "linux-image-amd64"), ("amd64", "6.12", "linux-image-6.12-amd64"),
    ("arm64", "6.1", "linux-image-arm64"), ("arm64", "6.12", "linux-image-6.12-arm64"),
    ("s390x", "6.1", "linux-source-6.1"), ("s390x", "6.12", "linux-source-6.12"),  # what its kernel is built from
])
def test_a_track_names_its_metapackage(tmp_path, arch, track, meta):
    assert spec(tmp_path, track, arch=arch) == {"rc": "0", "kernel_kind": "track", "kernel_meta": meta,
                                                "kernel_file": "", "kernel_modules": "", "kernel_error": ""}


def test_each_arch_has_a_default_track(tmp_path):
    r = bash('echo "${default_kernel[amd64]} ${default_kernel[arm64]} ${default_kernel[s390x]}"', tmp_path)
    assert r.stdout == "6.1 6.12 6.1\n"


@pytest.mark.parametrize("arch, args, error", [
    ("sparc", ["6.1"], "--arch wants amd64, arm64 or s390x, not 'sparc'"),
    ("arm64", ["6.13"], "--kernel wants 6.1 or 6.12 with --arch arm64, not '6.13'"),
    ("arm64", ["vmlinux"], "--kernel wants 6.1 or 6.12 with --arch arm64, not 'vmlinux'"),  # no kernel files
    ("arm64", ["6.12", "mods"], "--modules goes with a bzImage or vmlinux; --kernel 6.12 brings its own"),
    ("s390x", ["vmlinux"], "--kernel wants 6.1 or 6.12 with --arch s390x, not 'vmlinux'"),
    ("s390x", ["6.1", "mods"], "--modules goes with a bzImage or vmlinux; --kernel 6.1 brings its own"),
])
def test_the_foreign_guests_take_only_their_tracks(tmp_path, arch, args, error):
    (tmp_path / "vmlinux").write_bytes(VMLINUX)
    (tmp_path / "mods").mkdir()
    got = spec(tmp_path, *args, arch=arch)
    assert got["rc"] == "1" and got["kernel_error"] == error


def test_kernel_files_are_told_apart_by_their_first_bytes_not_their_names(tmp_path):
    (tmp_path / "linux-image-6.99.deb").write_bytes(b"!<arch>\ndebian-binary   1234  0     0     100644  4  `\n2.0\n")
    (tmp_path / "bzImage").write_bytes(bzimage(compress(VMLINUX, "gzip")))
    (tmp_path / "vmlinux").write_bytes(VMLINUX)
    (tmp_path / "kernel.deb").write_bytes(VMLINUX)
    mods = tmp_path / "mods"
    mods.mkdir()
    for name, kind in [("linux-image-6.99.deb", "deb"), ("bzImage", "bzimage"), ("vmlinux", "elf"),
                       ("kernel.deb", "elf")]:
        got = spec(tmp_path, name) if kind == "deb" else spec(tmp_path, name, "mods")
        assert (got["rc"], got["kernel_kind"], got["kernel_file"]) == ("0", kind, str(tmp_path / name))
        assert got["kernel_modules"] == ("" if kind == "deb" else "mods")
    assert spec(tmp_path, "bzImage")["kernel_modules"] == ""  # --modules is optional


@pytest.mark.parametrize("args, error", [
    (["6.13"], "--kernel wants 6.1, 6.12, or the path of a linux-image .deb, a bzImage or a vmlinux: "
               "no file '6.13'"),
    (["notes.txt"], "--kernel notes.txt: neither a Debian package, a bzImage nor an ELF vmlinux"),
    (["6.12", "mods"], "--modules goes with a bzImage or vmlinux; --kernel 6.12 brings its own"),
    (["k.deb", "mods"], "--modules goes with a bzImage or vmlinux; --kernel k.deb brings its own"),
    (["vmlinux", "nomods"], "--modules nomods: no such directory"),
])
def test_a_bad_kernel_argument_is_said_in_one_line(tmp_path, args, error):
    (tmp_path / "notes.txt").write_text("not a kernel\n")
    (tmp_path / "k.deb").write_bytes(b"!<arch>\ndebian-binary   ")
    (tmp_path / "vmlinux").write_bytes(VMLINUX)
    (tmp_path / "mods").mkdir()
    got = spec(tmp_path, *args)
    assert got["rc"] == "1" and got["kernel_error"] == error


@pytest.mark.parametrize("args", [["--kernel", "/nonexistent/bzImage"], ["--kernel", "6.13"],
                                  ["--kernel", "/etc/hostname"], ["--kernel", "6.12", "--modules", "/"],
                                  ["--arch", "sparc"], ["--arch", "arm64", "--kernel", "6.13"],
                                  ["--arch", "arm64", "--kernel", "/etc/hostname"], ["--timeout", "0"],
                                  ["--arch", "s390x", "--kernel", "6.13"]])
def test_real_vm_refuses_a_bad_argument_with_one_line_and_status_2_before_doing_anything(tmp_path, args):
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(CI / "real-vm.sh"), *args, "--", "true"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "VFIO_CI_WORK": str(work)}, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("real-vm: --")
    assert not work.exists()


@pytest.mark.parametrize("arch", ["arm64", "s390x"])
def test_a_foreign_guest_refuses_kvm_before_doing_anything(tmp_path, arch):
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(CI / "real-vm.sh"), "--arch", arch, "--", "true"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "VFIO_CI_WORK": str(work), "VFIO_CI_ACCEL": "kvm"},
                       timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"real-vm: VFIO_CI_ACCEL=kvm: the {arch} guest runs under TCG (auto or tcg)\n"
    assert not work.exists()


# --- a kernel's modules ---------------------------------------------------------------------

def moddir(work: Path, root: Path) -> str:
    r = bash(f'find_moddir {shlex.quote(str(root))} && echo "$moddir" || echo "no: $moddir_why"', work)
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip("\n")


@pytest.mark.parametrize("layout", ["lib/modules", "usr/lib/modules"])  # bookworm's packages, trixie's
def test_the_module_directory_of_an_unpacked_package(tmp_path, layout):
    (tmp_path / "tree" / layout / "6.12.117+deb13-amd64" / "kernel").mkdir(parents=True)
    (tmp_path / "tree" / "boot").mkdir()
    assert moddir(tmp_path, tmp_path / "tree") == f"{tmp_path}/tree/{layout}/6.12.117+deb13-amd64"


def test_lib_modules_is_taken_once_where_lib_is_usr_lib(tmp_path):
    (tmp_path / "root" / "usr" / "lib" / "modules" / "6.99.0").mkdir(parents=True)
    (tmp_path / "root" / "lib").symlink_to("usr/lib")
    assert moddir(tmp_path, tmp_path / "root") == f"{tmp_path}/root/lib/modules/6.99.0"


def test_a_module_directory_itself_or_a_build_tree_is_taken_as_given(tmp_path):
    (tmp_path / "6.99.0").mkdir()
    (tmp_path / "6.99.0" / "modules.builtin").write_text("")
    (tmp_path / "linux").mkdir()
    (tmp_path / "linux" / "modules.order").write_text("")
    assert moddir(tmp_path, tmp_path / "6.99.0") == f"{tmp_path}/6.99.0"
    assert moddir(tmp_path, tmp_path / "linux") == f"{tmp_path}/linux"


def test_no_modules_or_those_of_several_kernels_is_said(tmp_path):
    (tmp_path / "empty").mkdir()
    assert moddir(tmp_path, tmp_path / "empty") == (
        f"no: no lib/modules/RELEASE, usr/lib/modules/RELEASE or modules.builtin in {tmp_path}/empty")
    for release in ["6.1.0-57-amd64", "6.12.118+deb12-amd64"]:
        (tmp_path / "two" / "lib" / "modules" / release).mkdir(parents=True)
    assert moddir(tmp_path, tmp_path / "two") == (
        f"no: modules of several kernels in {tmp_path}/two (6.1.0-57-amd64 6.12.118+deb12-amd64); "
        f"name one: {tmp_path}/two/.../RELEASE")


# modinfo, faked: a module file's text is its "depends=" line.
FAKE_MODINFO = 'modinfo() { sed -n "s/^depends=//p" "$3"; }\n'
WANTED = "vfio vfio_iommu_type1 vfio-pci virtio_pci 9pnet_virtio 9p"
# Linux 6.12's, by file: what each depends on (virtio_pci and the virtio core are built in).
MODULES_612 = {
    "kernel/drivers/vfio/vfio.ko.xz": "",
    "kernel/drivers/vfio/vfio_iommu_type1.ko.xz": "vfio",
    "kernel/virt/lib/irqbypass.ko.xz": "",
    "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz": "vfio,irqbypass",
    "kernel/drivers/vfio/pci/vfio-pci.ko.xz": "vfio-pci-core,vfio",
    "kernel/fs/netfs/netfs.ko.xz": "",
    "kernel/net/9p/9pnet.ko.xz": "",
    "kernel/net/9p/9pnet_virtio.ko.xz": "9pnet,virtio_ring",
    "kernel/fs/9p/9p.ko.xz": "9pnet,netfs",
}
BUILTIN_612 = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio_pci.ko\n"
ORDER_612 = "vfio vfio_iommu_type1 irqbypass vfio_pci_core vfio_pci 9pnet 9pnet_virtio netfs 9p".split()


def module_tree(root: Path, modules: dict[str, str], builtin: str | None, pack=lambda text: text.encode()) -> Path:
    for path, deps in modules.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(pack(f"depends={deps}\n"))
    if builtin is not None:
        (root / "modules.builtin").write_text(builtin)
    return root


def test_module_order_puts_dependencies_first_and_leaves_out_built_in_modules(tmp_path):
    mods = module_tree(tmp_path / "6.12", MODULES_612, BUILTIN_612)
    r = bash(FAKE_MODINFO + f"module_order {shlex.quote(str(mods))} {WANTED}", tmp_path)
    assert r.returncode == 0, r.stderr
    got = [line.split(" ", 1) for line in r.stdout.splitlines()]
    assert [name for name, _ in got] == ORDER_612
    assert dict(got)["vfio_pci"] == f"{mods}/kernel/drivers/vfio/pci/vfio-pci.ko.xz"


# Linux 6.1 on arm64, by file: Debian's modules (vfio without no-IOMMU mode, no vfio-platform), and
# those our build makes (ci/vm/arm64.sh), which vfio_virqfd is one of.
MODULES_61_ARM64 = {
    "kernel/drivers/vfio/vfio.ko": "",
    "kernel/drivers/vfio/vfio_virqfd.ko": "",
    "kernel/drivers/vfio/vfio_iommu_type1.ko": "vfio",
    "kernel/drivers/virtio/virtio_mmio.ko": "",
    "kernel/net/9p/9pnet.ko": "",
    "kernel/net/9p/9pnet_virtio.ko": "9pnet",
    "kernel/fs/9p/9p.ko": "9pnet",
}
OWN_61_ARM64 = {
    "vfio.ko": "",
    "vfio_virqfd.ko": "",
    "vfio-platform-base.ko": "vfio,vfio_virqfd",
    "vfio-platform.ko": "vfio-platform-base,vfio",
    "vfio-amba.ko": "vfio-platform-base,vfio",
}
WANTED_ARM64 = "vfio vfio_iommu_type1 vfio-platform vfio-amba virtio_mmio 9pnet_virtio 9p"


def test_our_own_modules_are_taken_instead_of_the_kernels_of_the_same_name(tmp_path):
    mods = module_tree(tmp_path / "6.1", MODULES_61_ARM64, "")
    own = module_tree(tmp_path / "own", OWN_61_ARM64, None)
    r = bash(FAKE_MODINFO + f"module_order --own {own} {mods} {WANTED_ARM64}", tmp_path)
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert list(got) == ["vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio_platform_base", "vfio_platform",
                         "vfio_amba", "virtio_mmio", "9pnet", "9pnet_virtio", "9p"]
    assert got["vfio"] == f"{own}/vfio.ko" and got["vfio_virqfd"] == f"{own}/vfio_virqfd.ko"
    assert got["vfio_iommu_type1"] == f"{mods}/kernel/drivers/vfio/vfio_iommu_type1.ko"


def test_a_module_neither_there_nor_built_in_fails_naming_it(tmp_path):
    mods = module_tree(tmp_path / "6.12", MODULES_612, None)  # no modules.builtin
    r = bash(FAKE_MODINFO + f"module_order {shlex.quote(str(mods))} {WANTED}", tmp_path)
    assert r.returncode == 1
    assert r.stderr == f"module virtio_pci is neither under {mods} nor in its modules.builtin\n"


def cpio_member(archive: Path, name: str) -> str:
    return subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", name], stdin=archive.open("rb"),
                          capture_output=True, check=True).stdout.decode()


@pytest.fixture
def initramfs_tools(tmp_path, debian_package) -> Path:
    """What build-initramfs.sh needs, and a modinfo that reads our fake modules (xz or plain text)."""
    for package, provides in (("busybox-static", "/bin/busybox"), ("cpio", "cpio"), ("xz-utils", "xz")):
        debian_package(package, provides)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "modinfo").write_text('#!/bin/sh\n{ xz -dc "$3" 2>/dev/null || cat "$3"; } | sed -n "s/^depends=//p"\n')
    (fake / "modinfo").chmod(0o755)
    return fake


def build_initramfs(fake: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CI / "vm" / "build-initramfs.sh"), *args], capture_output=True, text=True,
                          env={"PATH": f"{fake}:/usr/bin:/bin:/usr/sbin:/sbin"}, timeout=60)


def test_build_initramfs_loads_the_modules_that_are_not_built_in_decompressed(tmp_path, initramfs_tools):
    mods = module_tree(tmp_path / "6.12", MODULES_612, BUILTIN_612, pack=lambda text: lzma.compress(text.encode()))
    out = tmp_path / "initrd.cpio"
    r = build_initramfs(initramfs_tools, str(mods), str(out), *WANTED.split())
    assert r.returncode == 0, r.stderr
    assert r.stderr.endswith(f"modules: {' '.join(ORDER_612)})\n")
    assert cpio_member(out, "lib/modules/load-order").split() == ORDER_612
    assert cpio_member(out, "lib/modules/vfio_pci.ko") == "depends=vfio-pci-core,vfio\n"


def test_build_initramfs_takes_our_modules_their_parameters_and_another_busybox(tmp_path, initramfs_tools):
    mods = module_tree(tmp_path / "6.1", MODULES_61_ARM64, "")
    own = module_tree(tmp_path / "own", OWN_61_ARM64, None)
    busybox = tmp_path / "arm64" / "busybox"
    busybox.parent.mkdir()
    busybox.write_bytes(b"an arm64 busybox")
    busybox.chmod(0o755)
    out = tmp_path / "initrd.cpio"
    wanted = ["vfio enable_unsafe_noiommu_mode=1", "vfio_iommu_type1", "vfio-platform reset_required=0",
              "vfio-amba", "virtio_mmio", "9pnet_virtio", "9p"]
    r = build_initramfs(initramfs_tools, "--busybox", str(busybox), "--own", str(own), str(mods), str(out), *wanted)
    assert r.returncode == 0, r.stderr
    assert cpio_member(out, "lib/modules/load-order").splitlines() == [
        "vfio enable_unsafe_noiommu_mode=1", "vfio_iommu_type1", "vfio_virqfd", "vfio_platform_base",
        "vfio_platform reset_required=0", "vfio_amba", "virtio_mmio", "9pnet", "9pnet_virtio", "9p"]
    assert cpio_member(out, "lib/modules/vfio_amba.ko") == "depends=vfio-platform-base,vfio\n"  # ours
    assert cpio_member(out, "bin/busybox") == "an arm64 busybox"


# --- the vmlinux inside a bzImage -------------------------------------------------------------

@pytest.fixture
def unpackers(debian_package):
    """What ci/real-vm.sh unpacks a kernel with, brought in as the script itself installs them."""
    for package, provides in (("binutils", "readelf"), ("xz-utils", "xz"), ("zstd", "zstd")):
        debian_package(package, provides)


@pytest.mark.parametrize("fmt", ["gzip", "xz", "zstd", "lz4"])
def test_the_payload_is_found_by_the_boot_header_and_named_by_its_magic(tmp_path, unpackers, fmt):
    payload = compress(VMLINUX, fmt)
    (tmp_path / "bzImage").write_bytes(bzimage(payload))
    r = bash("bzimage_payload bzImage", tmp_path)
    name = "other:02214c180000" if fmt == "lz4" else fmt
    assert r.stdout == f"{1024 + 16} {len(payload)} {name}\n"


@pytest.mark.parametrize("fmt", ["gzip", "xz", "zstd"])
def test_vmlinux_is_cut_out_of_each_payload_without_a_word_from_the_decompressor(tmp_path, unpackers, fmt):
    (tmp_path / "bzImage").write_bytes(bzimage(compress(VMLINUX, fmt)))
    r = bash('vmlinux_from_bzimage bzImage vmlinux || echo "failed: $extract_why"', tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")  # zstd said "unsupported format" of the size
    assert (tmp_path / "vmlinux").read_bytes() == VMLINUX


@pytest.mark.parametrize("payload, why", [
    (lambda: compress(VMLINUX, "lz4"), "its payload is not gzip, xz or zstd (02214c180000)"),
    (lambda: compress(elf([(b"Xen", 6, b"linux\0")]), "zstd"), "its vmlinux has no PVH entry (CONFIG_PVH)"),
    (lambda: compress(b"not an ELF" * 10, "gzip"), "its gzip payload is not an ELF vmlinux"),
    (lambda: compress(VMLINUX, "xz")[:-40] + bytes(4), "its xz payload does not decompress: xz: "),  # and xz's
], ids=["lz4", "no PVH entry", "not an ELF", "truncated xz"])
def test_a_bzimage_whose_vmlinux_cannot_boot_directly_says_why(tmp_path, unpackers, payload, why):
    (tmp_path / "bzImage").write_bytes(bzimage(payload()))
    r = bash('vmlinux_from_bzimage bzImage vmlinux || echo "failed: $extract_why"', tmp_path)
    assert r.stdout.startswith(f"failed: {why}") and len(r.stdout.splitlines()) == 1
    assert not (tmp_path / "vmlinux").exists()


def test_kernel_release_from_the_bzimage_header_or_the_vmlinux_banner(tmp_path, unpackers):
    (tmp_path / "bzImage").write_bytes(bzimage(compress(VMLINUX, "zstd"), release="6.12.118+deb12-amd64"))
    (tmp_path / "vmlinux").write_bytes(VMLINUX)
    (tmp_path / "bare").write_bytes(elf([PVH_NOTE]))
    r = bash("for f in bzImage vmlinux bare; do kernel_release_of $f; done", tmp_path)
    assert r.stdout.split() == ["6.12.118+deb12-amd64", "6.99.0-test", "unknown"]


# --- the guest kernel command line --------------------------------------------------------

def test_cmdline_has_no_timer_check_and_the_base_arguments(tmp_path):
    words = bash("guest_cmdline", tmp_path, env={}).stdout.split()
    for w in ["console=ttyS0", "intel_iommu=on", "iommu=pt", "panic=-1", "no_timer_check", "quiet"]:
        assert w in words


def test_cmdline_appends_vfio_ci_append_last(tmp_path):
    line = bash("guest_cmdline", tmp_path, env={"VFIO_CI_APPEND": "loglevel=7 foo=1"}).stdout
    assert line.endswith("no_timer_check quiet loglevel=7 foo=1\n")
    assert bash("guest_cmdline", tmp_path, env={}).stdout.endswith("quiet\n")


def test_the_arm64_cmdline_keeps_the_pl061_gpio_driver_off_and_appends_vfio_ci_append_last(tmp_path):
    line = bash("guest_cmdline arm64", tmp_path, env={"VFIO_CI_APPEND": "loglevel=7"}).stdout
    assert line == "console=ttyAMA0 panic=-1 quiet initcall_blacklist=pl061_gpio_driver_init loglevel=7\n"


def test_the_s390x_cmdline_has_the_sclp_console_and_appends_vfio_ci_append_last(tmp_path):
    line = bash("guest_cmdline s390x", tmp_path, env={"VFIO_CI_APPEND": "loglevel=7"}).stdout
    assert line == "console=ttysclp0 panic=-1 quiet loglevel=7\n"


def test_an_arm64_image_is_told_by_its_magic(tmp_path):
    image = bytearray(0x40)
    image[0x38:0x3c] = b"ARMd"
    (tmp_path / "Image").write_bytes(bytes(image))
    (tmp_path / "bzImage").write_bytes(bzimage(compress(VMLINUX, "gzip")))
    r = bash("for f in Image bzImage; do arm64_image $f && echo yes || echo no; done", tmp_path)
    assert r.stdout.split() == ["yes", "no"]


@pytest.mark.parametrize("accel, args", [
    ("kvm", "-machine q35,accel=kvm,kernel-irqchip=split -cpu host"),
    ("tcg", "-machine q35,accel=tcg -cpu max"),
])
def test_accel_args(tmp_path, accel, args):
    assert bash(f'qemu_accel_args {accel}; echo "${{accel_args[*]}}"', tmp_path).stdout == args + "\n"


# --- choosing the accelerator --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["kvm", "tcg"])
def test_a_forced_accelerator_is_taken_without_probing_even_when_kvm_failed_before(tmp_path, mode):
    choose(tmp_path)  # the probe fails and is remembered
    assert choose(tmp_path, mode) == (mode, f"VFIO_CI_ACCEL={mode}")
    assert len(probe_calls(tmp_path)) == 1


def test_auto_without_dev_kvm_is_tcg_without_probing(tmp_path):
    assert choose(tmp_path, kvm_dev="no") == ("tcg", "no usable /dev/kvm")
    assert probe_calls(tmp_path) == [] and memos(tmp_path) == []


def test_auto_takes_kvm_when_the_probe_guest_runs_and_remembers_nothing(tmp_path):
    accel, why = choose(tmp_path, probe="pass")
    assert accel == "kvm" and "probe guest ran under KVM" in why
    assert probe_calls(tmp_path) == ["kvm /fake/kvm-probe.elf"]
    assert memos(tmp_path) == []
    choose(tmp_path, probe="pass")
    assert len(probe_calls(tmp_path)) == 2  # a success is checked again every run


def test_a_failed_probe_is_remembered_and_later_runs_go_straight_to_tcg(tmp_path):
    accel, why = choose(tmp_path)
    [memo] = memos(tmp_path)
    assert accel == "tcg"
    assert "probe guest" in why and "KVM internal error" in why and str(memo) in why
    assert "VFIO_CI_ACCEL=kvm" in why
    text = memo.read_text()
    assert text.startswith("reason: probe guest: KVM internal error. Suberror: 1\n")
    for fact in ["kernel: 6.1.0-test", "qemu: QEMU emulator version 7.2.0", "cpu: Test CPU"]:
        assert fact + "\n" in text

    accel, why = choose(tmp_path, probe="pass")  # a probe now would pass, but none runs
    assert accel == "tcg" and why.startswith("KVM failed here before: probe guest: KVM internal error")
    assert str(memo) in why and "VFIO_CI_ACCEL=kvm to force" in why
    assert len(probe_calls(tmp_path)) == 1


@pytest.mark.parametrize("fact", ["kernel", "qemu", "cpu"])
def test_the_memo_is_per_kernel_qemu_and_cpu(tmp_path, fact):
    choose(tmp_path)
    changed = {fact: "something else"}
    assert choose(tmp_path, **changed)[0] == "tcg"
    assert len(probe_calls(tmp_path)) == 2  # probed again: a new key
    assert len(memos(tmp_path)) == 2
    assert choose(tmp_path, probe="pass", **changed)[0] == "tcg"  # and remembered under it
    assert choose(tmp_path, probe="pass")[0] == "tcg"  # the first key's memo still holds
    assert len(probe_calls(tmp_path)) == 2


def test_a_real_guest_failure_is_remembered(tmp_path):
    r = bash(FAKE_HOST + 'remember_kvm_failure "a real guest: KVM internal error. Suberror: 1"', tmp_path)
    assert r.returncode == 0, r.stderr
    accel, why = choose(tmp_path, probe="pass")
    assert accel == "tcg" and why.startswith("KVM failed here before: a real guest: KVM internal error")
    assert probe_calls(tmp_path) == []


def test_a_probe_that_cannot_be_built_is_not_remembered(tmp_path):
    r = bash(FAKE_HOST + 'probe_image() { return 1; }\nchoose_accel auto\necho "$accel: $accel_why"',
             tmp_path)
    assert r.stdout.startswith("tcg: could not build the KVM probe guest")
    assert probe_calls(tmp_path) == [] and memos(tmp_path) == []


def test_an_unknown_mode_is_refused(tmp_path):
    assert bash(FAKE_HOST + "choose_accel sometimes", tmp_path).returncode == 1


def test_host_facts_are_kernel_release_qemu_version_and_cpu_model(tmp_path):
    fake_qemu = 'qemu-system-x86_64() { printf "QEMU emulator version 9.9.9\\nCopyright\\n"; }\n'
    lines = bash(fake_qemu + "kvm_host_facts", tmp_path).stdout.splitlines()
    release = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    assert lines == [f"kernel: {release}", "qemu: QEMU emulator version 9.9.9", f"cpu: {model}"]


# --- the probe guest, with QEMU faked ------------------------------------------------------

def test_probe_guest_passes_on_the_debug_exit_status_and_boots_like_the_real_guest(tmp_path):
    fake_qemu = 'qemu-system-x86_64() { echo "$*" > "$work/qemu-args"; return 85; }\n'
    r = bash(fake_qemu + "probe_guest kvm /x/probe.elf", tmp_path)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "qemu-args").read_text()
    assert "-machine q35,accel=kvm,kernel-irqchip=split -cpu host" in args
    assert "-device isa-debug-exit,iobase=0xf4,iosize=4 -kernel /x/probe.elf" in args


def test_probe_guest_fails_on_any_other_end_and_says_why(tmp_path):
    fake_qemu = 'qemu-system-x86_64() { echo "qemu: failed to set MSR 0x10a" >&2; return 1; }\n'
    r = bash(fake_qemu + 'probe_guest kvm /x/probe.elf || echo "failed: $probe_why"', tmp_path)
    assert r.stdout == "failed: qemu: failed to set MSR 0x10a\n"
    assert list(tmp_path.glob("kvm-probe.*")) == []  # its output file is gone


def test_probe_guest_stops_at_a_kvm_internal_error_without_waiting_for_the_timeout(tmp_path):
    # KVM's emulation failure pauses the VM; QEMU stays up until killed.
    fake_qemu = 'qemu-system-x86_64() { echo "KVM internal error. Suberror: 1" >&2; exec sleep 60; }\n'
    t0 = time.monotonic()
    r = bash(fake_qemu + 'probe_guest kvm /x/probe.elf || echo "failed: $probe_why"', tmp_path)
    assert r.stdout == "failed: KVM internal error. Suberror: 1\n" and r.stderr == ""
    assert time.monotonic() - t0 < 5


def test_the_real_probe_guest_reaches_its_end_under_tcg(tmp_path, debian_package):
    for package, provides in (("qemu-system-x86", "qemu-system-x86_64"), ("binutils", "as")):
        debian_package(package, provides)
    r = bash('elf=$(probe_image)\necho "$elf"\nprobe_guest tcg "$elf" || echo "failed: $probe_why"',
             tmp_path)
    assert r.returncode == 0, r.stderr
    elf = Path(r.stdout.splitlines()[0])
    assert r.stdout == f"{elf}\n" and elf.parent == tmp_path and elf.is_file()
    assert b"\xf0\x48\x0f\xc7" in elf.read_bytes()  # lock cmpxchg16b
    assert bash("probe_image", tmp_path).stdout == f"{elf}\n"  # cached


# --- the s390x guest's kernel config ----------------------------------------------------------

FRAGMENT = ("# a comment naming CONFIG_FOO\nCONFIG_VFIO=y\nCONFIG_LOCALVERSION=\"-s390x\"\n\n"
            "# CONFIG_KVM is not set\nCONFIG_VFIO_CCW=y\n")


def lost(tmp_path: Path, config: str, *fragments: str) -> tuple[int, str]:
    names = []
    for i, text in enumerate(fragments or [FRAGMENT]):
        (tmp_path / f"fragment{i}").write_text(text)
        names.append(f"fragment{i}")
    (tmp_path / ".config").write_text(config)
    r = bash(f"config_lost .config {' '.join(names)}", tmp_path)
    return r.returncode, r.stdout


def test_config_lost_is_nothing_when_every_option_line_resolved_as_asked(tmp_path):
    config = ("#\n# Automatically generated file\n#\nCONFIG_LOCALVERSION=\"-s390x\"\nCONFIG_VFIO=y\n"
              "# CONFIG_KVM is not set\nCONFIG_VFIO_CCW=y\nCONFIG_VFIO_MDEV=y\n")
    assert lost(tmp_path, config) == (0, "")


def test_config_lost_names_each_option_dropped_or_selected_anyway(tmp_path):
    # VFIO_CCW dropped (its dependency off: not even a "not set" line), KVM on though asked off.
    config = "CONFIG_LOCALVERSION=\"-s390x\"\nCONFIG_VFIO=y\nCONFIG_KVM=y\n"
    assert lost(tmp_path, config) == (1, "# CONFIG_KVM is not set\nCONFIG_VFIO_CCW=y\n")
    assert lost(tmp_path, "CONFIG_VFIO=m\n", "CONFIG_VFIO=y\n") == (1, "CONFIG_VFIO=y\n")


def test_config_lost_reads_every_fragment_given(tmp_path):
    # 6.12 has no S390_CCW_IOMMU: the 6.1 fragment's line is lost there.
    config = "CONFIG_VFIO=y\nCONFIG_VFIO_CCW=y\n"
    assert lost(tmp_path, config, "CONFIG_VFIO=y\n", "CONFIG_VFIO_CCW=y\n") == (0, "")
    assert lost(tmp_path, config, "CONFIG_VFIO=y\n", "CONFIG_S390_CCW_IOMMU=y\n") == (1, "CONFIG_S390_CCW_IOMMU=y\n")


@pytest.mark.parametrize("track, extra", [("6.1", ["S390_CCW_IOMMU"]), ("6.12", [])])
def test_the_s390x_fragments_ask_for_vfio_ccw_and_all_it_boots_with_built_in(tmp_path, track, extra):
    files = [CI / "vm" / "s390x.config", CI / "vm" / f"s390x-{track}.config"]
    lines = [line for f in files if f.exists() for line in f.read_text().splitlines()]
    options = [line for line in lines if line and not line.startswith("# ") or line.endswith(" is not set")]
    assert all(re.fullmatch(r"CONFIG_\w+=\S+|# CONFIG_\w+ is not set", o) for o in options), options
    for name in ["VFIO", "VFIO_MDEV", "VFIO_CCW", "S390_GUEST", "VIRTIO_BLK", "NET_9P_VIRTIO", "9P_FS",
                 "SCLP_VT220_CONSOLE", "BLK_DEV_INITRD", "DEVTMPFS", "TMPFS", *extra]:
        assert f"CONFIG_{name}=y" in options
    assert not any(o.endswith("=m") for o in options)


# --- the foreign guests' packages ----------------------------------------------------------------

def test_the_private_apt_state_lives_under_its_directory_with_arm64_native(tmp_path):
    r = bash('private_apt_opts /state arm64 amd64\nprintf "%s\\n" "${apt_opts[@]}"', tmp_path)
    opts = r.stdout.splitlines()
    values = [o for o in opts if o != "-o"]
    assert len(opts) == 2 * len(values)
    dirs = {k: v for k, v in (o.split("=", 1) for o in values) if k.startswith("Dir::") and "pkgcache" not in k}
    assert dirs == {"Dir::Etc::SourceList": "/state/sources.list", "Dir::Etc::SourceParts": "/state/sources.list.d",
                    "Dir::State::Lists": "/state/lists", "Dir::State::status": "/state/status",
                    "Dir::Cache": "/state/cache"}
    assert values.index("APT::Architecture=arm64") < values.index("APT::Architectures::=arm64")
    assert "APT::Architectures::=amd64" in values


def test_the_private_apt_state_takes_the_architectures_it_is_given(tmp_path):
    r = bash('private_apt_opts /state s390x\nprintf "%s\\n" "${apt_opts[@]}"', tmp_path)
    archs = [o for o in r.stdout.splitlines() if o.startswith("APT::Architecture")]
    assert archs == ["APT::Architecture=s390x", "APT::Architectures::=s390x"]


def test_apt_memo_remembers_an_answer_until_the_lists_change(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_dists_bookworm_main_binary-arm64_Packages.lz4").write_text("one")
    script = 'ask() { echo asked >> "$work/calls"; echo "answer $1"; }\napt_memo lists q ask 1'
    assert [bash(script, tmp_path).stdout for _ in range(2)] == ["answer 1\n"] * 2
    assert (tmp_path / "calls").read_text() == "asked\n"
    time.sleep(1.1)  # the stamp has whole seconds
    (lists / "deb.debian.org_dists_bookworm_main_binary-arm64_Packages.lz4").write_text("two!")
    assert bash(script, tmp_path).stdout == "answer 1\n"
    assert (tmp_path / "calls").read_text() == "asked\n" * 2
    assert bash(script.replace("ask 1", "false"), tmp_path).returncode == 0  # still remembered
    r = bash("apt_memo lists other false", tmp_path)
    assert r.returncode == 1 and not (tmp_path / "lookup" / "other").exists()


def test_simulated_installs_are_package_and_version(tmp_path):
    sim = ("NOTE: This is only a simulation!\n"
           "Inst libc6 (2.36-9+deb12u14 Debian:12.13/stable, Debian-Security:12/stable-security [arm64])\n"
           "Inst python3.11 (3.11.2-6+deb12u9 Debian-Security:12/stable-security [arm64])\n"
           "Conf libc6 (2.36-9+deb12u14 Debian:12.13/stable [arm64])\n")
    assert bash("simulated_installs", tmp_path, stdin=sim).stdout == (
        "libc6=2.36-9+deb12u14\npython3.11=3.11.2-6+deb12u9\n")


def test_dep_names_takes_each_first_alternative(tmp_path):
    depends = ("linux-base (>= 4.12~), linux-headers-6.12.118+deb12-common (= 6.12.118-1~deb12u1), "
               "linux-image-6.12.118+deb12-arm64 (= 6.12.118-1~deb12u1) | linux-image-6.12.118+deb12-arm64-unsigned "
               "(= 6.12.118-1~deb12u1), linux-kbuild-6.12.118+deb12, gcc-12")
    assert bash("dep_names", tmp_path, stdin=depends).stdout.split() == [
        "linux-base", "linux-headers-6.12.118+deb12-common", "linux-image-6.12.118+deb12-arm64",
        "linux-kbuild-6.12.118+deb12", "gcc-12"]


def test_wheel_platforms_are_every_manylinux_the_glibc_runs(tmp_path):
    got = bash("wheel_platforms 2.36 aarch64", tmp_path).stdout.split()
    assert got[0] == "manylinux_2_36_aarch64" and got[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert len(got) == 36 - 17 + 2


def guest_wheels(tmp_path: Path, pyproject: str, machine: str = "aarch64") -> list[str]:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    r = subprocess.run([sys.executable, str(CI / "vm" / "guest_wheels.py"), str(tmp_path / "pyproject.toml"),
                        "3.11.2", machine], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_guest_wheels_pins_what_this_host_has_with_what_it_depends_on(tmp_path):
    got = guest_wheels(tmp_path, '[project]\nname = "x"\ndependencies = ["cffi>=1.15"]\n'
                                 '[project.optional-dependencies]\ntest = ["pytest>=7.4"]\n')
    pinned = {line.split("==")[0]: line.split("==")[1] for line in got}
    for name in ["cffi", "pycparser", "pytest", "pluggy", "iniconfig", "packaging"]:
        assert pinned[name] == metadata.version(name)


def test_guest_wheels_follows_the_guests_markers_and_leaves_the_unknown_to_pip(tmp_path):
    got = guest_wheels(tmp_path, '[project]\nname = "x"\ndependencies = ['
                                 '"colorama; sys_platform == \'win32\'", "tomli; python_version < \'3.11\'",'
                                 '"no-such-dist-here>=1.0; platform_machine == \'aarch64\'",'
                                 '"iniconfig; platform_machine == \'x86_64\'"]\n')
    assert got == ["no-such-dist-here>=1.0"]


def test_guest_wheels_evaluates_the_machine_it_is_given(tmp_path):
    pyproject = ('[project]\nname = "x"\ndependencies = ["a-dist-here>=1; platform_machine == \'s390x\'",'
                 '"another-dist>=2; platform_machine == \'aarch64\'"]\n')
    assert guest_wheels(tmp_path, pyproject, "s390x") == ["a-dist-here>=1"]
    assert guest_wheels(tmp_path, pyproject, "aarch64") == ["another-dist>=2"]


# --- one boot's console ---------------------------------------------------------------------

IOAPIC_PANIC = ("[    2.100000] Kernel panic - not syncing: "
                "timer doesn't work through Interrupt-remapped IO-APIC\n")
INIT_LINES = "[real-vm] 0000:00:03.0 0x1234:0x11e8 -> vfio-pci, group 1\n"
RUNNING = "[real-vm] running command (devices: 0000:00:03.0)\n"


@pytest.mark.parametrize("console, panic", [
    ("[    0.5] booting\n" + IOAPIC_PANIC, IOAPIC_PANIC),
    (INIT_LINES + IOAPIC_PANIC + RUNNING, IOAPIC_PANIC),
    (INIT_LINES + RUNNING + IOAPIC_PANIC, None),  # the command had started: no retry
    (INIT_LINES + RUNNING + "[real-vm] command exited with status 0\n", None),
    ("", None),
])
def test_panic_before_command(tmp_path, console, panic):
    r = bash("panic_before_command", tmp_path, stdin=console)
    assert (r.returncode == 0) == (panic is not None)
    assert r.stdout == (panic or "")


@pytest.mark.parametrize("console, phase", [
    ("", "booting the kernel"),
    ("qemu-system-x86_64: warning: nic e1000e.0 has no peer\n", "booting the kernel"),
    (INIT_LINES, "setting up the devices"),
    (INIT_LINES + RUNNING + "collected 300 items\n", "running the command"),
])
def test_boot_phase(tmp_path, console, phase):
    assert bash("boot_phase", tmp_path, stdin=console).stdout == phase + "\n"
