#!/usr/bin/env bash
# replog's whole test suite, for a fresh Debian 12 machine (run as root so it can
# install packages and mount the small filesystems the store's error tests need).
#
#   ./test.sh            everything (what .ci/run runs)
#
# Tests that need something absent fail here instead of skipping: REPLOG_REQUIRE_ALL=1.
# (Plain `cargo test` may skip them, and then says why.)
set -euo pipefail
cd "$(dirname "$0")"
export REPLOG_REQUIRE_ALL=1
export CARGO_TERM_COLOR=never

# System packages the suite needs. DPDK: dpdk-sys builds against libdpdk-dev with bindgen
# (libclang-dev). RDMA: rdma-sys builds against libibverbs-dev and librdmacm-dev with
# bindgen; its tests run in the soft-RoCE VM (qemu; `hw-setup/rxe-vm.sh setup` below
# fetches the kernel and the rest of what the VM needs). Fuzzing: libfuzzer-sys compiles
# libFuzzer (C++) with g++. ndctl: the VM makes its emulated device-dax with the host's.
PKGS=(util-linux iproute2 etcd-server libdpdk-dev dpdk libclang-dev pkg-config
    rdma-core ibverbs-providers libibverbs-dev librdmacm-dev qemu-system-x86 g++ openssl ndctl)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p transport -p replog -p bench --features transport/rdma,replog/rdma,bench/rdma --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace -q

echo "== unit, integration, property and crash tests (contracts on)"
set +e
# store_pmem needs a DAX filesystem, which the host lacks: it runs in the VM below (the
# RDMA step's boot, on the VM's emulated pmem) and only says so here.
REPLOG_TEST_PMEM_IN_VM=1 cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
set -e

echo "== DPDK: unit tests, transport conformance and replica processes on af_packet vdevs (--features dpdk)"
# cargo test --workspace enables no features: the DPDK backend builds and runs here.
dpdk_log=$(mktemp)
dpdk_rc=0
set +e
cargo clippy -p transport -p replog -p bench --all-targets --features transport/dpdk,replog/dpdk,bench/dpdk -- -D warnings || dpdk_rc=1
(
    rc=0
    cargo test -p transport --features transport/dpdk --no-fail-fast --lib -- dpdk:: || rc=1
    cargo test -p transport --features transport/dpdk --no-fail-fast --test dpdk_conformance || rc=1
    cargo test -p replog --features replog/dpdk --no-fail-fast --test config_dpdk --test process_dpdk --test process_up_dpdk || rc=1
    exit $rc
) 2>&1 | tee "$dpdk_log"
[ "${PIPESTATUS[0]}" = 0 ] || dpdk_rc=1
set -e
dpdk_passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$dpdk_log" | awk '{s+=$4} END {print s+0}')
dpdk_failed=$(grep -Eo '[0-9]+ failed;' "$dpdk_log" | awk '{s+=$1} END {print s+0}')
rm -f "$dpdk_log"
# The benchmark over DPDK, short: 3 replicas as processes in namespaces rlbench-1..3 on
# af_packet vdevs (bridge rlbench-br), the raw DPDK ping-pong baseline, memory + fsync at
# 1 and 4 clients; exits non-zero if anything could not run (root, iproute2, the build).
echo "== DPDK: bench --short --transport dpdk (replicas over DPDK in namespaces, DPDK ping-pong baseline)"
bench_dpdk_out=$(mktemp -d)
if cargo build -q --release -p replog -p bench --features bench/dpdk &&
    timeout 300 "${CARGO_TARGET_DIR:-target}/release/bench" --short --transport dpdk --out "$bench_dpdk_out" 2>&1 | tail -25; then
    dpdk_passed=$((dpdk_passed + 1))
else
    dpdk_failed=$((dpdk_failed + 1))
    echo "FAILED: bench --short --transport dpdk"
fi
rm -rf "$bench_dpdk_out"
dpdk_run=$((dpdk_passed + dpdk_failed))
echo "dpdk tests: $dpdk_run run, $dpdk_passed passed"
if [ "$dpdk_run" = 0 ] || { [ "$dpdk_rc" != 0 ] && [ "$dpdk_failed" = 0 ]; }; then dpdk_failed=$((dpdk_failed + 1)); fi

