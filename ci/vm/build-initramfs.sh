#!/bin/bash
# Build the real-VM initramfs: static busybox, ci/vm/init as /init, and the
# guest kernel's vfio + virtio-9p modules with a load order computed from
# their modinfo "depends=" fields (the kernel deb ships no modules.dep).
#
#   ci/vm/build-initramfs.sh MODULES_DIR OUTPUT.cpio
#
# MODULES_DIR is the unpacked kernel's lib/modules/<version>. The output is an
# uncompressed newc cpio (decompressing under TCG costs more than reading it).
set -euo pipefail

moddir=${1:?usage: build-initramfs.sh MODULES_DIR OUTPUT}
out=${2:?usage: build-initramfs.sh MODULES_DIR OUTPUT}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# What the guest needs; their dependencies are added automatically.
wanted=(vfio vfio_iommu_type1 vfio-pci virtio_pci 9pnet_virtio 9p)

busybox=/bin/busybox   # from busybox-static (statically linked)
if ! [ -x "$busybox" ]; then
    echo "build-initramfs: $busybox missing (install busybox-static)" >&2
    exit 1
fi

# Index every module file by its name (dashes and underscores are equivalent).
declare -A path_of
while IFS= read -r -d '' f; do
    b=${f##*/}; b=${b%%.ko*}; path_of[${b//-/_}]=$f
done < <(find "$moddir" -name '*.ko' -print0 -o -name '*.ko.xz' -print0 \
            -o -name '*.ko.zst' -print0 -o -name '*.ko.gz' -print0)

declare -A state   # "" unvisited, 1 visiting, 2 done
order=()
visit() {
    local key=${1//-/_}
    case ${state[$key]:-} in
        2) return ;;
        1) echo "build-initramfs: dependency cycle at $key" >&2; exit 1 ;;
    esac
    local f=${path_of[$key]:-}
    if [ -z "$f" ]; then
        echo "build-initramfs: module $1 not found under $moddir" >&2; exit 1
    fi
    state[$key]=1
    local deps d
    deps=$(modinfo -F depends "$f")
    for d in ${deps//,/ }; do visit "$d"; done
    state[$key]=2
    order+=("$key")
}
for m in "${wanted[@]}"; do visit "$m"; done

stage=$(mktemp -d "${out}.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,lib/modules}
cp "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m 0755 "$here/init" "$stage/init"
for key in "${order[@]}"; do
    f=${path_of[$key]}; dst=$stage/lib/modules/$key.ko
    case $f in
        *.ko.xz)  xz -dc "$f" > "$dst" ;;
        *.ko.zst) zstd -qdc "$f" > "$dst" ;;
        *.ko.gz)  gzip -dc "$f" > "$dst" ;;
        *)        cp "$f" "$dst" ;;
    esac
    echo "$key" >> "$stage/lib/modules/load-order"
done
# A console node so the kernel can open /dev/console before devtmpfs is up.
mknod -m 600 "$stage/dev/console" c 5 1

(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes; modules: ${order[*]})" >&2
