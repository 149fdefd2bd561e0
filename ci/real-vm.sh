#!/bin/bash
# Run a command against real VFIO devices, in a QEMU VM booting a Linux kernel:
#
#   ci/real-vm.sh [--arch amd64|arm64|s390x] [--kernel 6.1|6.12|FILE.deb|IMAGE [--modules DIR]]
#                 [--timeout SECONDS] [--results DIR] [--env NAME=VALUE]... [--] [COMMAND ...]
#
# --arch amd64 (the default, ci/vm/amd64.sh): Debian bookworm's 6.1 or 6.12, or a kernel you
# built, in a q35 VM with a virtual Intel IOMMU; four emulated PCI devices bound to vfio-pci;
# COMMAND runs in a chroot of this machine's root (shared read-only over 9p), so the host's
# Python and this clone run unchanged.
# --arch arm64 (ci/vm/arm64.sh): Debian bookworm's arm64 6.12 (the default) or 6.1 on QEMU's
# virt board under TCG, with vfio (no-IOMMU mode), vfio-platform and vfio-amba built from
# Debian's source; the PL031, the PL061 and a virtio-mmio slot bound to them in no-IOMMU
# groups; COMMAND runs in a chroot of Debian's arm64 Python with the project's dependencies,
# this clone at its path.
# --arch s390x (ci/vm/s390x.sh): a kernel built from Debian's linux-source 6.1 (the default) or
# 6.12 with vfio-ccw on QEMU's s390-ccw-virtio machine under TCG; the virtio-blk-ccw disk's
# subchannel bound to vfio_ccw, an mdev of it made; COMMAND runs as on arm64, in Debian's s390x
# Python.
#
# --kernel: 6.1 or 6.12, fetched with apt; for amd64 also a linux-image .deb, or a bzImage or
# ELF vmlinux, with --modules its lib/modules/RELEASE, an INSTALL_MOD_PATH or its build tree
# (none if vfio-pci, virtio-pci and 9p are built in). Results: --results, default
# results/real-6.1/, results/real-6.12/, results/real-RELEASE/ for a kernel file;
# results/real-arm64-6.12/, results/real-arm64-6.1/, results/real-s390x-6.1/, ...
#
# Exit status: the guest command's. 124 on timeout; 125 when the VM ended without reporting
# a status (see RESULTS/console.log); 2 for a bad argument; 241-250 when the guest's set-up
# failed (RESULTS/exit-reason says how). See ci/README.md.
#
# Environment: VFIO_CI_WORK (cache dir, default ~/.cache/vfio-harness/ci), VFIO_CI_ACCEL
# (auto|kvm|tcg, default auto; arm64 and s390x run under TCG), VFIO_CI_MEM (default 1G), VFIO_CI_APPEND
# (extra guest kernel arguments).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/.." && pwd -P)
# shellcheck source-path=SCRIPTDIR
. "$here/vm/lib.sh"
# Outside the clone, so a fresh clone (as CI makes) finds the kernels and initramfs of the last run.
work=${VFIO_CI_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-harness/ci}
accel_mode=${VFIO_CI_ACCEL:-auto}
mem=${VFIO_CI_MEM:-1G}

say() { echo "real-vm: $*" >&2; }
fail() { say "$*"; exit 1; }
bad_arg() { say "$*"; exit 2; }
usage() { sed -n '4,5p' "${BASH_SOURCE[0]}" | sed 's/^#   //' >&2; exit 2; }

case $accel_mode in
    auto | kvm | tcg) ;;
    *) bad_arg "VFIO_CI_ACCEL must be auto, kvm or tcg, not '$accel_mode'" ;;
esac

arch=amd64
timeout_s=
kernel_arg=
modules_arg=
results=
extra_env=()
while [ $# -gt 0 ]; do
    case $1 in
        --arch) [ $# -ge 2 ] || usage; arch=$2; shift 2 ;;
        --arch=*) arch=${1#*=}; shift ;;
        --kernel) [ $# -ge 2 ] || usage; kernel_arg=$2; shift 2 ;;
        --kernel=*) kernel_arg=${1#*=}; shift ;;
        --modules) [ $# -ge 2 ] || usage; modules_arg=$2; shift 2 ;;
        --modules=*) modules_arg=${1#*=}; shift ;;
        --timeout) [ $# -ge 2 ] || usage; timeout_s=$2; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        --results) [ $# -ge 2 ] || usage; results=$2; shift 2 ;;
        --results=*) results=${1#*=}; shift ;;
        --env) [ $# -ge 2 ] || usage; extra_env+=("$2"); shift 2 ;;
        --env=*) extra_env+=("${1#*=}"); shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) say "unknown option $1"; usage ;;
        *) break ;;
    esac
