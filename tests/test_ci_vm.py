"""ci/vm/lib.sh, the host-side logic of ci/real-vm.sh, called with fake inputs: the guest kernel
command line, the auto-mode choice of accelerator and its memo, and reading a boot's console.
No VM boots; one test runs the tiny KVM probe guest under TCG when QEMU and binutils are here."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "ci" / "vm" / "lib.sh"

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
    """Runs SCRIPT in bash -euo pipefail with lib.sh sourced and work=WORK."""
    full = f"set -euo pipefail\nwork={shlex.quote(str(work))}\n. {shlex.quote(str(LIB))}\n{script}"
    return subprocess.run(["bash", "-c", full], capture_output=True, text=True, input=stdin,
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


# --- the guest kernel command line --------------------------------------------------------

def test_cmdline_has_no_timer_check_and_the_base_arguments(tmp_path):
    words = bash("guest_cmdline", tmp_path, env={}).stdout.split()
    for w in ["console=ttyS0", "intel_iommu=on", "iommu=pt", "panic=-1", "no_timer_check", "quiet"]:
        assert w in words


def test_cmdline_appends_vfio_ci_append_last(tmp_path):
    line = bash("guest_cmdline", tmp_path, env={"VFIO_CI_APPEND": "loglevel=7 foo=1"}).stdout
    assert line.endswith("no_timer_check quiet loglevel=7 foo=1\n")
    assert bash("guest_cmdline", tmp_path, env={}).stdout.endswith("quiet\n")


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


@pytest.mark.skipif(not all(map(shutil.which, ["qemu-system-x86_64", "as", "ld"])),
                    reason="needs qemu-system-x86 and binutils (ci/real-vm.sh installs them)")
def test_the_real_probe_guest_reaches_its_end_under_tcg(tmp_path):
    r = bash('elf=$(probe_image)\necho "$elf"\nprobe_guest tcg "$elf" || echo "failed: $probe_why"',
             tmp_path)
    assert r.returncode == 0, r.stderr
    elf = Path(r.stdout.splitlines()[0])
    assert r.stdout == f"{elf}\n" and elf.parent == tmp_path and elf.is_file()
    assert b"\xf0\x48\x0f\xc7" in elf.read_bytes()  # lock cmpxchg16b
    assert bash("probe_image", tmp_path).stdout == f"{elf}\n"  # cached


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
