# shellcheck shell=bash
# The s390x guest of ci/real-vm.sh (--arch s390x), sourced by it: QEMU's s390-ccw-virtio machine
# under TCG, booting a kernel we build from Debian's linux-source (Debian's s390x kernels have no
# vfio-ccw): tinyconfig and ci/vm/s390x.config, everything built in. The virtio-blk-ccw disk's
# subchannel is bound to vfio_ccw and an mdev of it is made; the guest's VFIO device is that
# mdev. The guest's root is Debian's s390x Python with the project's PyPI dependencies; this
# clone is shared into it at its path. What it defines is what ci/vm/amd64.sh defines for its
# guest; real-vm.sh calls them alike. Its packages, busybox, root, accelerator and shares are
# those of every foreign guest (ci/vm/foreign.sh).
# shellcheck disable=SC2034,SC2054,SC2154  # the variables real-vm.sh reads, its own read here; QEMU options have commas

# The kernel's build: the cross compiler, and gcc, libc6-dev, flex, bison and bc for its host tools.
arch_packages=(qemu-system-misc gcc-s390x-linux-gnu gcc libc6-dev make flex bison bc cpio xz-utils)
default_timeout=600
results_prefix=s390x-
# The disk's subchannel 0.0.0001, bound to vfio_ccw, and an mdev of type vfio_ccw-io made on it
# with a fixed UUID (the fake's ccw topology has the same): ci/vm/init's PARENT/TYPE/UUID.
devices=(0.0.0001/vfio_ccw-io/8a1c0bd0-7e7a-4f6a-9c3e-000000000001)
initrd_modules=()
own_moddir=
guest_debs=(python3 dash coreutils grep sed)
guest_arch=s390x wheel_machine=s390x
# shellcheck source-path=SCRIPTDIR
. "$vm_dir/foreign.sh"
# The host's architecture beside s390x: bookworm-security (Debian LTS) carries no s390x, so
# the newest linux-source (architecture all) is listed only there, as is the 6.12 track.
private_apt_opts "$papt" s390x "$(dpkg --print-architecture)"
kernel_make=(ARCH=s390 CROSS_COMPILE=s390x-linux-gnu-)

# --- the kernel: built once per source version, make variables and config options -------------
# (not per version of this code or the fragments' comments: the build takes minutes, so a change
# here that changes the kernel changes one of those, or clears the cache)
guest_kernel() { # sets kernel, moddir, kernel_release, kernel_name; initrd_busybox
    local key kdir kernel_config
    private_lists
    kver=$(apt_memo "$apt_lists" "$kernel_meta" candidate "$kernel_meta") || fail "no $kernel_meta in $papt"
    kernel_config=("$vm_dir/s390x.config")
    if [ -f "$vm_dir/s390x-$kernel_arg.config" ]; then kernel_config+=("$vm_dir/s390x-$kernel_arg.config"); fi
    key=$( { echo "$kver"; printf '%s\n' "${kernel_make[@]}"; config_options "${kernel_config[@]}"; } \
           | sha256sum | cut -c1-16)
    kdir=$arch_work/kernel-$kver-$key
    [ -f "$kdir/.done" ] || build_kernel "$kdir"
    kernel=$kdir/bzImage
    kernel_release=$(cat "$kdir/release")
    moddir=
    kernel_name=$kernel_arg
    guest_busybox
}

# build_kernel DIR: Debian's linux-source of the track at $kver, configured and built into DIR:
# bzImage, config, release. Its log is $arch_work/kernel-build.log.
build_kernel() {
    local tree=$run/linux log=$arch_work/kernel-build.log src lost pid t0=$SECONDS t_make t_last
    fetch_unpack "$run/src" "$kernel_meta $kver" "$kernel_meta=$kver"
    say "unpacking $kernel_meta (~10 s)"
    mkdir "$tree"
    src=("$run"/src/usr/src/linux-source-*.tar.xz)
    xz -dc "${src[0]}" | tar -x -C "$tree" --strip-components=1 || fail "cannot unpack ${src[0]}"
    rm -rf "$run/src"
    { make -C "$tree" "${kernel_make[@]}" tinyconfig \
        && cat "${kernel_config[@]}" >> "$tree/.config" \
        && make -C "$tree" "${kernel_make[@]}" olddefconfig; } > "$log" 2>&1 \
        || { tail -n 20 "$log" >&2; fail "configuring the kernel failed (log: $log)"; }
    lost=$(config_lost "$tree/.config" "${kernel_config[@]}") \
        || fail "the kernel's config is not what ${kernel_config[*]#"$root"/} ask: ${lost//$'\n'/, } (a dependency off, or selected)"
    say "building Linux $kver for s390x (-j2; ~7 min on 2 cores; log: $log)"
    make -C "$tree" "${kernel_make[@]}" -j2 bzImage >> "$log" 2>&1 &
    pid=$!
    t_make=$SECONDS t_last=$SECONDS
    # A line every 30 s: how far the build is (~750 files).
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ $((SECONDS - t_last)) -ge 30 ]; then
            t_last=$SECONDS
            say "kernel build: $((SECONDS - t_make)) s, $(grep -c '^  CC' "$log") files compiled, at $(grep '^  [A-Z]' "$log" | tail -n1 | awk '{print $2}')"
        fi
    done
    wait "$pid" || { tail -n 20 "$log" >&2; fail "the kernel build failed (log: $log)"; }
    mkdir "$run/kernel"
    cp "$tree/arch/s390/boot/bzImage" "$run/kernel/bzImage"
    cp "$tree/.config" "$run/kernel/config"
    make -s -C "$tree" "${kernel_make[@]}" kernelrelease > "$run/kernel/release"
    rm -rf "$tree" "$1"
    mv "$run/kernel" "$1"
    touch "$1/.done"
    say "built Linux $(cat "$1/release") in $((SECONDS - t0)) s: $1"
}

# --- QEMU -------------------------------------------------------------------------------------
qemu_command() { # qemu_command ACCEL: sets qemu_cmd; a fresh, sparse 8 MiB disk each boot
    # QEMU gives each device the first free subchannel, in the order they are created (not its
    # device number's): the root share first at 0.0.0000, then the disk, so its subchannel is
    # 0.0.0001 as is its device number (css fe is the guest's 0), then the other shares; each
    # subchannel's number is its device's. -nodefaults, or a virtio-net-ccw comes first.
    rm -f "$run/disk.raw"
    truncate -s 8M "$run/disk.raw"
    root_shares virtio-9p-ccw devno=fe.0.0000 devno=fe.0.0002 devno=fe.0.0003 devno=fe.0.0004
    qemu_cmd=(qemu-system-s390x -nodefaults -no-user-config -display none -no-reboot
        -machine "s390-ccw-virtio,accel=$1" -cpu max -smp 1 -m "$mem"
        -kernel "$kernel" -initrd "$initrd"
        -append "$(guest_cmdline s390x)"
        -chardev stdio,id=con,signal=off -device sclpconsole,chardev=con
        "${shares[@]:0:4}"
        -drive "file=${run//,/,,}/disk.raw,if=none,id=d0,format=raw"
        -device virtio-blk-ccw,drive=d0,devno=fe.0.0001
        "${shares[@]:4}")
}
