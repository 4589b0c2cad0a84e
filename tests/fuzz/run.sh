#!/bin/sh
# Run each fuzz target for a while: run.sh SECONDS TARGET...
# Each starts from its seed corpus tests/fuzz/corpus/<target> and adds what
# it finds to $FUZZ_DIR/corpus/<target> (default build/fuzz); a crash,
# leak or timeout leaves its input in $FUZZ_DIR/artifacts/ and fails the
# run.  FUZZ_JOBS=N runs N processes per target (libFuzzer -fork).
# Prints each target's last libFuzzer status line (executions, cov, ft).
set -u
secs=$1
shift
dir=${FUZZ_DIR:-build/fuzz}
fail=0
mkdir -p "$dir/artifacts"
for t in "$@"; do
    mkdir -p "$dir/corpus/$t"
    log="$dir/fuzz-$t.log"
    fork=""
    [ "${FUZZ_JOBS:-1}" -gt 1 ] && fork="-fork=$FUZZ_JOBS -ignore_crashes=1"
    # Leaks: LeakSanitizer per input (detect_leaks) and the target's own
    # fd and memfd-mapping count; -rss_limit_mb bounds memory growth.
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "build/fuzz/fuzz-$t" -max_total_time="$secs" -detect_leaks=1 -timeout=20 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/artifacts/$t-" \
        $fork "$dir/corpus/$t" "tests/fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    if [ $rc -eq 0 ]; then
        echo "fuzz $t: ok, $secs s: $last"
    else
        echo "fuzz $t: FAILED (exit $rc), see $log:" >&2
        grep -E 'ERROR|SUMMARY|leaked|fuzz_|artifact' "$log" | head -n 20 >&2
        fail=1
    fi
done
exit $fail
