#!/bin/bash
# The whole real-kernel check, as CI runs it, for each kernel (6.1, 6.12): the suite on the
# fake with that kernel's profile, the suite and the probe on that Linux in the CI VM; then
# one side-by-side report over all the runs, and each kernel's probe replayed on the fake.
#
#   ci/fake-vs-real.sh [RESULTS_DIR]      (default: results/)
#
# Writes RESULTS/fake-K.json and .xml, RESULTS/real-K/ (ci/real-vm.sh's results: real.json,
# probe.json, console.log, ...) for each kernel K, and RESULTS/report.html.
# Fails if any step fails: a real test failing, a divergence between the backends, or a probe
# answer the fake gives differently. Every step runs, so one run shows every problem.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results=${1:-results}
kernels=(6.1 6.12)
mkdir -p "$results"
# A file an earlier run left must not stand in for one this run failed to write.
for k in "${kernels[@]}"; do
    rm -f "$results/fake-$k.json" "$results/fake-$k.xml" "$results/real-$k/real.json" \
        "$results/real-$k/real.xml" "$results/real-$k/probe.json"
done
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
for k in "${kernels[@]}"; do
    step "real-vm $k" bash ci/real-vm.sh --kernel "$k" --results "$results/real-$k"
done
runs=() missing=()
for k in "${kernels[@]}"; do
    for f in "$results/fake-$k.json" "$results/real-$k/real.json"; do
        if [ -f "$f" ]; then runs+=("$f"); else missing+=("$f"); fi
    done
done
if [ ${#missing[@]} -eq 0 ]; then
    step report python3 -m conformance.cli report "${runs[@]}" --html "$results/report.html"
else
    failed+=("report (no ${missing[*]})")
fi
for k in "${kernels[@]}"; do
    if [ -f "$results/real-$k/probe.json" ]; then
        step "probe $k" python3 -m conformance.probe compare "$results/real-$k/probe.json"
    else
        failed+=("probe $k (the VM recorded no probe)")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'fake-vs-real: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fake-vs-real: passed; report in $results/report.html"
