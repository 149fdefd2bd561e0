# shellcheck shell=bash
# The arm64 guest of ci/real-vm.sh (--arch arm64), sourced by it: QEMU's virt board under
# TCG, booting Debian bookworm's arm64 kernel (the 6.12 or 6.1 track) with vfio rebuilt
# for no-IOMMU mode and vfio-platform and vfio-amba built beside it (Debian's arm64 config
# has neither), the PL031 and PL061 on vfio-amba and a virtio-mmio slot on vfio-platform in
# no-IOMMU groups. The guest's root is Debian's arm64 Python with the project's PyPI
# dependencies; this clone is shared into it at its path. What it defines is what
# ci/vm/amd64.sh defines for its guest; real-vm.sh calls both alike.
#
# Every arm64 package comes through a private apt state in $work/arm64/apt (its own copy of
# the host's sources, lists and an empty dpkg status), fetched with apt-get download and
# unpacked with dpkg -x: the host's apt state and dpkg's architectures are never changed.
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

if [ "$accel_mode" = kvm ]; then
    bad_arg "VFIO_CI_ACCEL=kvm: the arm64 guest runs under TCG (auto or tcg)"
fi

arm_work=$work/arm64
papt=$arm_work/apt
private_apt_opts "$papt" "$(dpkg --print-architecture)"
apt_lists=$papt/lists
index_update() { private_lists force; }

# The private lists are fetched when missing and again whenever the host's change (an
# apt-get update there), so the two follow the same archive.
private_lists() { # private_lists [force]
    local stamp f
    stamp=$(lists_stamp /var/lib/apt/lists)
    if [ "${1:-}" != force ] && [ -f "$papt/updated" ] && [ "$(cat "$papt/updated")" = "$stamp" ]; then
        return 0
    fi
    mkdir -p "$papt/lists/partial" "$papt/cache"
    rm -rf "$papt/sources.list.d"
    mkdir "$papt/sources.list.d"
    : > "$papt/status"
    : > "$papt/sources.list"
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$papt/sources.list"
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && cp "$f" "$papt/sources.list.d/"
    done
    say "apt-get update of the private arm64 package lists in $papt"
    apt-get "${apt_opts[@]}" update -q >> "$apt_log" 2>&1 || apt_fail "apt-get update of the arm64 lists failed"
    echo "$stamp" > "$papt/updated"
}

candidate() { # candidate PKG: the version apt would take
    apt-cache "${apt_opts[@]}" policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" {print $2; found = 1} END {exit !found}'
}

# fetch_unpack DIR WHAT PKG=VERSION...: the packages, fetched into this run's scratch space,
# unpacked into DIR (dpkg -x, never installed).
fetch_unpack() {
    local dir=$1 what=$2 debs d
    shift 2
    debs=$(mktemp -d "$run/fetch.XXXXXX")
    apt_download "$debs" "$what" "$@"
    mkdir -p "$dir"
    for d in "$debs"/*.deb; do dpkg -x "$d" "$dir" || fail "dpkg -x $d failed"; done
    rm -rf "$debs"
}

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
    own_moddir=$arm_work/vfio-${kver}-$key
    [ -f "$own_moddir/.done" ] && return 0
    build_tree
    t0=$SECONDS
    say "building vfio, vfio-platform and vfio-amba for $kernel_release${patches[*]:+ with ${patches[*]##*/}} (-j2)"
    rm -rf "$run/vfio"
    cp -r "$tree/vfio" "$run/vfio"
    for p in "${patches[@]}"; do
        patch -s -d "$run/vfio" -p3 < "$p" || fail "$p does not apply to $kpkg's drivers/vfio"
    done
    make -C "$tree/root/usr/src/$hdrs" M="$run/vfio" -j2 "${vfio_make_vars[@]}" modules > "$arm_work/vfio-build.log" 2>&1 \
        || { tail -n 20 "$arm_work/vfio-build.log" >&2; fail "the vfio module build failed (log: $arm_work/vfio-build.log)"; }
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

