# shellcheck shell=bash
# Host-side helpers of ci/real-vm.sh, sourced by it, by ci/vm/build-initramfs.sh and by
# tests/test_ci_vm.py (which calls them with fake inputs): what --arch and --kernel name, a
# kernel's module directory and module load order, the vmlinux inside a bzImage, the arm64
# Image, the options a kernel build's config lost, the guest kernel command line, QEMU's
# accelerator options, the auto-mode choice of accelerator, the private apt state of another
# architecture's packages, and reading one boot's console. Reads $work, the cache directory (VFIO_CI_WORK); sets accel, accel_why,
# accel_args and probe_why for the caller, and the other outputs each function names.
# shellcheck disable=SC2034,SC2054,SC2154  # outputs and inputs as said; QEMU options have commas

vm_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# --- the guest kernel -----------------------------------------------------------
# --kernel names one of Debian bookworm's two kernel tracks of the guest's architecture,
# which ci/real-vm.sh fetches with apt (for s390x: its source, which ci/vm/s390x.sh builds),
# or (amd64 only) a kernel file: a linux-image .deb, or a bzImage or ELF vmlinux (with
# --modules DIR, or none when vfio-pci, virtio-pci and 9p are built in).

# The tracks: ARCH:NAME -> the metapackage whose dependency is that kernel's package; for
# s390x, whose Debian kernels have no vfio-ccw, the source package our kernel is built from.
declare -A kernel_tracks=([amd64:6.1]=linux-image-amd64 [amd64:6.12]=linux-image-6.12-amd64
                          [arm64:6.1]=linux-image-arm64 [arm64:6.12]=linux-image-6.12-arm64
                          [s390x:6.1]=linux-source-6.1 [s390x:6.12]=linux-source-6.12)
# arm64 defaults to 6.12: its vfio-platform binds as Debian's source has it, where 6.1's
# needs a fix (ci/vm/patches/6.1/). s390x to 6.1: see ci/README.md.
declare -A default_kernel=([amd64]=6.1 [arm64]=6.12 [s390x]=6.1)

# kernel_spec ARCH SPEC [MODULES]: what --arch ARCH, --kernel SPEC and --modules MODULES
# name. Sets kernel_kind: track (kernel_meta: its package, as above), deb, bzimage or elf
# (kernel_file: the file, absolute); and kernel_modules (the --modules directory as given,
# or empty). Fails with kernel_error, one line.
kernel_spec() {
    local arch=$1 spec=$2 mods=${3:-}
    kernel_kind='' kernel_file='' kernel_meta='' kernel_modules=$mods kernel_error=''
    if [ -z "${default_kernel[$arch]:-}" ]; then
        kernel_error="--arch wants amd64, arm64 or s390x, not '$arch'"
        return 1
    elif [ -n "$spec" ] && [ -n "${kernel_tracks[$arch:$spec]:-}" ]; then
        kernel_kind=track kernel_meta=${kernel_tracks[$arch:$spec]}
    elif [ "$arch" != amd64 ]; then
        kernel_error="--kernel wants 6.1 or 6.12 with --arch $arch, not '$spec'"
        return 1
    elif [ -f "$spec" ] && kernel_kind=$(file_kind "$spec"); then
        kernel_file=$(realpath "$spec")
    elif [ -f "$spec" ]; then
        kernel_error="--kernel $spec: neither a Debian package, a bzImage nor an ELF vmlinux"
        return 1
    else
        kernel_error="--kernel wants 6.1, 6.12, or the path of a linux-image .deb, a bzImage or a vmlinux: no file '$spec'"
        return 1
    fi
    if [ -n "$mods" ]; then
        case $kernel_kind in
            track | deb) kernel_error="--modules goes with a bzImage or vmlinux; --kernel $spec brings its own"
                         return 1 ;;
        esac
        [ -d "$mods" ] || { kernel_error="--modules $mods: no such directory"; return 1; }
    fi
}

