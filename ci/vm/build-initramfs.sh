#!/bin/bash
# Build the real-VM initramfs: static busybox, ci/vm/init as /init, and the guest kernel's
# vfio + virtio-9p modules that are not built in, in the load order module_order
# (ci/vm/lib.sh) computes from their modinfo "depends=" fields.
#
#   ci/vm/build-initramfs.sh MODULES_DIR OUTPUT.cpio
#
# MODULES_DIR is the kernel's lib/modules/<release> (or a build tree), or empty for a kernel
# with all of them built in. The output is an uncompressed newc cpio (decompressing under
# TCG costs more than reading it).
set -euo pipefail

moddir=${1?usage: build-initramfs.sh MODULES_DIR OUTPUT}
out=${2:?usage: build-initramfs.sh MODULES_DIR OUTPUT}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/lib.sh"

# What the guest needs; their dependencies are added automatically.
wanted=(vfio vfio_iommu_type1 vfio-pci virtio_pci 9pnet_virtio 9p)

busybox=/bin/busybox   # from busybox-static (statically linked)
if ! [ -x "$busybox" ]; then
    echo "build-initramfs: $busybox missing (install busybox-static)" >&2
    exit 1
fi

order=
if [ -n "$moddir" ]; then
    order=$(module_order "$moddir" "${wanted[@]}") || exit 1
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
    echo "$key" >> "$stage/lib/modules/load-order"
    loaded+=("$key")
done <<< "$order"
# A console node so the kernel can open /dev/console before devtmpfs is up.
mknod -m 600 "$stage/dev/console" c 5 1

(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes; modules: ${loaded[*]:-none})" >&2