# build_tree: sets tree, $arm_work/build-VERSION: in root/, Debian's arm64 headers
# (usr/src/$hdrs) and this host's kbuild tools for them, unpacked; in vfio/, drivers/vfio
# of Debian's linux-source.
build_tree() {
    local deps common kbuild tmp t0=$SECONDS src
    tree=$arm_work/build-$kver
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

guest_busybox() { # sets initrd_busybox: Debian's arm64 busybox-static, cached by version
    local ver dir
    ver=$(apt_memo "$apt_lists" busybox-static-arm64 candidate busybox-static) || fail "no arm64 busybox-static in $papt"
    dir=$arm_work/busybox-$ver
    initrd_busybox=$dir/bin/busybox
    [ -f "$dir/.done" ] && return 0
    rm -rf "$dir"
    fetch_unpack "$run/busybox" "busybox-static $ver (arm64)" "busybox-static=$ver"
    mv "$run/busybox" "$dir"
    touch "$dir/.done"
}

# --- the guest's root: Debian's arm64 Python and the project's dependencies ------------------
python_debs() { # the guest root's packages and their dependencies, "PACKAGE=VERSION" a line
    apt-get "${apt_opts[@]}" install -s --no-install-recommends "${guest_debs[@]}" 2>/dev/null | simulated_installs
}

# guest_root: sets guest_config, guest_env; pyroot, the guest's root, cached by its packages'
# versions, the wheels' and its build's code. The wheels are those guest_wheels.py names,
# fetched by this host's pip for the guest's platform (glibc and Python from the packages).
guest_root() {
    local debs wheels key pyver glibc t0 pkgs platforms compile_py
    debs=$(apt_memo "$apt_lists" python-root-arm64 python_debs) && [ -n "$debs" ] \
        || fail "cannot resolve ${guest_debs[*]} for arm64 in $papt"
    pyver=$(sed -n 's/^python3\.[0-9]*=\([0-9.]*\).*/\1/p' <<< "$debs" | head -n1)
    glibc=$(sed -n 's/^libc6=\([0-9]*\.[0-9]*\).*/\1/p' <<< "$debs")
    [ -n "$pyver" ] && [ -n "$glibc" ] || fail "no python3.X or libc6 among the guest's packages"
    [ -n "$real_py" ] || fail "no python3 on this host to fetch the guest's wheels with"
    wheels=$("$real_py" "$vm_dir/guest_wheels.py" "$root/pyproject.toml" "$pyver") \
        || fail "ci/vm/guest_wheels.py failed (is the project installed in $real_py's environment?)"
    compile_py=$(python_of "$pyver") \
        || say "no Python ${pyver%.*} here to byte-compile for the guest: its imports will be slower"
    key=$( { echo "$debs"; echo "$wheels"; echo "${compile_py:+compiled}"; declare -f guest_root; } \
           | sha256sum | cut -c1-16)
    pyroot=$arm_work/root-$key
    if [ ! -f "$pyroot/.done" ]; then
        t0=$SECONDS
        rm -rf "$run/root"
        mapfile -t pkgs <<< "$debs"
        fetch_unpack "$run/root" "Python $pyver for the guest (${#pkgs[@]} packages)" "${pkgs[@]}"
        say "fetching the guest's wheels (glibc $glibc, aarch64, Python $pyver): ${wheels//$'\n'/ }"
        mapfile -t platforms < <(wheel_platforms "$glibc" aarch64)
        # shellcheck disable=SC2086  # one requirement a word
        "$real_py" -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
            "${platforms[@]/#/--platform=}" --python-version "$pyver" --implementation cp \
            --target "$run/root/usr/lib/python3/dist-packages" $wheels >> "$arm_work/pip.log" 2>&1 \
            || { tail -n 20 "$arm_work/pip.log" >&2; fail "pip could not fetch the guest's wheels (log: $arm_work/pip.log)"; }
        # Their scripts name this host's interpreter; python3 -m runs them in the guest.
        rm -rf "$run/root/usr/lib/python3/dist-packages/bin"
        echo 'root:x:0:0:root:/root:/bin/sh' > "$run/root/etc/passwd"
        echo 'root:x:0:' > "$run/root/etc/group"
        if [ -n "$compile_py" ]; then
            "$compile_py" -m compileall -q -j2 -s "$run/root" -p / \
                "$run/root/usr/lib/python3/dist-packages" "$run/root/usr/lib/python${pyver%.*}" > /dev/null 2>&1 || true
        fi
        rm -rf "$pyroot"
        mv "$run/root" "$pyroot"
        touch "$pyroot/.done"
        say "guest root ready in $((SECONDS - t0)) s: $pyroot"
    fi
    [ -z "$compile_py" ] || compile_repo "$compile_py"
    guest_config=("ROOT=own" "REPO_PATH=$(q "$root")")
    guest_env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "PYTHONPATH=$(q "$root")")
}

python_of() { # python_of VERSION: this host's interpreter of the guest's Python X.Y, whose bytecode the guest reads
    local want=${1%.*} py
    for py in "$real_py" "python$want"; do
        py=$(command -v "$py") || continue
        [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ] && echo "$py" && return 0
    done
    return 1
}

# --- no peers; TCG; QEMU --------------------------------------------------------------
start_peers() { :; }
stop_peers() { :; }
check_peers_gone() { :; }

pick_accel() {
    accel=tcg accel_why="the arm64 guest runs under TCG"
}

qemu_command() { # qemu_command ACCEL: sets qemu_cmd
    # QEMU option values escape a comma by doubling it. Each 9p share takes one of the
    # board's virtio-mmio slots, from the top, leaving a000000 (the lowest) empty.
    # A fixed CPU model: the same guest on every QEMU, and twice as quick to boot under TCG as
    # "max", whose pointer authentication TCG computes the slow way (16 s in the VM vs 8 s).
    local res_opt=${results//,/,,} run_opt=${run//,/,,} root_opt=${root//,/,,} sys_opt=${pyroot//,/,,}
    qemu_cmd=(qemu-system-aarch64 -nodefaults -no-user-config -display none -no-reboot
        -machine "virt,accel=$1" -cpu cortex-a57 -smp 1 -m "$mem"
        -kernel "$kernel" -initrd "$initrd"
        -append "$(guest_cmdline arm64)"
        -chardev stdio,id=con,signal=off -serial chardev:con
        -fsdev local,id=fsroot,path="$sys_opt",security_model=none,readonly=on,multidevs=remap
        -device virtio-9p-device,fsdev=fsroot,mount_tag=guestroot
        -fsdev local,id=fsrepo,path="$root_opt",security_model=none,readonly=on,multidevs=remap
        -device virtio-9p-device,fsdev=fsrepo,mount_tag=repo
        -fsdev local,id=fsres,path="$res_opt",security_model=none
        -device virtio-9p-device,fsdev=fsres,mount_tag=results
        -fsdev local,id=fsctl,path="$run_opt",security_model=none,readonly=on
        -device virtio-9p-device,fsdev=fsctl,mount_tag=ctl)
}
