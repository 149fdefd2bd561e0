# shellcheck shell=bash
# The amd64 guest of ci/real-vm.sh (the default --arch), sourced by it: a q35 VM with a
# virtual Intel IOMMU, four PCI devices on vfio-pci, and the host's own root as the guest's,
# so the host's Python and this clone run unchanged. What it defines is what
# ci/vm/arm64.sh defines for its guest; real-vm.sh calls both alike.
# shellcheck disable=SC2034,SC2054,SC2154  # the variables real-vm.sh reads, its own read here; QEMU options have commas

arch_packages=(qemu-system-x86 busybox-static kmod cpio xz-utils zstd binutils)
default_timeout=300
results_prefix=
# Devices given to the guest, at fixed addresses (see ci/README.md).
#   00:03.0 edu (1234:11e8), 00:04.0 ivshmem-plain (1af4:1110) and
#   00:06.0 ivshmem-doorbell (1af4:1110, a peer of our ivshmem-server) on the
#   q35 root bus; 01:00.0 e1000e (8086:10d3) behind a pcie-root-port at 00:05.0.
devices=(0000:00:03.0 0000:00:04.0 0000:00:06.0 0000:01:00.0)
# The initramfs's modules (their dependencies are added).
initrd_modules=(vfio vfio_iommu_type1 vfio-pci virtio_pci 9pnet_virtio 9p)
initrd_busybox=/bin/busybox
own_moddir=

# --- the kernel ---------------------------------------------------------------------
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
unpacked_kernel() { prepare_vmlinux "$@"; } # unpacked_kernel VMLINUZ DIR, for unpack_deb

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

guest_kernel() { # sets kernel, moddir, kernel_release, kernel_name
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
}

# --- the guest's root: the host's -----------------------------------------------------
# The host's real interpreter (not a pyenv shim) goes first on the guest PATH.
guest_root() { # sets guest_config and guest_env, lines for ctl/config and cmd.sh
    pybin=
    if [ -n "$real_py" ]; then
        pybin=$(dirname "$real_py")
        compile_repo "$real_py"
    fi
    ivsock=$run/ivshmem.sock ivshm=vfio-ci-$$ ivmailbox=$results/ivshmem-mailbox
    guest_config=("ROOT=host" "KEEP_PATHS=$(q "$root${pybin:+ $(dirname "$pybin")}")")
    guest_env=("PATH=$(q "${pybin:+$pybin:}$PATH")" "VFIO_IVSHMEM_MAILBOX=$(q "$ivmailbox")")
}

# --- the ivshmem-doorbell's peers on the host ------------------------------------------
# QEMU reads the server's set-up messages while it creates the device, so the
# server must be listening first: our server binds a temporary name and links
# it into place, so the socket existing means it is ready. The responder is the
# second peer, which the guest's tests drive through a mailbox directory in the
# results share (conformance/ivshmem_mailbox.py). The shm size becomes BAR2's:
# a power of two.
ivpids=()
start_peers() {
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
stop_peers() { # responder first, so the server sees a peer leave before it stops
    local i p
    for ((i = ${#ivpids[@]} - 1; i >= 0; i--)); do
        p=${ivpids[i]}
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true
    done
    ivpids=()
}
check_peers_gone() {
    local left
    for left in "$ivsock" "/dev/shm/$ivshm"; do
        [ -e "$left" ] && fail "ivshmem-server did not remove $left on exit (log: $results/ivshmem-server.log)"
    done
    return 0
}

# --- the accelerator (choose_accel in ci/vm/lib.sh) and QEMU -----------------------------
pick_accel() {
    choose_accel "$accel_mode" || fail "VFIO_CI_ACCEL must be auto, kvm or tcg"
}

qemu_command() { # qemu_command ACCEL: sets qemu_cmd
    # QEMU option values escape a comma by doubling it.
    local res_opt=${results//,/,,} run_opt=${run//,/,,}
    qemu_accel_args "$1"
    qemu_cmd=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
        "${accel_args[@]}" -smp 1 -m "$mem"
        -device intel-iommu,intremap=on
        -kernel "$kernel" -initrd "$initrd"
        -append "$(guest_cmdline amd64)"
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
}