sim_passed=0
sim_failed=0
sim() { # one simulator run; it exits non-zero on any violation (or an uncaught bug)
    if cargo run -q --release -p paxos --example sim -- "$@" 2>&1 | tail -3; then
        sim_passed=$((sim_passed + 1))
    else
        sim_failed=$((sim_failed + 1))
        echo "FAILED: sim $*"
    fi
}

echo "== simulator: many seeds, default and harsh fault mixes (a third with acceptance by landing)"
sim --seeds 3000
sim --seeds 1000 --start 1000000 --hunting

echo "== simulator: every planted bug must be caught"
for bug in skip-value-adoption accept-lower-ballot double-count-vote ack-before-sync commit-without-quorum \
    leader-votes-before-sync ignore-trimmed-promiser early-new-quorum trim-at-applied promise-before-drain; do
    sim --seeds 10000 --hunting --no-permission-check --bug "$bug"
done

echo "== bench: short mode (3 replicas memory + fsync, etcd peer, baselines; checks the harness)"
bench_out=$(mktemp -d)
if cargo build -q --release -p replog -p bench && "${CARGO_TARGET_DIR:-target}/release/bench" --short --out "$bench_out" 2>&1 | tail -30; then sim_passed=$((sim_passed + 1)); else sim_failed=$((sim_failed + 1)); echo "FAILED: bench --short"; fi; rm -rf "$bench_out"

echo "== RDMA: transport tests and a 3-replica cluster over rxe0, inside the soft-RoCE VM (one boot; the bench in a second)"
echo "   with the store's pmem mode on the VM's emulated pmem (ext4 -o dax, MAP_SYNC), and the RDMA log region"
echo "   on its emulated device-dax (/dev/daxN.0, ndctl), in the same boot"
# Zero tests run, a build or VM failure, or any failed test counts as a failure.
rdma_run=0
rdma_passed=0
rdma_log=$(mktemp)
rdma_bin=""
rdma_cluster_bin=""
rdma_read_bin=""
pmem_bin=""
rdma_landing_bin=""
rdma_pmem_bin=""
test_bin() { # package, test target: the test binary's path
    cargo test -p "$1" --features rdma --test "$2" --no-run --message-format=json 2>/dev/null |
        grep "\"name\":\"$2\"" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
if hw-setup/rxe-vm.sh setup >"$rdma_log" 2>&1; then
    rdma_bin=$(test_bin transport rdma)
    rdma_cluster_bin=$(test_bin replog process_rdma)
    rdma_read_bin=$(test_bin replog rdma_read)
    pmem_bin=$(test_bin replog store_pmem)
    rdma_landing_bin=$(test_bin replog rdma_landing)
    rdma_pmem_bin=$(test_bin replog process_rdma_pmem)
else
    tail -20 "$rdma_log"
    echo "FAILED: hw-setup/rxe-vm.sh setup"
fi
if [ -n "$rdma_bin" ] && [ -n "$rdma_cluster_bin" ] && [ -n "$rdma_read_bin" ] && [ -n "$pmem_bin" ] &&
    [ -n "$rdma_landing_bin" ] && [ -n "$rdma_pmem_bin" ]; then
    # RXE_PMEM: the VM's emulated pmem DAX filesystem for store_pmem and process_rdma_pmem
    # (REPLOG_TEST_PMEM_DIR); RXE_DEVDAX x RXE_DEVDAX_COUNT: four device-dax devices, the
    # first for the transport's region test (REPLOG_TEST_DEVDAX), the last three for
    # process_rdma_pmem's replicas' cell rings (REPLOG_TEST_DEVDAX_ALL): separate, so no
    # test sees another's ring contents (the rings keep them, that is the point). The
    # run fails (exit 125, no tests) if either cannot be set up. Two cluster runs (fsync,
    # memory) of up to a few minutes each under TCG, and the pmem cluster (under a
    # minute): more time than the default.
    # shellcheck disable=SC2016 # expanded inside the VM
    RXE_PMEM=256M RXE_DEVDAX=128M RXE_DEVDAX_COUNT=4 RXE_TIMEOUT=1200 hw-setup/rxe-vm.sh run -- sh -c \
        '"$0" --test-threads 1; "$1" --test-threads 1 --nocapture; "$2" --nocapture; "$3" --test-threads 1 --nocapture; "$4" --test-threads 1; "$5" --nocapture' \
        "$rdma_bin" "$rdma_cluster_bin" "$rdma_read_bin" "$pmem_bin" "$rdma_landing_bin" "$rdma_pmem_bin" 2>&1 | tee "$rdma_log" |
        grep -E '^test |panicked|^rdma( \([a-z]+\))?: |^pmem: |^pmem-rdma: |^SKIP |rxe-vm.sh' || true
    rdma_run=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "$rdma_log" | awk '{s+=$4+$6} END {print s+0}')
    rdma_passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$rdma_log" | awk '{s+=$4} END {print s+0}')
