#!/bin/sh
# The default guest command of ci/real-vm.sh, for every guest: the conformance suite on the real
# kernel and the devices the guest bound ($VFIO_REAL_DEVICES: PCI addresses on amd64; on arm64
# 9010000.pl031, 9030000.pl061 and a000000.virtio_mmio; on s390x the vfio-ccw mdev's sysfs path),
# then the probe recording. Destructive tests run, since the devices are QEMU's and die with the VM.
# Runs in the guest chroot, cwd = the repo root; results go to $VFIO_REAL_RESULTS, the run's results
# directory (per kernel: results/real-6.1/, results/real-6.12/, results/real-arm64-6.12/,
# results/real-s390x-6.1/, ...): real.json, real.xml, probe.json.
set -u
out=${VFIO_REAL_RESULTS:?set by ci/real-vm.sh}
set --
for d in ${VFIO_REAL_DEVICES:?set by ci/real-vm.sh}; do set -- "$@" --device "$d"; done
python3 -m conformance.cli run --backend real --destructive \
    --json "$out/real.json" --junit "$out/real.xml" "$@"
suite=$?
# shellcheck disable=SC2086  # one device per word
python3 -m conformance.probe record "$out/probe.json" $VFIO_REAL_DEVICES
probe=$?
[ "$suite" -ne 0 ] && exit "$suite"
exit "$probe"