file_kind() { # file_kind FILE: deb, elf or bzimage by its first bytes; fails for anything else
    if cmp -s -n 21 "$1" <(printf '!<arch>\ndebian-binary'); then
        echo deb
    elif cmp -s -n 4 "$1" <(printf '\177ELF'); then
        echo elf
    elif cmp -s -n 4 -i $((0x202)):0 "$1" <(printf HdrS); then
        echo bzimage
    else
        return 1
    fi
}

# find_moddir DIR: sets moddir to the modules of the kernel in DIR: DIR itself when it has
# modules.builtin or modules.order (lib/modules/RELEASE, a kernel build tree), else the one
# DIR/lib/modules/RELEASE (Debian bookworm's packages, an INSTALL_MOD_PATH) or, failing
# that, DIR/usr/lib/modules/RELEASE (trixie's). Fails with moddir_why.
find_moddir() {
    local found=() d
    if [ -f "$1/modules.builtin" ] || [ -f "$1/modules.order" ]; then
        moddir=$1
        return 0
    fi
    for d in "$1"/lib/modules/*/; do [ -d "$d" ] && found+=("${d%/}"); done
    if [ ${#found[@]} = 0 ]; then
        for d in "$1"/usr/lib/modules/*/; do [ -d "$d" ] && found+=("${d%/}"); done
    fi
    case ${#found[@]} in
        1) moddir=${found[0]} ;;
        0) moddir_why="no lib/modules/RELEASE, usr/lib/modules/RELEASE or modules.builtin in $1"; return 1 ;;
        *) moddir_why="modules of several kernels in $1 (${found[*]##*/}); name one: $1/.../RELEASE"; return 1 ;;
    esac
}

module_files() { # module_files MODDIR: the module files under MODDIR, NUL-terminated
    find "$1" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0
}

# module_order [--own DIR] MODDIR NAME...: the modules to load for the NAMEs, each after
# those it depends on (modinfo -F depends; the packages ship no modules.dep), one "NAME PATH"
# a line; dashes and underscores in names are one. A module under DIR (our own build) is
# taken instead of MODDIR's of the same name. A module in MODDIR/modules.builtin is part of
# the kernel and left out (on 6.12, virtio_pci). Fails, with a line on stderr, for a module
# that is neither under MODDIR nor built in.
module_order() {
    local own=
    if [ "$1" = --own ]; then own=$2; shift 2; fi
    local moddir=$1 f b m d
    shift
    local -A path_of=() builtin=() state=()
    for d in "$moddir" ${own:+"$own"}; do
        while IFS= read -r -d '' f; do
            b=${f##*/}; b=${b%%.ko*}; path_of[${b//-/_}]=$f
        done < <(module_files "$d")
    done
    if [ -f "$moddir/modules.builtin" ]; then
        while IFS= read -r f; do
            b=${f##*/}; b=${b%.ko}; builtin[${b//-/_}]=1
        done < "$moddir/modules.builtin"
    fi
    for m in "$@"; do module_visit "$m" || return 1; done
}
module_visit() { # one module and its dependencies, for module_order (whose locals it uses)
    local key=${1//-/_} deps d
    case ${state[$key]:-} in
        2) return 0 ;;
        1) echo "module_order: dependency cycle at $key" >&2; return 1 ;;
    esac
    if [ -n "${builtin[$key]:-}" ]; then
        state[$key]=2
        return 0
    fi
    if [ -z "${path_of[$key]:-}" ]; then
        echo "module $1 is neither under $moddir nor in its modules.builtin" >&2
        return 1
    fi
    state[$key]=1
    deps=$(modinfo -F depends "${path_of[$key]}") || return 1
    for d in ${deps//,/ }; do module_visit "$d" || return 1; done
    state[$key]=2
    echo "$key ${path_of[$key]}"
}

le_uint() { # le_uint FILE OFFSET BYTES: the little-endian unsigned number at OFFSET in FILE
    od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# bzimage_payload BZIMAGE: "START LENGTH FORMAT" of the compressed vmlinux in a bzImage
# (x86 boot protocol: it starts payload_offset bytes after the setup_sects + 1 sectors of
# real-mode code). FORMAT is gzip, xz, zstd, or "other:" and the first bytes' hex.
bzimage_payload() {
    local setup start len magic
    setup=$(le_uint "$1" $((0x1f1)) 1)
    [ "$setup" != 0 ] || setup=4   # 0 means 4, says the boot protocol
    start=$(( (setup + 1) * 512 + $(le_uint "$1" $((0x248)) 4) ))
    len=$(le_uint "$1" $((0x24c)) 4)
    magic=$(od -An -tx1 -j "$start" -N6 "$1" | tr -d ' \n')
    case $magic in
        1f8b*) echo "$start $len gzip" ;;
        fd377a585a00) echo "$start $len xz" ;;
        28b52ffd*) echo "$start $len zstd" ;;
        *) echo "$start $len other:$magic" ;;
    esac
}

