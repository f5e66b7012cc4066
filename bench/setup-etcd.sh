#!/usr/bin/env bash
# Installs the etcd peer the benchmark compares against: Debian's etcd-server (3.4).
# Needs root (or sudo) and the Debian package registry. Idempotent.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    echo "etcd already installed: $(etcd --version 2>/dev/null | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq etcd-server
# The package starts a system etcd on 2379/2380; the bench uses its own ports, but a
# service left running only costs CPU on a 2-core machine: stop it where systemd runs.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl stop etcd || true
fi
echo "installed: $(etcd --version | head -1)"
