# shellcheck shell=bash
# What the guests of a foreign architecture share (ci/vm/arm64.sh, ci/vm/s390x.sh), sourced by
# them once they have set guest_arch (Debian's name: arm64, s390x), wheel_machine (the wheels'
# platform_machine: aarch64, s390x) and guest_debs: their packages through a private apt state,
# Debian's busybox-static of the guest's architecture, the guest's own root (Debian's Python and
# the project's dependencies as wheels), no peers on the host, TCG, and the 9p shares.
#
# Every package comes through a private apt state in $work/ARCH/apt (its own copy of the host's
# sources, lists and an empty dpkg status), fetched with apt-get download and unpacked with
# dpkg -x: the host's apt state and dpkg's architectures are never changed.
# shellcheck disable=SC2034,SC2054,SC2154  # the variables real-vm.sh reads, its own read here; QEMU options have commas

if [ "$accel_mode" = kvm ]; then
    bad_arg "VFIO_CI_ACCEL=kvm: the $guest_arch guest runs under TCG (auto or tcg)"
fi

arch_work=$work/$guest_arch
papt=$arch_work/apt
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
    say "apt-get update of the private $guest_arch package lists in $papt"
    apt-get "${apt_opts[@]}" update -q >> "$apt_log" 2>&1 || apt_fail "apt-get update of the $guest_arch lists failed"
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

guest_busybox() { # sets initrd_busybox: Debian's busybox-static of the guest, cached by version
    local ver dir
    ver=$(apt_memo "$apt_lists" "busybox-static-$guest_arch" candidate busybox-static) \
        || fail "no $guest_arch busybox-static in $papt"
    dir=$arch_work/busybox-$ver
    initrd_busybox=$dir/bin/busybox
    [ -f "$dir/.done" ] && return 0
    rm -rf "$dir"
    fetch_unpack "$run/busybox" "busybox-static $ver ($guest_arch)" "busybox-static=$ver"
    mv "$run/busybox" "$dir"
    touch "$dir/.done"
}

# --- the guest's root: Debian's Python and the project's dependencies ------------------------
python_debs() { # the guest root's packages and their dependencies, "PACKAGE=VERSION" a line
    apt-get "${apt_opts[@]}" install -s --no-install-recommends "${guest_debs[@]}" 2>/dev/null | simulated_installs
}

# guest_root: sets guest_config, guest_env; pyroot, the guest's root, cached by its packages'
# versions, the wheels' and its build's code. The wheels are those guest_wheels.py names,
# fetched by this host's pip for the guest's platform (glibc and Python from the packages).
guest_root() {
    local debs wheels key pyver glibc t0 pkgs platforms compile_py
    debs=$(apt_memo "$apt_lists" "python-root-$guest_arch" python_debs) && [ -n "$debs" ] \
        || fail "cannot resolve ${guest_debs[*]} for $guest_arch in $papt"
    pyver=$(sed -n 's/^python3\.[0-9]*=\([0-9.]*\).*/\1/p' <<< "$debs" | head -n1)
    glibc=$(sed -n 's/^libc6=\([0-9]*\.[0-9]*\).*/\1/p' <<< "$debs")
    [ -n "$pyver" ] && [ -n "$glibc" ] || fail "no python3.X or libc6 among the guest's packages"
    [ -n "$real_py" ] || fail "no python3 on this host to fetch the guest's wheels with"
    wheels=$("$real_py" "$vm_dir/guest_wheels.py" "$root/pyproject.toml" "$pyver" "$wheel_machine") \
        || fail "ci/vm/guest_wheels.py failed (is the project installed in $real_py's environment?)"
    compile_py=$(python_of "$pyver") \
        || say "no Python ${pyver%.*} here to byte-compile for the guest: its imports will be slower"
    key=$( { echo "$debs"; echo "$wheels"; echo "${compile_py:+compiled}"; declare -f guest_root; } \
           | sha256sum | cut -c1-16)
    pyroot=$arch_work/root-$key
    if [ ! -f "$pyroot/.done" ]; then
        t0=$SECONDS
        rm -rf "$run/root"
        mapfile -t pkgs <<< "$debs"
        fetch_unpack "$run/root" "Python $pyver for the guest (${#pkgs[@]} packages)" "${pkgs[@]}"
        say "fetching the guest's wheels (glibc $glibc, $wheel_machine, Python $pyver): ${wheels//$'\n'/ }"
        mapfile -t platforms < <(wheel_platforms "$glibc" "$wheel_machine")
        # shellcheck disable=SC2086  # one requirement a word
        "$real_py" -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
            "${platforms[@]/#/--platform=}" --python-version "$pyver" --implementation cp \
            --target "$run/root/usr/lib/python3/dist-packages" $wheels >> "$arch_work/pip.log" 2>&1 \
            || { tail -n 20 "$arch_work/pip.log" >&2; fail "pip could not fetch the guest's wheels (log: $arch_work/pip.log)"; }
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

# --- no peers; TCG; the shares ------------------------------------------------------------
start_peers() { :; }
stop_peers() { :; }
check_peers_gone() { :; }

pick_accel() {
    accel=tcg accel_why="the $guest_arch guest runs under TCG"
}

# root_shares DEVICE [PROPS...]: sets shares, QEMU's options for the guest's root, the repo,
# the results and the ctl share (ci/vm/init mounts them by tag) on virtio-9p DEVICE, the
# share's PROPS (e.g. its devno) added to each in turn. Option values escape a comma by
# doubling it.
root_shares() {
    local model=$1 id tag path ro props
    shift
    shares=()
    for id in root repo res ctl; do
        case $id in
            root) tag=guestroot path=$pyroot ro=,readonly=on,multidevs=remap ;;
            repo) tag=repo path=$root ro=,readonly=on,multidevs=remap ;;
            res) tag=results path=$results ro= ;;
            ctl) tag=ctl path=$run ro=,readonly=on ;;
        esac
        props=${1:+,$1}
        [ $# -eq 0 ] || shift
        shares+=(-fsdev "local,id=fs$id,path=${path//,/,,},security_model=none$ro"
                 -device "$model,fsdev=fs$id,mount_tag=$tag$props")
    done
}
