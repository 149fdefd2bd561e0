#!/bin/bash
# The whole real-kernel check, as CI runs it: the suite on the fake, the suite and the probe
# on Linux in the CI VM, then the side-by-side report and the probe replayed on the fake.
#
#   ci/fake-vs-real.sh [RESULTS_DIR]      (default: results/)
#
# Fails if any step fails: a real test failing, a divergence between the backends, or a probe
# answer the fake gives differently. Every step runs, so one run shows every problem.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results=${1:-results}
mkdir -p "$results"
failed=()
step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" || failed+=("$name (exit $?)")
}
step fake python3 -m conformance.cli run --backend fake -n 2 \
    --json "$results/fake.json" --junit "$results/fake.xml"
step real-vm bash ci/real-vm.sh --results "$results/real"
if [ -f "$results/fake.json" ] && [ -f "$results/real/real.json" ]; then
    step report python3 -m conformance.cli report "$results/fake.json" "$results/real/real.json" \
        --html "$results/report.html"
else
    failed+=("report (a run wrote no JSON)")
fi
if [ -f "$results/real/probe.json" ]; then
    step probe python3 -m conformance.probe compare "$results/real/probe.json"
else
    failed+=("probe (the VM recorded no probe)")
fi
if [ ${#failed[@]} -gt 0 ]; then
    printf 'fake-vs-real: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fake-vs-real: passed; report in $results/report.html"
