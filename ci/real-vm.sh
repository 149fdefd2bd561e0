#!/bin/bash
# Run a command against real vfio-pci devices: boot a Linux kernel (Debian bookworm's 6.1 or
# 6.12, or one you built) in a QEMU q35 VM with a virtual Intel IOMMU, bind four emulated
# PCI devices to vfio-pci, and run COMMAND inside a chroot of this machine's root (shared
# read-only over 9p), so the host's Python and this clone run unchanged.
#
#   ci/real-vm.sh [--kernel 6.1|6.12|FILE.deb|IMAGE [--modules DIR]] [--timeout SECONDS]
#                 [--results DIR] [--env NAME=VALUE]... [--] [COMMAND ...]
#
# --kernel: 6.1 (the default) or 6.12, fetched with apt; a linux-image .deb; or a bzImage
# or ELF vmlinux, with --modules its lib/modules/RELEASE, an INSTALL_MOD_PATH or its build
# tree (none if vfio-pci, virtio-pci and 9p are built in). Results: --results, default
# results/real-6.1/, results/real-6.12/, results/real-RELEASE/ for a kernel file.
#
# Exit status: the guest command's. 124 on timeout; 125 when the VM ended without reporting
# a status (see RESULTS/console.log); 2 for a bad argument. See ci/README.md.
#
# Environment: VFIO_CI_WORK (cache dir, default ~/.cache/vfio-harness/ci), VFIO_CI_ACCEL
# (auto|kvm|tcg, default auto), VFIO_CI_MEM (default 1G), VFIO_CI_APPEND
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
usage() { sed -n '7,8p' "${BASH_SOURCE[0]}" | sed 's/^#   //' >&2; exit 2; }

case $accel_mode in
    auto | kvm | tcg) ;;
    *) bad_arg "VFIO_CI_ACCEL must be auto, kvm or tcg, not '$accel_mode'" ;;
esac

timeout_s=300
kernel_arg=6.1
modules_arg=
results=
extra_env=()
while [ $# -gt 0 ]; do
    case $1 in
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
[[ $timeout_s =~ ^[0-9]+$ ]] && [ "$timeout_s" -gt 0 ] || bad_arg "--timeout wants a positive number of seconds"
for kv in "${extra_env[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || bad_arg "--env wants NAME=VALUE, got '$kv'"
done
kernel_spec "$kernel_arg" "$modules_arg" || bad_arg "$kernel_error"

# Devices given to the guest, at fixed addresses (see ci/README.md).
#   00:03.0 edu (1234:11e8), 00:04.0 ivshmem-plain (1af4:1110) and
#   00:06.0 ivshmem-doorbell (1af4:1110, a peer of our ivshmem-server) on the
#   q35 root bus; 01:00.0 e1000e (8086:10d3) behind a pcie-root-port at 00:05.0.
devices=(0000:00:03.0 0000:00:04.0 0000:00:06.0 0000:01:00.0)

# --- 1. host packages -------------------------------------------------------
need_pkgs=(qemu-system-x86 busybox-static kmod cpio xz-utils zstd binutils)
missing=()
for p in "${need_pkgs[@]}"; do
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
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$apt_log" 2>&1; then
        apt_update
        apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$apt_log" 2>&1 \
            || apt_fail "apt-get install ${missing[*]} failed"
    fi
fi

# --- 2. guest kernel (never installed on the host) --------------------------
# Sets kernel (the file QEMU boots), moddir (its modules; empty: all built in),
# kernel_release, and kernel_name (the default results are results/real-NAME).
mkdir -p "$work/kernel"
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }

# QEMU boots the ELF vmlinux inside a bzImage directly through its PVH entry, so the guest
# does not decompress itself (seconds under TCG); cut out once, next to the bzImage's other
# cached files. Where that cannot be (a kernel without CONFIG_PVH, an lz4 payload, ...),
# no-vmlinux says why and the bzImage itself boots.
prepare_vmlinux() { # prepare_vmlinux BZIMAGE DIR: DIR/vmlinux, or DIR/no-vmlinux
    vmlinux_from_bzimage "$1" "$2/vmlinux" || echo "$extract_why" > "$2/no-vmlinux"
}
boot_file() { # boot_file BZIMAGE DIR: sets kernel
    if [ -f "$2/vmlinux" ]; then
        kernel=$2/vmlinux
    else
        kernel=$1
        say "booting the bzImage, which decompresses itself in the guest: $(cat "$2/no-vmlinux")"
    fi
}