else
    echo "FAILED: no RDMA/pmem test binaries (cargo test -p transport/-p replog --features rdma --no-run)"
fi
rm -f "$rdma_log"
rdma_tests_run=$rdma_run
# The benchmark over RDMA, short, in a boot of its own: 3 replicas as `replog serve`
# processes over rxe0, the raw RDMA one-sided-write ping-pong baseline, memory + fsync at
# 1 and 4 clients. The host's / is read-only in the VM: results and the replicas' data go
# to the VM's /tmp (a tmpfs, thrown away at power-off). Counted as one RDMA test.
echo "== RDMA: bench --short --transport rdma (replicas over rxe0 in the VM, RDMA ping-pong baseline)"
if cargo build -q --release -p replog -p bench --features bench/rdma &&
    RXE_PMEM=0 RXE_TIMEOUT=600 hw-setup/rxe-vm.sh run -- "${CARGO_TARGET_DIR:-target}/release/bench" --short --transport rdma \
        --out /tmp/bench-rdma-out 2>&1 | tail -25; then
    rdma_passed=$((rdma_passed + 1))
else
    echo "FAILED: bench --short --transport rdma (in the soft-RoCE VM)"
fi
rdma_run=$((rdma_run + 1))
echo "rdma tests: $rdma_run run, $rdma_passed passed"
rdma_failed=$((rdma_run - rdma_passed))
if [ "$rdma_tests_run" = 0 ]; then rdma_failed=$((rdma_failed + 1)); fi

echo "== fuzz: every decoder of network and disk input, 20 s each (fuzz/run.sh; a crash is a failure)"
fuzz_log=$(mktemp)
set +e
fuzz/run.sh 20 2>&1 | tee "$fuzz_log"
fuzz_rc=${PIPESTATUS[0]}
set -e
fuzz_passed=$(grep -c '^fuzz [a-z_]*: ok' "$fuzz_log" || true)
fuzz_failed=$(grep -c '^fuzz [a-z_]*: CRASH' "$fuzz_log" || true)
if [ "$fuzz_rc" != 0 ] && [ "$fuzz_failed" = 0 ]; then fuzz_failed=1; echo "FAILED: fuzz/run.sh (exit $fuzz_rc)"; fi
rm -f "$fuzz_log"

passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "cargo test: $passed passed, $failed failed (exit $test_rc); simulator and bench runs: $sim_passed passed, $sim_failed failed; fuzz targets: $fuzz_passed passed, $fuzz_failed failed"
if [ "$test_rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "dpdk tests: $dpdk_run run, $dpdk_passed passed, $dpdk_failed failed"
echo "summary: $((passed + sim_passed + dpdk_passed + rdma_passed + fuzz_passed)) passed, $((failed + sim_failed + dpdk_failed + rdma_failed + fuzz_failed)) failed"
[ "$test_rc" = 0 ] && [ "$sim_failed" = 0 ] && [ "$dpdk_failed" = 0 ] && [ "$rdma_failed" = 0 ] && [ "$fuzz_failed" = 0 ]
