#!/bin/bash
# The whole real-kernel check, as CI runs it: for each kernel (6.1, 6.12), the suite on the fake
# with that kernel's profile; the suite and the probe on that Linux in each CI guest (the x86 VM's
# vfio-pci devices, the arm64 guest's vfio-platform and vfio-amba devices; the s390x guest's
# vfio-ccw mdev on the one kernel it builds, 6.1); the fake's suite in the s390x guest (a
# big-endian host); then one side-by-side report over the real runs and the fakes of their
# kernels, and each guest's probe replayed on the fake.
#
#   ci/fake-vs-real.sh [RESULTS_DIR]      (default: results/)
#
# Writes RESULTS/fake-K.json and .xml for each kernel K, RESULTS/real-K/, RESULTS/real-arm64-K/
# and RESULTS/real-s390x-6.1/ (ci/real-vm.sh's results: real.json, probe.json, console.log,
# ...), RESULTS/fake-s390x-6.1/ (fake.json, fake.xml, console.log) and RESULTS/report.html.
# Fails if any step fails: a real test failing, a fake test failing on s390x, a divergence
# between the backends, or a probe answer the fake gives differently. Every step runs, so one
# run shows every problem.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results=${1:-results}
kernels=(6.1 6.12)
# The guests' runs, "ARCH K" each, in this order.
guest_runs=("amd64 6.1" "amd64 6.12" "arm64 6.1" "arm64 6.12" "s390x 6.1")
# The fake's suite in the s390x guest: its kernel, and its time limit under TCG.
s390x_fake=6.1 s390x_fake_timeout=3600
real_dir() { # real_dir "ARCH K": that run's results (ci/real-vm.sh's default name)
    local arch k
    read -r arch k <<< "$1"
    if [ "$arch" = amd64 ]; then echo "$results/real-$k"; else echo "$results/real-$arch-$k"; fi
}
mkdir -p "$results"
real_dirs=()
for r in "${guest_runs[@]}"; do real_dirs+=("$(real_dir "$r")"); done
fake_s390x_dir=$results/fake-s390x-$s390x_fake
# A file an earlier run left must not stand in for one this run failed to write.
for k in "${kernels[@]}"; do rm -f "$results/fake-$k.json" "$results/fake-$k.xml"; done
for d in "${real_dirs[@]}"; do rm -f "$d/real.json" "$d/real.xml" "$d/probe.json"; done
rm -f "$fake_s390x_dir/fake.json" "$fake_s390x_dir/fake.xml"
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
for r in "${guest_runs[@]}"; do
    read -r arch k <<< "$r"
    step "real-vm $r" bash ci/real-vm.sh --arch "$arch" --kernel "$k" --results "$(real_dir "$r")"
done
# shellcheck disable=SC2016  # expanded in the guest
step "fake s390x $s390x_fake" bash ci/real-vm.sh --arch s390x --kernel "$s390x_fake" --results "$fake_s390x_dir" \
    --timeout "$s390x_fake_timeout" -- sh -c 'exec python3 -m conformance.cli run --backend fake --kernel "$1" -n 1 \
        --json "$VFIO_REAL_RESULTS/fake.json" --junit "$VFIO_REAL_RESULTS/fake.xml"' sh "$s390x_fake"
runs=() missing=()
for k in "${kernels[@]}"; do
    files=("$results/fake-$k.json")
    for r in "${guest_runs[@]}"; do
        [ "${r#* }" = "$k" ] && files+=("$(real_dir "$r")/real.json")
    done
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