unpack_deb() { # unpack_deb DEB KDIR: the package's files and the vmlinux into KDIR
    local tmp vmlinuz
    tmp=$(mktemp -d "$work/kernel/.unpack.XXXXXX")
    dpkg -x "$1" "$tmp" || { rm -rf "$tmp"; fail "dpkg -x $1 failed"; }
    vmlinuz=("$tmp"/boot/vmlinuz-*)
    [ -f "${vmlinuz[0]}" ] || { rm -rf "$tmp"; bad_arg "$1 has no boot/vmlinuz-*: not a linux-image package"; }
    prepare_vmlinux "${vmlinuz[0]}" "$tmp"
    rm -rf "$2"
    mv "$tmp" "$2"
    touch "$2/.done"
}

# Debian's tracks: the package the metapackage depends on. apt-cache is slow here (no
# binary cache), so the answer is remembered until the package lists change.
lists_stamp() { stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | md5sum | cut -c1-32; }
track_lookup() { # sets kpkg, kver
    local memo=$work/kernel/lookup-$kernel_arg stamp s
    stamp=$(lists_stamp)
    if [ -f "$memo" ] && read -r s kpkg kver < "$memo" && [ "$s" = "$stamp" ]; then
        return 0
    fi
    track_query || return 1
    echo "$stamp $kpkg $kver" > "$memo"
}
track_query() {
    kpkg=$(apt-cache depends "$kernel_meta" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !found {print $2; found = 1}')
    kver=
    [ -n "$kpkg" ] && kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" && !found {print $2; found = 1}')
    [ -n "$kver" ] && [ "$kver" != "(none)" ]
}
track_kernel() { # sets kdir: the track's kernel, fetched and unpacked if not cached
    local tmp ksize deb t_fetch
    kpkg='' kver=''
    if ! track_lookup; then
        apt_update
        track_lookup || kver=
    fi
    if [ -n "$kver" ]; then
        [[ $kpkg == linux-image-"$kernel_arg".* ]] \
            || fail "$kernel_meta depends on $kpkg, not a $kernel_arg kernel (Debian bookworm's apt sources are needed)"
        kdir=$work/kernel/${kpkg}_$kver
    else
        # No package index: fall back to whatever kernel of the track is already cached.
        kdir=$(ls -d "$work"/kernel/linux-image-"$kernel_arg".*/ 2>/dev/null | sort -V | tail -n1) || true
        kdir=${kdir%/}
        [ -n "$kdir" ] && [ -f "$kdir/.done" ] \
            || fail "cannot find the $kernel_meta dependency with apt-cache (bookworm-security in the apt sources?)"
        say "apt-cache lookup failed; using cached kernel $(basename "$kdir")"
    fi
    [ -f "$kdir/.done" ] && return 0
    ksize=$(apt-cache show "$kpkg=$kver" 2>/dev/null | awk '$1 == "Size:" {print $2; exit}')
    say "fetching guest kernel $kpkg $kver${ksize:+ ($(mb "$ksize"))} into $kdir"
    t_fetch=$SECONDS
    tmp=$(mktemp -d "$work/kernel/.fetch.XXXXXX")
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver" >> "$apt_log" 2>&1) \
        || { rm -rf "$tmp"; apt_fail "apt-get download $kpkg=$kver failed"; }
    deb=$(ls "$tmp"/*.deb)
    say "downloaded ${deb##*/} ($(mb "$(stat -c %s "$deb")")) in $((SECONDS - t_fetch)) s; unpacking"
    unpack_deb "$deb" "$kdir"
    rm -rf "$tmp"
    say "guest kernel ready in $((SECONDS - t_fetch)) s"
}

deb_kernel() { # sets kdir: the .deb unpacked, cached by package, version and the file's hash
    local pkg ver t0
    pkg=$(dpkg-deb -f "$kernel_file" Package) ver=$(dpkg-deb -f "$kernel_file" Version)
    kdir=$work/kernel/deb-${pkg}_${ver}-$(sha256sum < "$kernel_file" | cut -c1-16)
    [ -f "$kdir/.done" ] && return 0
    say "unpacking $pkg $ver ($(mb "$(stat -c %s "$kernel_file")")) into $kdir"
    t0=$SECONDS
    unpack_deb "$kernel_file" "$kdir"
    say "guest kernel ready in $((SECONDS - t0)) s"
}

moddir=
case $kernel_kind in
    track | deb)
        if [ "$kernel_kind" = track ]; then track_kernel; else deb_kernel; fi
        vmlinuz=("$kdir"/boot/vmlinuz-*)
        boot_file "${vmlinuz[0]}" "$kdir"
        kernel_release=$(kernel_release_of "${vmlinuz[0]}")
        if ! find_moddir "$kdir" && [ "$kernel_kind" = track ]; then
            fail "the $kernel_arg kernel in $kdir has no modules: $moddir_why"
        fi ;;
    bzimage)
        kdir=$work/kernel/image-$(sha256sum < "$kernel_file" | cut -c1-16)
        if [ ! -f "$kdir/.done" ]; then
            mkdir -p "$kdir"
            prepare_vmlinux "$kernel_file" "$kdir"
            touch "$kdir/.done"
        fi
        boot_file "$kernel_file" "$kdir"
        kernel_release=$(kernel_release_of "$kernel_file") ;;
    elf)
        has_pvh_entry "$kernel_file" \
            || bad_arg "--kernel $kernel_file: this vmlinux has no PVH entry (CONFIG_PVH); give its bzImage"
        kernel=$kernel_file
        kernel_release=$(kernel_release_of "$kernel_file") ;;
