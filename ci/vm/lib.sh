# shellcheck shell=bash
# Host-side helpers of ci/real-vm.sh, sourced by it and by tests/test_ci_vm.py (which
# calls them with fake inputs): the guest kernel command line, QEMU's accelerator
# options, the auto-mode choice of accelerator, and reading one boot's console.
# Reads $work, the cache directory (VFIO_CI_WORK); sets accel, accel_why,
# accel_args and probe_why for the caller.
# shellcheck disable=SC2034,SC2054,SC2154  # outputs and inputs as said; QEMU options have commas

vm_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# Serial console; the IOMMU with interrupt remapping; a panic ends QEMU, which runs
# with -no-reboot. no_timer_check: under TCG on a loaded host the kernel's check of
# the IO-APIC timer can fail and panic ("timer doesn't work through
# Interrupt-remapped IO-APIC").
guest_cmdline() {
    echo "console=ttyS0 intel_iommu=on iommu=pt panic=-1 no_timer_check quiet${VFIO_CI_APPEND:+ $VFIO_CI_APPEND}"
}

qemu_accel_args() { # qemu_accel_args kvm|tcg: sets the array accel_args (-machine, -cpu)
    case $1 in
        kvm) accel_args=(-machine q35,accel=kvm,kernel-irqchip=split -cpu host) ;;
        tcg) accel_args=(-machine q35,accel=tcg -cpu max) ;;
    esac
}

now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }
secs_since() { # secs_since T0 (from now_us): seconds, one decimal
    local d=$(( $(now_us) - $1 ))
    echo "$((d / 1000000)).$((d / 100000 % 10))"
}

# --- the accelerator -----------------------------------------------------------
# QEMU starting a "-cpu host" KVM VM does not mean a real guest runs: on some hosts
# the guest kernel dies on its first `lock cmpxchg16b` with a KVM emulation
# failure, a minute into the boot. The probe guest (kvm-probe.S) runs that
# instruction within seconds. A failure, the probe's or a real guest's, is
# remembered for this host (kernel release, QEMU version, CPU model), so later runs
# go straight to TCG until one of those changes.

kvm_usable() { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }

kvm_host_facts() { # what KVM's behaviour here depends on, one "name: value" a line
    echo "kernel: $(uname -r)"
    echo "qemu: $(qemu-system-x86_64 --version | sed -n 1p)"
    echo "cpu: $(sed -n '/^model name/{s/^[^:]*: *//p;q}' /proc/cpuinfo)"
}

kvm_memo() { # the file that remembers KVM failing on this host
    echo "$work/accel/kvm-failed-$(kvm_host_facts | sha256sum | cut -c1-16)"
}

remember_kvm_failure() { # remember_kvm_failure REASON
    local memo
    memo=$(kvm_memo)
    mkdir -p "${memo%/*}"
    { echo "reason: $1"; echo "date: $(date -u +%FT%TZ)"; kvm_host_facts; } > "$memo"
}

probe_image() { # the probe guest's ELF (kvm-probe.S), built on first use, cached by its source's hash
    local src=$vm_dir/kvm-probe.S elf
    elf=$work/kvm-probe-$(sha256sum < "$src" | cut -c1-16).elf
    if [ ! -f "$elf" ]; then
        as --32 -o "$elf.$$.o" "$src" \
            && ld -m elf_i386 -n -Ttext=0x100000 -e _start -o "$elf.$$" "$elf.$$.o" \
            && mv "$elf.$$" "$elf"
        local rc=$?
        rm -f "$elf.$$.o" "$elf.$$"
        [ "$rc" = 0 ] || return 1
    fi
    echo "$elf"
}

# probe_guest kvm|tcg ELF: boot the probe guest with the accelerator's options (the
# real guest's); true if it reached its end, else probe_why says what happened.
probe_guest() {
    local out pid rc=0 t0=$SECONDS
    qemu_accel_args "$1"
    out=$(mktemp "$work/kvm-probe.XXXXXX")
    qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot "${accel_args[@]}" -m 64 \
        -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "$2" < /dev/null > "$out" 2>&1 &
    pid=$!
    # An emulation failure pauses the VM instead of ending QEMU. (stderr: bash's
    # notice of a QEMU that aborted; its own message is in $out.)
    {
        while kill -0 "$pid" && [ $((SECONDS - t0)) -lt 15 ]; do
            grep -q 'KVM internal error' "$out" && break
            sleep 0.05
        done
        kill "$pid" || true
        wait "$pid" || rc=$?
    } 2>/dev/null
    probe_why=$(grep -m1 . "$out") || probe_why="no output, QEMU status $rc after $((SECONDS - t0)) s"
    rm -f "$out"
    [ "$rc" = 85 ] # isa-debug-exit: (42 << 1) | 1
}

# choose_accel MODE (auto|kvm|tcg, VFIO_CI_ACCEL): sets accel (kvm|tcg) and accel_why.
choose_accel() {
    local memo elf
    case $1 in
        kvm|tcg) accel=$1 accel_why="VFIO_CI_ACCEL=$1" ;;
        auto)
            accel=tcg
            if ! kvm_usable; then
                accel_why="no usable /dev/kvm"
                return 0
            fi
            memo=$(kvm_memo)
            if [ -f "$memo" ]; then
                accel_why="KVM failed here before: $(sed -n '1s/^reason: //p' "$memo");"
                accel_why+=" remembered in $memo; delete it to probe again, VFIO_CI_ACCEL=kvm to force"
            elif ! elf=$(probe_image); then
                accel_why="could not build the KVM probe guest $vm_dir/kvm-probe.S (as, ld: binutils)"
            elif probe_guest kvm "$elf"; then
                accel=kvm accel_why="the probe guest ran under KVM"
            else
                remember_kvm_failure "probe guest: $probe_why"
                accel_why="the KVM probe guest failed: $probe_why;"
                accel_why+=" remembered in $memo; VFIO_CI_ACCEL=kvm to force"
            fi ;;
        *) return 1 ;;
    esac
}

# --- one boot's console (on stdin) ---------------------------------------------
boot_phase() { # what the guest is doing, by the milestones ci/vm/init prints
    awk '/\[real-vm\] running command/ {p = 2} /\[real-vm\]/ && !p {p = 1}
         END {print p == 2 ? "running the command" : p == 1 ? "setting up the devices" : "booting the kernel"}'
}

panic_before_command() { # prints the panic line if the kernel panicked before the command started
    awk '/\[real-vm\] running command/ {started = 1}
         /Kernel panic/ && !started && !found {print; found = 1}
         END {exit !found}'
}
