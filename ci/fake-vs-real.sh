#!/bin/bash
# The whole real-kernel check, as CI runs it: for each kernel (6.1, 6.12), the suite on the fake
# with that kernel's profile; the suite and the probe on that Linux in each CI guest (the x86 VM's
# vfio-pci devices, the arm64 guest's vfio-platform and vfio-amba devices); then one side-by-side
# report over all the runs, and each guest's probe replayed on the fake.
#
#   ci/fake-vs-real.sh [RESULTS_DIR]      (default: results/)
#
# Writes RESULTS/fake-K.json and .xml for each kernel K, RESULTS/real-K/ and
# RESULTS/real-arm64-K/ (ci/real-vm.sh's results: real.json, probe.json, console.log, ...), and
# RESULTS/report.html. Fails if any step fails: a real test failing, a divergence between the
# backends, or a probe answer the fake gives differently. Every step runs, so one run shows
# every problem.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results=${1:-results}
kernels=(6.1 6.12)
# Each guest: the name of its results directory for kernel K (real-$prefixK) and its arch.
guests=(":amd64" "arm64-:arm64")
mkdir -p "$results"
real_dirs=()
for k in "${kernels[@]}"; do
    for g in "${guests[@]}"; do real_dirs+=("$results/real-${g%%:*}$k"); done
done
# A file an earlier run left must not stand in for one this run failed to write.
for k in "${kernels[@]}"; do rm -f "$results/fake-$k.json" "$results/fake-$k.xml"; done
for d in "${real_dirs[@]}"; do rm -f "$d/real.json" "$d/real.xml" "$d/probe.json"; done
failed=()
step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" || failed+=("$name (exit $?)")
}
for k in "${kernels[@]}"; do
    step "fake $k" python3 -m conformance.cli run --backend fake --kernel "$k" -n 2 \
        --json "$results/fake-$k.json" --junit "$results/fake-$k.xml"
done
for g in "${guests[@]}"; do
    for k in "${kernels[@]}"; do
        step "real-vm ${g#*:} $k" bash ci/real-vm.sh --arch "${g#*:}" --kernel "$k" \
            --results "$results/real-${g%%:*}$k"
    done
done
runs=() missing=()
for k in "${kernels[@]}"; do
    files=("$results/fake-$k.json")
    for g in "${guests[@]}"; do files+=("$results/real-${g%%:*}$k/real.json"); done
    for f in "${files[@]}"; do
        if [ -f "$f" ]; then runs+=("$f"); else missing+=("$f"); fi
    done
done
if [ ${#missing[@]} -eq 0 ]; then
    step report python3 -m conformance.cli report "${runs[@]}" --html "$results/report.html"
else
    failed+=("report (no ${missing[*]})")
fi
for d in "${real_dirs[@]}"; do
    if [ -f "$d/probe.json" ]; then
        step "probe ${d##*/}" python3 -m conformance.probe compare "$d/probe.json"
    else
        failed+=("probe ${d##*/} (the guest recorded no probe)")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'fake-vs-real: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fake-vs-real: passed; report in $results/report.html"