esac
if [ -n "$kernel_modules" ]; then
    find_moddir "$kernel_modules" || bad_arg "--modules $kernel_modules: $moddir_why"
fi
[ -n "$moddir" ] || say "no modules for $kernel_release: vfio-pci, virtio-pci and 9p must be built in"
kernel_name=$kernel_release
if [ "$kernel_kind" = track ]; then kernel_name=$kernel_arg; fi

# --- 3. initramfs, cached by the hash of its inputs -------------------------
# The modules are named with their sizes and times: a rebuilt module at the same path is
# a new input.
key=$( {
    sha256sum "$here/vm/init" "$here/vm/build-initramfs.sh" "$here/vm/lib.sh" /bin/busybox | cut -d' ' -f1
    if [ -n "$moddir" ]; then
        { module_files "$moddir" | xargs -0r stat -c '%n %s %Y'; } | LC_ALL=C sort
        cat "$moddir/modules.builtin" 2>/dev/null || true
    fi
} | sha256sum | cut -c1-16)
initrd=$work/initramfs-$key.cpio
if [ ! -f "$initrd" ]; then
    say "building initramfs"
    "$here/vm/build-initramfs.sh" "$moddir" "$initrd"
fi

# --- 4. the run: results dir, guest command ---------------------------------
results=${results:-$root/results/real-$kernel_name}
mkdir -p "$results"
results=$(cd "$results" && pwd -P)
rm -f "$results/exit-status" "$results/exit-reason" "$results/console.log"
[ $# -gt 0 ] || set -- sh ci/vm/guest-suite.sh

# The host's real interpreter (not a pyenv shim) goes first on the guest PATH;
# byte-compile the project now, since imports under TCG are slow and the
# guest sees the tree read-only.
pybin=
if py=$(command -v python3 2>/dev/null); then
    real_py=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || readlink -f "$py")
    pybin=$(dirname "$real_py")
    "$real_py" -m compileall -q -x '/(\.git|\.work|results|node_modules)/' "$root" >/dev/null 2>&1 || true
fi

