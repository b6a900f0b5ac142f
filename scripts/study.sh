#!/usr/bin/env bash
# Run a study one run at a time, committing each finished run's record (results/<study>/runs/) as it
# lands, so that an interrupted session loses at most the run in progress (whose checkpoints in the
# user cache let it resume on the same machine). The first argument names the study (isoflop, the
# default, isoflop-tuned, continual, or an ablation: experts, active, querynorm, expert-lr, placement, or
# any other registered in peerlm/study/ablations.py); the rest go to `peerlm study`.
# When every planned run has a record, the reports (table.md, summary.json, plots) are written and
# committed too. Two studies, or two lanes of one study, may run side by side (one thread each): each
# run is claimed while it trains, a lane takes the next run nobody holds, and commits take turns.
set -euo pipefail
cd "$(dirname "$0")/.."
study=isoflop
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then study=$1; shift; fi
results=results/$study
bash scripts/setup.sh dev,study >/dev/null
commit() {  # only this study's results: whatever else is staged or edited stays as it is
    for _ in 1 2 3 4 5; do
        if git add -- "$results" && git commit -q -m "$1" -- "$results"; then return 0; fi
        sleep 3  # the other study, or an editor, holds the index
    done
    echo "study: commit deferred (git busy); the next one takes it"
}
while true; do
    out=$(.venv/bin/peerlm study "$study" --max-runs 1 "$@" | tee /dev/stderr)
    done_id=$(printf '%s\n' "$out" | sed -n 's/^\(study\|continual\): done \([^:]*\):.*/\2/p' | tail -1)
    if [ -n "$done_id" ]; then
        commit "$study study: record of run $done_id"
    fi
    if printf '%s\n' "$out" | grep -q "every planned \(run\|finetune\) has a record"; then
        commit "$study study: reports from the finished records"
        break
    fi
    if printf '%s\n' "$out" | grep -q "every pending \(run\|finetune\) is being run by another process"; then
        break  # the lane that finishes last writes the reports
    fi
done
