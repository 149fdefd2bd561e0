#!/bin/bash
# Run a command against real vfio-pci devices: boot Debian's Linux 6.1 in a
# QEMU q35 VM with a virtual Intel IOMMU, bind three emulated PCI devices to
# vfio-pci, and run COMMAND inside a chroot of this machine's root (shared
# read-only over 9p), so the host's Python and this clone run unchanged.
#
#   ci/real-vm.sh [--timeout SECONDS] [--results DIR] [--env NAME=VALUE]... [--] [COMMAND ...]
#
# Exit status: the guest command's. 124 on timeout; 125 when the VM ended
# without reporting a status (see RESULTS/console.log). See ci/README.md.
#
# Environment: VFIO_CI_WORK (cache dir, default ci/.work), VFIO_CI_ACCEL
# (auto|kvm|tcg, default auto), VFIO_CI_MEM (default 1G), VFIO_CI_APPEND
# (extra guest kernel arguments).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/.." && pwd -P)
# shellcheck source-path=SCRIPTDIR
. "$here/vm/lib.sh"
work=${VFIO_CI_WORK:-$here/.work}
accel_mode=${VFIO_CI_ACCEL:-auto}
mem=${VFIO_CI_MEM:-1G}
case $accel_mode in
    auto | kvm | tcg) ;;
    *) echo "real-vm: VFIO_CI_ACCEL must be auto, kvm or tcg, not '$accel_mode'" >&2; exit 2 ;;
esac

timeout_s=300
results=$root/results
extra_env=()

say() { echo "real-vm: $*" >&2; }
fail() { say "$*"; exit 1; }
usage() { sed -n '7p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
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
[[ $timeout_s =~ ^[0-9]+$ ]] && [ "$timeout_s" -gt 0 ] || fail "--timeout wants a positive number of seconds"
for kv in "${extra_env[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail "--env wants NAME=VALUE, got '$kv'"
done

# Devices given to the guest, at fixed addresses (see ci/README.md).
#   00:03.0 edu (1234:11e8), 00:04.0 ivshmem-plain (1af4:1110) and
#   00:06.0 ivshmem-doorbell (1af4:1110, a peer of our ivshmem-server) on the
#   q35 root bus; 01:00.0 e1000e (8086:10d3) behind a pcie-root-port at 00:05.0.
devices=(0000:00:03.0 0000:00:04.0 0000:00:06.0 0000:01:00.0)

# --- 1. host packages -------------------------------------------------------
need_pkgs=(qemu-system-x86 busybox-static kmod cpio xz-utils binutils)
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
mkdir -p "$work/kernel"
# apt-cache is slow here (no binary cache), so the answer is remembered
# until the package lists change.
lists_stamp() { stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | md5sum | cut -c1-32; }
kpkg_lookup() {
    local memo=$work/kernel/lookup stamp
    stamp=$(lists_stamp)
    if [ -f "$memo" ] && read -r s kpkg kver < "$memo" && [ "$s" = "$stamp" ]; then
        return 0
    fi
    kpkg_query || return 1
    echo "$stamp $kpkg $kver" > "$memo"
}
kpkg_query() {
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !found {print $2; found = 1}')
    kver=
    [ -n "$kpkg" ] && kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" && !found {print $2; found = 1}')
    [ -n "$kver" ] && [ "$kver" != "(none)" ]
}
if ! kpkg_lookup; then
    apt_update
    kpkg_lookup || true
fi
if [ -n "${kver:-}" ] && [ "$kver" != "(none)" ]; then
    kdir=$work/kernel/${kpkg}_$kver
else
    # No package index: fall back to whatever kernel is already cached.
    kdir=$(ls -d "$work"/kernel/*/ 2>/dev/null | sort -V | tail -n1)
    kdir=${kdir%/}
    [ -n "$kdir" ] && [ -f "$kdir/.done" ] || fail "cannot find the linux-image-amd64 dependency with apt-cache"
    say "apt-cache lookup failed; using cached kernel $(basename "$kdir")"
fi
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }
if [ ! -f "$kdir/.done" ]; then
    ksize=$(apt-cache show "$kpkg=$kver" 2>/dev/null | awk '$1 == "Size:" {print $2; exit}')
    say "fetching guest kernel $kpkg $kver${ksize:+ ($(mb "$ksize"))} into $kdir"
    t_fetch=$SECONDS
    tmp=$(mktemp -d "$work/kernel/.fetch.XXXXXX")
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver" >> "$apt_log" 2>&1) \
        || { rm -rf "$tmp"; apt_fail "apt-get download $kpkg=$kver failed"; }
    deb=$(ls "$tmp"/*.deb)
    say "downloaded ${deb##*/} ($(mb "$(stat -c %s "$deb")")) in $((SECONDS - t_fetch)) s; unpacking"
    dpkg -x "$deb" "$tmp/tree"
    vmlinuz=$(ls "$tmp"/tree/boot/vmlinuz-* | head -n1)
    # The bzImage payload (xz here) is the ELF vmlinux; it has a PVH entry
    # note, so QEMU boots it directly and skips the in-guest decompression.
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$vmlinuz")
    pl_off=$(od -An -tu4 -j $((0x248)) -N4 "$vmlinuz")
    pl_len=$(od -An -tu4 -j $((0x24c)) -N4 "$vmlinuz")
    start=$(( (setup_sects + 1) * 512 + pl_off ))
    # The payload ends with a 4-byte uncompressed size; decompressors stop
    # at the end of the first stream.
    magic=$(od -An -tx1 -j "$start" -N6 "$vmlinuz" | tr -d ' \n')
    case $magic in
        fd377a585a00*) dec=(xz -dc --single-stream) ;;
        28b52ffd*)     dec=(zstd -dcq) ;;
        1f8b*)         dec=(gzip -dc) ;;
        *) rm -rf "$tmp"; fail "unknown bzImage payload format (magic $magic)" ;;
    esac
    dd if="$vmlinuz" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$pl_len" status=none \
        | "${dec[@]}" > "$tmp/tree/vmlinux" || true
    [ "$(head -c 4 "$tmp/tree/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
        || { rm -rf "$tmp"; fail "could not extract vmlinux from $vmlinuz"; }
    rm -f "$tmp"/*.deb
    rm -rf "$kdir"
    mv "$tmp/tree" "$kdir"
    rmdir "$tmp"
    touch "$kdir/.done"
    say "guest kernel ready in $((SECONDS - t_fetch)) s"
fi
kernel=$kdir/vmlinux
moddir=$(ls -d "$kdir"/lib/modules/*/ | head -n1)
moddir=${moddir%/}
kernel_release=${moddir##*/}

# --- 3. initramfs, cached by the hash of its inputs -------------------------
key=$( { sha256sum "$here/vm/init" "$here/vm/build-initramfs.sh" /bin/busybox "$moddir/modules.order" \
         | cut -d' ' -f1; echo "$kdir"; } | sha256sum | cut -c1-16)
initrd=$work/initramfs-$key.cpio
if [ ! -f "$initrd" ]; then
    say "building initramfs"
    "$here/vm/build-initramfs.sh" "$moddir" "$initrd"
fi

# --- 4. the run: results dir, guest command ---------------------------------
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