q() { local s=$1; printf "'%s'" "${s//\'/\'\\\'\'}"; }   # POSIX sh quoting
run=$(mktemp -d "$work/run.XXXXXX")
ivsock=$run/ivshmem.sock ivshm=vfio-ci-$$ ivmailbox=$results/ivshmem-mailbox
qpid=
ivpids=()
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
    stop_ivshmem
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
{
    echo "RESULTS_PATH=$(q "$results")"
    echo "DEVICES=$(q "${devices[*]}")"
    echo "KEEP_PATHS=$(q "$root${pybin:+ $(dirname "$pybin")}")"
} > "$run/config"
{
    echo "cd $(q "$root") || exit 126"
    echo "export PATH=$(q "${pybin:+$pybin:}$PATH")"
    # TERM=dumb: the serial console is a tty, but nobody reads colours there.
    echo "export HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"
    echo "export VFIO_REAL_RESULTS=$(q "$results") VFIO_IVSHMEM_MAILBOX=$(q "$ivmailbox")"
    for kv in "${extra_env[@]}"; do echo "export ${kv%%=*}=$(q "${kv#*=}")"; done
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} > "$run/cmd.sh"

# --- 5. the ivshmem-doorbell's peers on the host ----------------------------
# QEMU reads the server's set-up messages while it creates the device, so the
# server must be listening first: our server binds a temporary name and links
# it into place, so the socket existing means it is ready. The responder is the
# second peer, which the guest's tests drive through a mailbox directory in the
# results share (conformance/ivshmem_mailbox.py). The shm size becomes BAR2's:
# a power of two.
start_ivshmem() {
    "${pybin:+$pybin/}python3" -m vfio_impl.ivshmem.server -F -v -S "$ivsock" -M "$ivshm" -l 1M -n 2 \
        > "$results/ivshmem-server.log" 2>&1 &
    ivpids+=($!)
    local i
    for i in $(seq 100); do [ -S "$ivsock" ] && break; sleep 0.05; done
    [ -S "$ivsock" ] || fail "ivshmem-server did not start (log: $results/ivshmem-server.log)"
    rm -rf "$ivmailbox"
    "${pybin:+$pybin/}python3" -m conformance.ivshmem_mailbox -S "$ivsock" --mailbox "$ivmailbox" \
        --ready "$run/responder.ready" \
        > "$results/ivshmem-responder.log" 2>&1 &
    ivpids+=($!)
    for i in $(seq 200); do [ -f "$run/responder.ready" ] && break; sleep 0.05; done
    [ -f "$run/responder.ready" ] || fail "the ivshmem responder did not start (log: $results/ivshmem-responder.log)"
}
stop_ivshmem() { # responder first, so the server sees a peer leave before it stops
    local i p
    for ((i = ${#ivpids[@]} - 1; i >= 0; i--)); do
        p=${ivpids[i]}
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true
    done
    ivpids=()
}

# --- 6. accelerator (choose_accel in ci/vm/lib.sh) --------------------------
t_accel=$(now_us)
choose_accel "$accel_mode" || fail "VFIO_CI_ACCEL must be auto, kvm or tcg"
say "accel: $accel, chosen in $(secs_since "$t_accel") s ($accel_why)"

# --- 7. boot ----------------------------------------------------------------
log=$results/console.log
progress_s=15   # a line on stderr when the console has been silent this long
boot_console() { tail -c +$((boot_from + 1)) "$log"; }   # this boot's part of the log
# The first line of this boot's console that matches; read from a process substitution,
# since under pipefail a grep that stops early would fail the pipeline.
boot_grep() { grep -m1 -- "$1" < <(boot_console); }
run_vm() { # run_vm ACCEL -> sets vm_rc, vm_why, boot_from (where its console starts in the log)
    local acc=$1
    # QEMU option values escape a comma by doubling it.
    local res_opt=${results//,/,,} run_opt=${run//,/,,}
    qemu_accel_args "$acc"
    local cmd=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
        "${accel_args[@]}" -smp 1 -m "$mem"
        -device intel-iommu,intremap=on
        -kernel "$kernel" -initrd "$initrd"
        -append "$(guest_cmdline)"
        -chardev stdio,id=con,signal=off -serial chardev:con
        -device edu,addr=0x3
        -object memory-backend-memfd,id=shm0,size=1M,share=on
        -device ivshmem-plain,memdev=shm0,addr=0x4
        -device pcie-root-port,id=rp1,chassis=1,slot=1,addr=0x5
        -device e1000e,romfile=,bus=rp1,addr=0x0
        -chardev socket,path="${ivsock//,/,,}",id=ivsh
        -device ivshmem-doorbell,chardev=ivsh,vectors=2,addr=0x6
        -fsdev local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap
        -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot,addr=0x10
        -fsdev local,id=fsres,path="$res_opt",security_model=none
        -device virtio-9p-pci,fsdev=fsres,mount_tag=results,addr=0x11
        -fsdev local,id=fsctl,path="$run_opt",security_model=none,readonly=on
        -device virtio-9p-pci,fsdev=fsctl,mount_tag=ctl,addr=0x12)
    say "booting $kernel_release ($acc, timeout ${timeout_s}s)"
    boot_from=$(stat -c %s "$log")
    local fifo=$run/console.fifo
    rm -f "$fifo"; mkfifo "$fifo"
    # Console: strip the serial line's CRs, stream to stdout, keep a copy.
    sed -u 's/\r$//' < "$fifo" | tee -a "$log" &
    local teepid=$!
    "${cmd[@]}" < /dev/null > "$fifo" 2>&1 &
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
start_ivshmem
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
stop_ivshmem
ms=$(( ($(date +%s%N) - t_start) / 1000000 ))
for left in "$ivsock" "/dev/shm/$ivshm"; do
    [ -e "$left" ] && fail "ivshmem-server did not remove $left on exit (log: $results/ivshmem-server.log)"
done
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
