#!/bin/bash
# Build the real-VM initramfs: a static busybox, ci/vm/init as /init, and the guest kernel's
# modules for the MODULEs that are not built in, in the load order module_order
# (ci/vm/lib.sh) computes from their modinfo "depends=" fields.
#
#   ci/vm/build-initramfs.sh [--busybox FILE] [--own DIR] MODULES_DIR OUTPUT 'MODULE [PARAM=VALUE...]'...
#
# MODULES_DIR is the kernel's lib/modules/<release> (or a build tree), or empty for a kernel
# with all of them built in; modules under --own DIR (built by ci/vm/arm64.sh) are taken
# instead of MODULES_DIR's of the same name. A MODULE's PARAMs go to its insmod. --busybox:
# the guest's (default /bin/busybox, from busybox-static). The output is an uncompressed newc
# cpio (decompressing under TCG costs more than reading it).
set -euo pipefail

busybox=/bin/busybox
own=()
while [ $# -gt 0 ]; do
    case $1 in
        --busybox) busybox=$2; shift 2 ;;
        --own) own=(--own "$2"); shift 2 ;;
        *) break ;;
    esac
done
usage="usage: build-initramfs.sh [--busybox FILE] [--own DIR] MODULES_DIR OUTPUT MODULE..."
moddir=${1?$usage}
out=${2:?$usage}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/lib.sh"

wanted=()
declare -A params=()
for w in "$@"; do
    name=${w%% *}
    wanted+=("$name")
    [ "$w" = "$name" ] || params[${name//-/_}]=${w#* }
done

if ! [ -x "$busybox" ]; then
    echo "build-initramfs: $busybox missing (install busybox-static)" >&2
    exit 1
fi

order=
if [ -n "$moddir" ]; then
    order=$(module_order "${own[@]}" "$moddir" "${wanted[@]}") || exit 1
fi

stage=$(mktemp -d "${out}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,lib/modules}
cp "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m 0755 "$here/init" "$stage/init"
loaded=()
: > "$stage/lib/modules/load-order"
while read -r key f; do
    [ -n "$key" ] || continue
    dst=$stage/lib/modules/$key.ko
    case $f in
        *.ko.xz)  xz -dc "$f" > "$dst" ;;
        *.ko.zst) zstd -qdc "$f" > "$dst" ;;
        *.ko.gz)  gzip -dc "$f" > "$dst" ;;
        *)        cp "$f" "$dst" ;;
    esac
    echo "$key${params[$key]:+ ${params[$key]}}" >> "$stage/lib/modules/load-order"
    loaded+=("$key")
done <<< "$order"
# A console node so the kernel can open /dev/console before devtmpfs is up.
mknod -m 600 "$stage/dev/console" c 5 1

(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes; modules: ${loaded[*]:-none})" >&2