done
if [ -n "$timeout_s" ]; then
    [[ $timeout_s =~ ^[0-9]+$ ]] && [ "$timeout_s" -gt 0 ] || bad_arg "--timeout wants a positive number of seconds"
fi
for kv in "${extra_env[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || bad_arg "--env wants NAME=VALUE, got '$kv'"
done
kernel_arg=${kernel_arg:-${default_kernel[$arch]:-}}
kernel_spec "$arch" "$kernel_arg" "$modules_arg" || bad_arg "$kernel_error"
# The apt state the guest kernel's packages come from (none: the host's), where its lists are,
# and what refreshes them; the arch may name its own.
apt_opts=()
apt_lists=/var/lib/apt/lists
index_update() { apt_update; }
# The guest's architecture: its packages, devices, kernel, modules, root, peers and QEMU.
# shellcheck source-path=SCRIPTDIR source=vm/amd64.sh
. "$here/vm/$arch.sh"
timeout_s=${timeout_s:-$default_timeout}

# --- 1. host packages -------------------------------------------------------
missing=()
for p in "${arch_packages[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [[ $st == ii* ]] || missing+=("$p")
done
mkdir -p "$work"
apt_log=$work/apt.log
apt_fail() { tail -n 20 "$apt_log" >&2; fail "$1 (full log: $apt_log)"; }
apt_updated=
apt_update() {
    [ -n "$apt_updated" ] && return 0
    say "apt-get update"
    apt-get update -q >> "$apt_log" 2>&1 || apt_fail "apt-get update failed"
    apt_updated=1
}
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "need root to install: ${missing[*]}"
    say "installing ${missing[*]}"
    t_install=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$apt_log" 2>&1; then
        apt_update
        apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$apt_log" 2>&1 \
            || apt_fail "apt-get install ${missing[*]} failed"
    fi
    say "installed in $((SECONDS - t_install)) s"
fi

# This run's scratch space (downloads, the ctl share), removed at exit; in $work, so what is
# made there is moved into the cache in one rename.
run=$(mktemp -d "$work/run.XXXXXX")
qpid=
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
    stop_peers
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The host's real interpreter (not a pyenv shim).
real_py=
if py=$(command -v python3 2>/dev/null); then
    real_py=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || readlink -f "$py")
fi

# --- 2. guest kernel (never installed on the host) --------------------------
# The arch's guest_kernel sets kernel (the file QEMU boots), moddir (its modules; empty: all
# built in), kernel_release, and kernel_name (the default results are
# results/real-PREFIXNAME). A track's packages come through track_kernel, from the apt state
# apt_opts names.
mkdir -p "$work/kernel"
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }

# apt_download DIR WHAT PKG=VERSION...: the packages' .deb files into DIR, saying WHAT they are,
# their size (apt-cache show) and how long the download took.
apt_download() {
    local dir=$1 what=$2 size t0=$SECONDS
    shift 2
    size=$(apt-cache "${apt_opts[@]}" show "$@" 2>/dev/null | awk '$1 == "Size:" {s += $2} END {print s + 0}')
    say "fetching $what ($(mb "$size"))"
    (cd "$dir" && apt-get download -q "${apt_opts[@]}" -o APT::Sandbox::User=root "$@" >> "$apt_log" 2>&1) \
        || apt_fail "apt-get download $* failed"
    say "downloaded $what in $((SECONDS - t0)) s"
}

unpack_deb() { # unpack_deb DEB KDIR: the package's files into KDIR, and the arch's boot file
    local tmp vmlinuz
    tmp=$(mktemp -d "$work/kernel/.unpack.XXXXXX")
    dpkg -x "$1" "$tmp" || { rm -rf "$tmp"; fail "dpkg -x $1 failed"; }
    vmlinuz=("$tmp"/boot/vmlinuz-*)
    [ -f "${vmlinuz[0]}" ] || { rm -rf "$tmp"; bad_arg "$1 has no boot/vmlinuz-*: not a linux-image package"; }
    unpacked_kernel "${vmlinuz[0]}" "$tmp"
    rm -rf "$2"
    mv "$tmp" "$2"
    touch "$2/.done"
}

