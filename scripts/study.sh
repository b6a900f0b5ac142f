#!/usr/bin/env bash
# Run the isoFLOP study one run at a time, committing each finished run's record (results/isoflop/runs/)
# as it lands, so that an interrupted session loses at most the run in progress (whose checkpoints in
# the user cache let it resume on the same machine). Extra arguments go to `peerlm study isoflop`.
# When every planned run has a record, the reports (table.md, summary.json, plots) are written and
# committed too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,study >/dev/null
commit() {  # only the study's results: whatever else is staged or edited stays as it is
    git add results/isoflop
    git commit -q -m "$1" -- results/isoflop || echo "study: commit deferred (git busy); the next one takes it"
}
while true; do
    out=$(.venv/bin/peerlm study isoflop --max-runs 1 "$@" | tee /dev/stderr)
    done_id=$(printf '%s\n' "$out" | sed -n 's/^study: done \([^:]*\):.*/\1/p' | tail -1)
    if [ -n "$done_id" ]; then
        commit "isoFLOP study: record of run $done_id"
    fi
    if printf '%s\n' "$out" | grep -q "every planned run has a record"; then
        commit "isoFLOP study: reports from the finished records"
        break
    fi
done
