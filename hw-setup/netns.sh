#!/usr/bin/env bash
# Per-replica network namespaces joined by a bridge, for partition tests (and later the
# DPDK af_packet tests).
#
#   netns.sh create  RUN N   namespaces rlRUN-1 .. rlRUN-N and rlRUN-br (see below)
#   netns.sh destroy RUN     kill what runs inside them and delete them (idempotent)
#   netns.sh cut     RUN I   cut replica I off (its port on the bridge goes down)
#   netns.sh heal    RUN I   reconnect replica I
#   netns.sh show    RUN     addresses and link states
#
# RUN is 1..253 (it is the third byte of the addresses), N is 1..250. Layout:
#
#   rlRUN-I   lo up; eth0 = 10.77.RUN.I/24, one end of a veth pair
#   rlRUN-br  bridge br0 = 10.77.RUN.254/24 (so a process in this namespace reaches
#             every replica); vI = the other end of replica I's veth pair, a port of br0
#
# Everything is created directly inside these namespaces: the host's own interfaces,
# addresses and routes are never touched, and the 10.77.RUN.0/24 addresses exist only
# inside the namespaces. Needs root and iproute2.
#
# Exit codes: 0 done, 1 failure (create cleans up what it made), 2 usage,
# 3 (create only) RUN is in use: rlRUN-br already exists; nothing was changed.
set -euo pipefail

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "netns.sh: $*" >&2
    exit 1
}

[ $# -ge 2 ] || usage
cmd=$1
run=$2
[[ $run =~ ^[0-9]+$ ]] && [ "$run" -ge 1 ] && [ "$run" -le 253 ] || die "RUN must be 1..253, not '$run'"
command -v ip >/dev/null || die "ip (iproute2) is not installed"
[ "$(id -u)" = 0 ] || die "must run as root"

br="rl$run-br"
ns_of() { echo "rl$run-$1"; }

# Our namespaces that exist now: rlRUN-br and rlRUN-<number>.
ours() {
    ip netns list | awk '{print $1}' | grep -E "^rl$run-(br|[0-9]+)\$" || true
}

destroy() {
    local ns pid
    for ns in $(ours); do
        # Whatever still runs inside is ours (started in a namespace we created).
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    for ns in $(ours); do
        # Deleting a namespace deletes its interfaces, and with them the veth peers.
        ip netns del "$ns" 2>/dev/null || true
    done
    local left
    left=$(ours)
    [ -z "$left" ] || die "could not delete: $left"
}

replica_arg() {
    [[ ${1:-} =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 250 ] || die "replica must be 1..250, not '${1:-}'"
    ip netns list | awk '{print $1}' | grep -qx "$(ns_of "$1")" || die "no namespace $(ns_of "$1")"
}

case "$cmd" in
create)
    [ $# -eq 3 ] || usage
    n=$3
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die "N must be 1..250, not '$n'"
    # Claiming the bridge namespace is the lock on RUN.
    if ! ip netns add "$br" 2>/dev/null; then
        echo "netns.sh: run $run is in use ($br exists or cannot be created)" >&2
        exit 3
    fi
    trap 'echo "netns.sh: create failed; removing run $run" >&2; destroy' ERR
    ip -n "$br" link set lo up
    ip -n "$br" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$br" addr add "10.77.$run.254/24" dev br0
    ip -n "$br" link set br0 up
    for i in $(seq 1 "$n"); do
        ns=$(ns_of "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Both ends are created inside their namespaces (never in the host's).
        ip link add eth0 netns "$ns" type veth peer name "v$i" netns "$br"
        ip -n "$ns" addr add "10.77.$run.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$br" link set "v$i" master br0
        ip -n "$br" link set "v$i" up
    done
    trap - ERR
    ;;
destroy)
    [ $# -eq 2 ] || usage
    destroy
    ;;
cut | heal)
    [ $# -eq 3 ] || usage
    replica_arg "$3"
    state=down
    [ "$cmd" = heal ] && state=up
    ip -n "$br" link set "v$3" "$state"
    ;;
show)
    [ $# -eq 2 ] || usage
    for ns in $(ours); do
        echo "== $ns"
        ip -n "$ns" -br addr
    done
    ;;
*)
    usage
    ;;
esac
