# shellcheck shell=bash
# The arm64 guest of ci/real-vm.sh (--arch arm64), sourced by it: QEMU's virt board under
# TCG, booting Debian bookworm's arm64 kernel (the 6.12 or 6.1 track) with vfio rebuilt
# for no-IOMMU mode and vfio-platform and vfio-amba built beside it (Debian's arm64 config
# has neither), the PL031 and PL061 on vfio-amba and a virtio-mmio slot on vfio-platform in
# no-IOMMU groups. The guest's root is Debian's arm64 Python with the project's PyPI
# dependencies; this clone is shared into it at its path. What it defines is what
# ci/vm/amd64.sh defines for its guest; real-vm.sh calls them alike. Its packages, busybox, root,
# accelerator and shares are those of every foreign guest (ci/vm/foreign.sh).
# shellcheck disable=SC2034,SC2054,SC2154  # the variables real-vm.sh reads, its own read here; QEMU options have commas

arch_packages=(qemu-system-arm gcc-aarch64-linux-gnu make patch kmod cpio xz-utils)
default_timeout=600
results_prefix=arm64-
# The devices, bound in this order, so their no-IOMMU groups are 0, 1 and 2: the virt
# board's PL031 RTC and PL061 GPIO (AMBA), and its lowest virtio-mmio slot (a platform
# device), left empty since QEMU fills the slots from the top.
devices=(9010000.pl031 9030000.pl061 a000000.virtio_mmio)
# The initramfs's modules (their dependencies are added): vfio must allow no-IOMMU groups
# before a device binds, and vfio-platform must not insist on a reset driver, which none of
# these devices has.
initrd_modules=("vfio enable_unsafe_noiommu_mode=1" vfio_iommu_type1 "vfio-platform reset_required=0"
                vfio-amba virtio_mmio 9pnet_virtio 9p)
# What our drivers/vfio build turns on that Debian's config leaves off: no-IOMMU mode (compiled
# into vfio.ko, so vfio.ko itself is rebuilt), vfio-platform and vfio-amba. The rest of
# drivers/vfio is left out: Debian's own modules serve. No BTF: it would need pahole.
# DEB_HOST_*: 6.1's headers set the cross compiler from them.
vfio_make_vars=(ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- DEB_HOST_ARCH=arm64 DEB_HOST_GNU_TYPE=aarch64-linux-gnu
                CONFIG_VFIO=m CONFIG_VFIO_PLATFORM_BASE=m CONFIG_VFIO_PLATFORM=m CONFIG_VFIO_AMBA=m
                CONFIG_VFIO_IOMMU_TYPE1= CONFIG_VFIO_IOMMU_SPAPR_TCE= CONFIG_VFIO_SPAPR_EEH=
                CONFIG_VFIO_PCI_CORE= CONFIG_VFIO_PCI= CONFIG_VFIO_MDEV= CONFIG_VFIO_FSL_MC=
                CONFIG_VFIO_CDX= CONFIG_DEBUG_INFO_BTF_MODULES= KCFLAGS=-DCONFIG_VFIO_NOIOMMU=1)
# The guest root's Debian packages, with their dependencies: dash is its /bin/sh.
guest_debs=(python3 dash coreutils grep sed)
guest_arch=arm64 wheel_machine=aarch64
# The host's architecture beside arm64: the module build runs this host's linux-kbuild.
# shellcheck source-path=SCRIPTDIR
. "$vm_dir/foreign.sh"
private_apt_opts "$papt" arm64 "$(dpkg --print-architecture)"

# --- the kernel and our vfio modules -------------------------------------------------
unpacked_kernel() { # unpacked_kernel VMLINUZ DIR, for unpack_deb: Debian's arm64 vmlinuz is the Image QEMU boots
    arm64_image "$1" || fail "$1 is not an uncompressed arm64 Image"
}

guest_kernel() { # sets kernel, moddir, kernel_release, kernel_name; own_moddir, initrd_busybox
    private_lists
    track_kernel
    [ -n "$kver" ] || fail "no package index for the arm64 $kernel_arg track (in $papt)"
    vmlinuz=("$kdir"/boot/vmlinuz-*)
    kernel=${vmlinuz[0]}
    kernel_release=$(kernel_release_of "$kernel")
    find_moddir "$kdir" || fail "the arm64 $kernel_arg kernel in $kdir has no modules: $moddir_why"
    kernel_name=$kernel_arg
    vfio_modules
    guest_busybox
}