# vmlinux_from_bzimage BZIMAGE OUT: the ELF vmlinux inside BZIMAGE, into OUT, if it has a
# PVH entry, so QEMU boots it directly and the guest does not decompress itself (slow under
# TCG). Fails, with extract_why and no OUT, for other payloads than gzip, xz and zstd, or no
# PVH entry.
vmlinux_from_bzimage() {
    local start len format count err dec
    read -r start len format < <(bzimage_payload "$1")
    # The build appends the uncompressed size (4 bytes) to every format but gzip, whose
    # own trailer holds it; left on, zstd calls it an "unsupported format".
    case $format in
        gzip) dec=(gzip -dc) count=$len ;;
        xz) dec=(xz -dc) count=$((len - 4)) ;;
        zstd) dec=(zstd -dcq) count=$((len - 4)) ;;
        *) extract_why="its payload is not gzip, xz or zstd (${format#other:})"; return 1 ;;
    esac
    if ! err=$({ dd if="$1" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$count" status=none \
                 | "${dec[@]}" > "$2"; } 2>&1); then
        extract_why="its $format payload does not decompress: ${err%%$'\n'*}"
    elif [ "$(file_kind "$2")" != elf ]; then
        extract_why="its $format payload is not an ELF vmlinux"
    elif ! has_pvh_entry "$2"; then
        extract_why="its vmlinux has no PVH entry (CONFIG_PVH)"
    else
        return 0
    fi
    rm -f "$2"
    return 1
}

has_pvh_entry() { # has_pvh_entry ELF: true if ELF has the PVH entry note (Xen, type 18)
    grep -qE '^\s+Xen\s+0x[0-9a-f]+\s+(Unknown note type: \(0x00000012\)|XEN_ELFNOTE_PHYS32_ENTRY)' \
        < <(readelf -n "$1" 2>/dev/null)
}

kernel_release_of() { # kernel_release_of BZIMAGE|VMLINUX: the release it reports (uname -r), or "unknown"
    local at release=
    if [ "$(file_kind "$1")" = bzimage ]; then
        at=$(le_uint "$1" $((0x20e)) 2)   # kernel_version: its version string, less 0x200
        if [ "$at" != 0 ]; then
            release=$(dd if="$1" bs=1 skip=$((at + 0x200)) count=64 status=none \
                      | tr '\0' '\n' | awk 'NR == 1 {print $1}')
        fi
    else
        release=$(grep -a -m1 -oE 'Linux version [0-9][^ ]*' "$1" | awk '{print $3}') || true
    fi
    echo "${release:-unknown}"
}

# guest_cmdline [ARCH]: the guest kernel's command line, VFIO_CI_APPEND last. Both: the serial
# console, and a panic ends QEMU, which runs with -no-reboot.
# amd64: the IOMMU with interrupt remapping. no_timer_check: under TCG on a loaded host the
# kernel's check of the IO-APIC timer can fail and panic ("timer doesn't work through
# Interrupt-remapped IO-APIC").
# arm64: the PL061's GPIO driver is kept from binding at boot: once it has held the IRQ,
# vfio-amba cannot request it (SET_IRQS fails with EINVAL).
# s390x: the console is the SCLP's VT220 line (QEMU's sclpconsole).
guest_cmdline() {
    local base
    case ${1:-amd64} in
        amd64) base="console=ttyS0 intel_iommu=on iommu=pt panic=-1 no_timer_check quiet" ;;
        arm64) base="console=ttyAMA0 panic=-1 quiet initcall_blacklist=pl061_gpio_driver_init" ;;
        s390x) base="console=ttysclp0 panic=-1 quiet" ;;
    esac
    echo "$base${VFIO_CI_APPEND:+ $VFIO_CI_APPEND}"
}

