#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer's coverage instrumentation on STABLE Rust and
# runs each for a bounded time. What `cargo fuzz run --sanitizer none` does, without
# needing cargo-fuzz installed: the same `-Cpasses=sancov-module` and
# `-sanitizer-coverage-*` flags (all stable), `--cfg fuzzing`, debug assertions and
# overflow checks, built for the host triple so build scripts and proc macros are not
# instrumented. (AddressSanitizer needs nightly's -Zsanitizer; these decoders are safe
# Rust, where a bug shows up as a panic, which libFuzzer reports as a crash.)
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     default: 20 s each, every target
#
# Each target starts from the inputs kept in fuzz/regressions/<target>/ and writes what
# it finds to a scratch corpus; a crash leaves its input in fuzz/artifacts/<target>/
# (copy it into fuzz/regressions/<target>/ once fixed: `cargo test` replays those).
# Prints one `fuzz <target>: ok|CRASH ...` line per target; exits with the number of
# targets that crashed (or 100 if the build failed).
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
all=(client_frames peer_messages log_records store_recovery envelope peer_handshake config_toml snapshots rdma_records)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
if ! cargo build -q --release --locked --target "$host" --bins; then
    echo "fuzz: build failed"
    exit 100
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
crashed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t" "regressions/$t"
    log="$scratch/$t.log"
    # -timeout: one input taking over 10 s is a hang (a crash); -rss_limit_mb: a
    # decoder allocating without bound is a crash. The outer timeout bounds the whole run.
    timeout -k 5 $((secs + 60)) "$CARGO_TARGET_DIR/$host/release/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "$scratch/$t" "regressions/$t" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1)
    if [ "$rc" = 0 ]; then
        echo "fuzz $t: ok, ${runs:-?} inputs in ${secs} s (${cov:-cov: ?})"
    else
        crashed=$((crashed + 1))
        echo "fuzz $t: CRASH (exit $rc) after ${runs:-?} inputs; input kept in fuzz/artifacts/$t/:"
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -8
    fi
done
exit "$crashed"