# vfio_modules: sets own_moddir, Debian's drivers/vfio of this kernel's source version built
# with vfio_make_vars and the track's patches (ci/vm/patches/TRACK/), cached by all of those
# and the build's own code.
vfio_modules() {
    local patches=() key tree t0 p ko
    if [ -d "$vm_dir/patches/$kernel_arg" ]; then patches=("$vm_dir/patches/$kernel_arg"/*.patch); fi
    key=$( { echo "$kver"; printf '%s\n' "${vfio_make_vars[@]}"; cat "${patches[@]}" /dev/null
             declare -f vfio_modules build_tree; } | sha256sum | cut -c1-16)
    own_moddir=$arch_work/vfio-${kver}-$key
    [ -f "$own_moddir/.done" ] && return 0
    build_tree
    t0=$SECONDS
    say "building vfio, vfio-platform and vfio-amba for $kernel_release${patches[*]:+ with ${patches[*]##*/}} (-j2)"
    rm -rf "$run/vfio"
    cp -r "$tree/vfio" "$run/vfio"
    for p in "${patches[@]}"; do
        patch -s -d "$run/vfio" -p3 < "$p" || fail "$p does not apply to $kpkg's drivers/vfio"
    done
    make -C "$tree/root/usr/src/$hdrs" M="$run/vfio" -j2 "${vfio_make_vars[@]}" modules > "$arch_work/vfio-build.log" 2>&1 \
        || { tail -n 20 "$arch_work/vfio-build.log" >&2; fail "the vfio module build failed (log: $arch_work/vfio-build.log)"; }
    mkdir -p "$run/vfio-out"
    # Debian's modules carry no debug info either; a smaller initramfs loads faster.
    while IFS= read -r -d '' ko; do
        aarch64-linux-gnu-strip --strip-debug -o "$run/vfio-out/${ko##*/}" "$ko" || fail "strip $ko failed"
    done < <(find "$run/vfio" -name '*.ko' -print0)
    rm -rf "$own_moddir"
    mv "$run/vfio-out" "$own_moddir"
    touch "$own_moddir/.done"
    say "built $(cd "$own_moddir" && echo *.ko) in $((SECONDS - t0)) s"
}

# build_tree: sets tree, $arch_work/build-VERSION: in root/, Debian's arm64 headers
# (usr/src/$hdrs) and this host's kbuild tools for them, unpacked; in vfio/, drivers/vfio
# of Debian's linux-source.
build_tree() {
    local deps common kbuild tmp t0=$SECONDS src
    tree=$arch_work/build-$kver
    hdrs=${kpkg/linux-image-/linux-headers-}
    [ -f "$tree/.done" ] && return 0
    deps=$(apt-cache "${apt_opts[@]}" show "$hdrs=$kver" 2>/dev/null | awk '/^Depends:/ {sub(/^Depends: */, ""); print; exit}' | dep_names)
    common=$(grep -m1 -x 'linux-headers-.*-common' <<< "$deps") || fail "$hdrs=$kver: no linux-headers-*-common among its dependencies"
    kbuild=$(grep -m1 -x 'linux-kbuild-.*' <<< "$deps") || fail "$hdrs=$kver: no linux-kbuild-* among its dependencies"
    tmp=$(mktemp -d "$run/tree.XXXXXX")
    fetch_unpack "$tmp/root" "the headers, kbuild tools and source of $kernel_release" \
        "$hdrs=$kver" "$common=$kver" "$kbuild:$(dpkg --print-architecture)=$kver" "linux-source-$kernel_arg=$kver"
    say "unpacking drivers/vfio from linux-source-$kernel_arg (reads the whole tarball: ~10 s)"
    mkdir "$tmp/vfio"
    src=("$tmp"/root/usr/src/linux-source-*.tar.xz)
    xz -dc "${src[0]}" | tar -x -C "$tmp/vfio" --strip-components=3 "linux-source-$kernel_arg/drivers/vfio" \
        || fail "cannot unpack drivers/vfio from ${src[0]}"
    rm -f "${src[0]}"
    # The headers' Makefile includes the common headers' by their installed path.
    sed -i "s|^include /usr/src/|include $tree/root/usr/src/|" "$tmp/root/usr/src/$hdrs/Makefile"
    rm -rf "$tree"
    mv "$tmp" "$tree"
    touch "$tree/.done"
    say "kernel build tree ready in $((SECONDS - t0)) s"
}

qemu_command() { # qemu_command ACCEL: sets qemu_cmd
    # Each 9p share takes one of the board's virtio-mmio slots, from the top, leaving a000000
    # (the lowest) empty.
    # A fixed CPU model: the same guest on every QEMU, and twice as quick to boot under TCG as
    # "max", whose pointer authentication TCG computes the slow way (16 s in the VM vs 8 s).
    root_shares virtio-9p-device
    qemu_cmd=(qemu-system-aarch64 -nodefaults -no-user-config -display none -no-reboot
        -machine "virt,accel=$1" -cpu cortex-a57 -smp 1 -m "$mem"
        -kernel "$kernel" -initrd "$initrd"
        -append "$(guest_cmdline arm64)"
        -chardev stdio,id=con,signal=off -serial chardev:con
        "${shares[@]}")
}