config_options() { # config_options FRAGMENT...: their option lines (CONFIG_X=VALUE, "# CONFIG_X is not set")
    grep -hE '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$@"
}

# config_lost CONFIG FRAGMENT...: the option lines of the config fragments that the resolved
# .config CONFIG does not have as they are: options `make olddefconfig` dropped, their
# dependencies being off (or unknown to that kernel), or that something selects. One a line;
# fails if there are any.
config_lost() {
    local config=$1 lost
    shift
    lost=$(config_options "$@" | grep -vxF -f "$config") || return 0
    echo "$lost"
    return 1
}

arm64_image() { # arm64_image FILE: true if FILE is an uncompressed arm64 Image ("ARMd" at 0x38)
    cmp -s -n 4 -i $((0x38)):0 "$1" <(printf ARMd)
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

# --- Debian's package lists ------------------------------------------------------
# The amd64 guest's packages come through the host's apt; the arm64 guest's through a private
# apt state (ci/vm/arm64.sh), which leaves the host's lists and dpkg's architectures alone.

lists_stamp() { # lists_stamp LISTS_DIR: changes whenever the package lists in LISTS_DIR do
    stat -c '%n %Y %s' "$1"/*Packages* 2>/dev/null | md5sum | cut -c1-32
}

# apt_memo LISTS_DIR NAME CMD...: CMD's output, remembered in $work/lookup/NAME until the
# package lists in LISTS_DIR change (apt-cache reads every list on each call: seconds here).
apt_memo() {
    local stamp f=$work/lookup/$2 out
    stamp=$(lists_stamp "$1")
    shift 2
    if [ -f "$f" ] && [ "$(head -n1 "$f")" = "$stamp" ]; then
        tail -n +2 "$f"
        return 0
    fi
    out=$("$@") || return 1
    mkdir -p "${f%/*}"
    printf '%s\n%s\n' "$stamp" "$out" > "$f.$$" && mv "$f.$$" "$f"
    echo "$out"
}

# private_apt_opts DIR ARCH [ARCH...]: sets apt_opts, the options that point apt-get and apt-cache
# at the sources, lists, cache and (empty) dpkg status under DIR, with the first ARCH native and
# the others beside it (arm64's cross build takes its tools from the host's architecture). The
# host's apt.conf.d (a proxy) and keyrings still apply. The binary cache the host turns off
# (docker-clean) is turned on again there: without it every apt-cache call reads all the lists.
private_apt_opts() {
    local dir=$1 a
    shift
    apt_opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/sources.list.d"
              -o "Dir::State::Lists=$dir/lists" -o "Dir::State::status=$dir/status" -o "Dir::Cache=$dir/cache"
              -o Dir::Cache::pkgcache=pkgcache.bin -o Dir::Cache::srcpkgcache=srcpkgcache.bin
              -o "APT::Architecture=$1" -o APT::Sandbox::User=root)
    for a in "$@"; do apt_opts+=(-o "APT::Architectures::=$a"); done
}

simulated_installs() { # the "PACKAGE=VERSION" of each Inst line of `apt-get -s install` (stdin)
    awk '$1 == "Inst" {v = $3; sub(/^\(/, "", v); print $2 "=" v}'
}

# wheel_platforms GLIBC MACHINE: pip's --platform values for a Linux with that glibc (e.g.
# 2.36), one a line: every manylinux tag it runs, newest first (pip does not widen a given
# platform to the older ones).
wheel_platforms() {
    local major=${1%%.*} minor=${1#*.} m
    for ((m = minor; m >= 17; m--)); do echo "manylinux_${major}_${m}_$2"; done
    echo "manylinux2014_$2"
}

dep_names() { # a Depends field's value (stdin): each dependency's first alternative's name, a line
    tr ',' '\n' | awk '{sub(/^[ \t]+/, ""); split($0, alt, /[ \t]*\|/); split(alt[1], w, /[ \t(]/); if (w[1] != "") print w[1]}'
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