# Debian's tracks: the package the metapackage depends on, remembered until the lists change.
track_query() {
    local pkg ver=
    pkg=$(apt-cache "${apt_opts[@]}" depends "$kernel_meta" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !found {print $2; found = 1}')
    [ -n "$pkg" ] && ver=$(apt-cache "${apt_opts[@]}" policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" && !found {print $2; found = 1}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] && echo "$pkg $ver"
}
track_lookup() { # sets kpkg, kver
    local found
    found=$(apt_memo "$apt_lists" "$kernel_meta" track_query) || return 1
    read -r kpkg kver <<< "$found"
}
track_kernel() { # sets kdir: the track's kernel, fetched and unpacked if not cached
    local tmp deb t_fetch
    kpkg='' kver=''
    if ! track_lookup; then
        index_update
        track_lookup || kver=
    fi
    if [ -n "$kver" ]; then
        [[ $kpkg == linux-image-"$kernel_arg".*-"$arch" ]] \
            || fail "$kernel_meta depends on $kpkg, not a $kernel_arg kernel (Debian bookworm's apt sources are needed)"
        kdir=$work/kernel/${kpkg}_$kver
    else
        # No package index: fall back to whatever kernel of the track is already cached.
        kdir=$(ls -d "$work"/kernel/linux-image-"$kernel_arg".*-"$arch"_*/ 2>/dev/null | sort -V | tail -n1) || true
        kdir=${kdir%/}
        [ -n "$kdir" ] && [ -f "$kdir/.done" ] \
            || fail "cannot find the $kernel_meta dependency with apt-cache (bookworm-security in the apt sources?)"
        say "apt-cache lookup failed; using cached kernel $(basename "$kdir")"
    fi
    [ -f "$kdir/.done" ] && return 0
    t_fetch=$SECONDS
    tmp=$(mktemp -d "$run/fetch.XXXXXX")
    apt_download "$tmp" "guest kernel $kpkg $kver" "$kpkg=$kver"
    deb=$(ls "$tmp"/*.deb)
    say "unpacking ${deb##*/} into $kdir"
    unpack_deb "$deb" "$kdir"
    rm -rf "$tmp"
    say "guest kernel ready in $((SECONDS - t_fetch)) s"
}

guest_kernel

# --- 3. initramfs, cached by the hash of its inputs -------------------------
# The modules are named with their sizes and times: a rebuilt module at the same path is
# a new input.
key=$( {
    sha256sum "$here/vm/init" "$here/vm/build-initramfs.sh" "$here/vm/lib.sh" "$initrd_busybox" | cut -d' ' -f1
    printf '%s\n' "${initrd_modules[@]}"
    for d in "$moddir" ${own_moddir:+"$own_moddir"}; do
        [ -n "$d" ] || continue
        { module_files "$d" | xargs -0r stat -c '%n %s %Y'; } | LC_ALL=C sort
        cat "$d/modules.builtin" 2>/dev/null || true
    done
} | sha256sum | cut -c1-16)
initrd=$work/initramfs-$key.cpio
if [ ! -f "$initrd" ]; then
    say "building initramfs"
    "$here/vm/build-initramfs.sh" --busybox "$initrd_busybox" ${own_moddir:+--own "$own_moddir"} \
        "$moddir" "$initrd" "${initrd_modules[@]}"
fi

# --- 4. the run: results dir, the guest's root, guest command ---------------
results=${results:-$root/results/real-$results_prefix$kernel_name}
mkdir -p "$results"
results=$(cd "$results" && pwd -P)
rm -f "$results/exit-status" "$results/exit-reason" "$results/console.log"
[ $# -gt 0 ] || set -- sh ci/vm/guest-suite.sh

q() { local s=$1; printf "'%s'" "${s//\'/\'\\\'\'}"; }   # POSIX sh quoting
# Byte-compile the project, since imports under TCG are slow and the guest sees the tree
# read-only (PYTHON: the host's interpreter of the guest's Python version).
compile_repo() {
    "$1" -m compileall -q -x '/(\.git|\.work|results|node_modules)/' "$root" >/dev/null 2>&1 || true
}
guest_root   # the arch's: guest_config and guest_env, lines for ctl/config and cmd.sh
{
    echo "RESULTS_PATH=$(q "$results")"
    echo "DEVICES=$(q "${devices[*]}")"
    printf '%s\n' "${guest_config[@]}"
} > "$run/config"
{
    echo "cd $(q "$root") || exit 126"
    printf 'export %s\n' "${guest_env[@]}"
    # TERM=dumb: the serial console is a tty, but nobody reads colours there.
    echo "export HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"
    echo "export VFIO_REAL_RESULTS=$(q "$results")"
    for kv in "${extra_env[@]}"; do echo "export ${kv%%=*}=$(q "${kv#*=}")"; done
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} > "$run/cmd.sh"

# --- 5. accelerator ---------------------------------------------------------
t_accel=$(now_us)
pick_accel
say "accel: $accel, chosen in $(secs_since "$t_accel") s ($accel_why)"

# --- 6. boot ----------------------------------------------------------------
log=$results/console.log
progress_s=15   # a line on stderr when the console has been silent this long
boot_console() { tail -c +$((boot_from + 1)) "$log"; }   # this boot's part of the log
# The first line of this boot's console that matches; read from a process substitution,
# since under pipefail a grep that stops early would fail the pipeline.
boot_grep() { grep -m1 -- "$1" < <(boot_console); }
run_vm() { # run_vm ACCEL -> sets vm_rc, vm_why, boot_from (where its console starts in the log)
    local acc=$1
    qemu_command "$acc"
    say "booting $kernel_release ($acc, timeout ${timeout_s}s)"
    boot_from=$(stat -c %s "$log")
    local fifo=$run/console.fifo
    rm -f "$fifo"; mkfifo "$fifo"
    # Console: strip the serial line's CRs, stream to stdout, keep a copy.
    sed -u 's/\r$//' < "$fifo" | tee -a "$log" &
    local teepid=$!
    "${qemu_cmd[@]}" < /dev/null > "$fifo" 2>&1 &
    qpid=$!
    local t0=$SECONDS size seen=$boot_from quiet_from=$SECONDS
    vm_why=
    while kill -0 "$qpid" 2>/dev/null; do
        if [ $((SECONDS - t0)) -ge "$timeout_s" ]; then
            vm_why=timeout; break
        fi
        # A KVM emulation failure pauses the VM instead of ending QEMU.
        if [ "$acc" = kvm ] && boot_grep 'KVM internal error' > /dev/null; then
            vm_why=kvm-error; break
        fi
        size=$(stat -c %s "$log")
        if [ "$size" != "$seen" ]; then
            seen=$size quiet_from=$SECONDS
        elif [ $((SECONDS - quiet_from)) -ge "$progress_s" ]; then
            say "$((SECONDS - t0)) s elapsed, still $(boot_console | boot_phase) ($acc, timeout ${timeout_s}s)"
            quiet_from=$SECONDS
        fi
        sleep 0.1
    done
    if [ -n "$vm_why" ]; then
        kill "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.3; done
        kill -9 "$qpid" 2>/dev/null || true
    fi
    vm_rc=0
    wait "$qpid" || vm_rc=$?
    qpid=
    wait "$teepid" || true
}

t_start=$(date +%s%N)
: > "$log"
start_peers
run_vm "$accel"
if [ "$vm_why" = kvm-error ] && [ "$accel_mode" = auto ]; then
    remember_kvm_failure "a real guest: $(boot_grep 'KVM internal error')"
    say "KVM failed inside the guest; retrying with TCG (remembered in $(kvm_memo): later runs here go straight to TCG)"
    rm -f "$results/exit-status" "$results/exit-reason"
    accel=tcg
    run_vm "$accel"
fi
# A panic before the command started (nothing ran, nothing was written) is worth
# one more boot: e.g. the IO-APIC timer check under heavy load.
if [ -z "$vm_why" ] && [ ! -s "$results/exit-status" ] && panic=$(boot_console | panic_before_command); then
    say "the guest kernel panicked before the command started ($panic); booting once more"
    run_vm "$accel"
fi
stop_peers
ms=$(( ($(date +%s%N) - t_start) / 1000000 ))
check_peers_gone
elapsed=$((ms / 1000)).$(printf %03d $((ms % 1000)))

if [ "$vm_why" = timeout ]; then
    say "real VM timed out after $timeout_s s (console: $log)"
    exit 124
fi
[ "$vm_why" = kvm-error ] && { say "KVM internal error in the guest (try VFIO_CI_ACCEL=tcg)"; exit 125; }
if [ ! -s "$results/exit-status" ]; then
    panic=$(boot_grep 'Kernel panic') && say "the guest kernel panicked: $panic"
    say "the VM ended without reporting the command's exit status (qemu exit $vm_rc; console: $log)"
    exit 125
fi
status=$(tr -dc '0-9' < "$results/exit-status")
[ -n "$status" ] || { say "unreadable exit-status file"; exit 125; }
if [ -s "$results/exit-reason" ]; then
    say "guest setup failed: $(cat "$results/exit-reason")"
fi
say "guest command exited with status $status (${elapsed}s in the VM)"
exit "$status"
