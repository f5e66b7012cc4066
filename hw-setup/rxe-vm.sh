#!/usr/bin/env bash
# A throw-away soft-RoCE (rdma_rxe) VM for the RDMA transport's tests, on a host whose
# own kernel has no RDMA and no modules.
#
#   rxe-vm.sh setup              install the packages (apt-get), fetch and unpack the newest
#                                linux-image-6.12.*+deb12-amd64-unsigned, build the initramfs
#                                (idempotent: reuses the cache when it is complete)
#   rxe-vm.sh run -- CMD [ARG..] boot the VM, bring up rxe0, run CMD in it as root, print
#                                its stdout/stderr, power off; exit with CMD's exit code
#   rxe-vm.sh selftest           ibv_devices, ibv_rc_pingpong, ib_write_lat, rdma_cm in the VM
#
# The VM (qemu, software emulation: no KVM) boots Debian's 6.12 kernel with a tiny busybox
# initramfs that mounts the host's own / read-only over virtfs and chroots into it, so
# binaries built on the host run unchanged. Inside: veth0/veth1 (10.77.0.1/24 on veth0),
# one rxe device rxe0 on veth0, shared by every process in the VM. CMD runs in the host's
# current directory (read-only) with env RXE_DEV=rxe0 RXE_GID_INDEX=1 RXE_IP=10.77.0.1
# TMPDIR=/tmp; /tmp, /var/tmp, /run and /dev/shm are empty tmpfs in the VM; everything
# else (HOME=/root included) is the host's, read-only, unless RXE_OVERLAY lists it.
# Emulated persistent memory (RXE_PMEM=256M, say): a legacy pmem region reserved
# with the kernel parameter memmap=SIZE!START becomes /dev/pmem0, which gets a fresh
# ext4 mounted with -o dax on /run/pmem (MAP_SYNC mappings work there); CMD gets
# REPLOG_TEST_PMEM_DIR=/run/pmem.
# Emulated device-DAX (RXE_DEVDAX=128M, say): another legacy pmem region (its own
# memmap= range, above RXE_PMEM's) reconfigured by ndctl as a device-dax namespace,
# the character device /dev/daxN.0 that RDMA can register (fsdax pages cannot be
# pinned long-term: ibv_reg_mr on an fsdax mapping fails with EOPNOTSUPP); CMD gets
# REPLOG_TEST_DEVDAX=/dev/daxN.0. RXE_DEVDAX_COUNT=N makes N such devices (one region
# and memmap= range each, in address order); CMD gets REPLOG_TEST_DEVDAX (the first)
# and REPLOG_TEST_DEVDAX_ALL (all of them, space-separated).
#
# Environment:
#   RXE_CACHE     cache directory (default /var/tmp/replog-rxe), any host directory (the
#                 VM reads the kernel's modules from it through the shared /)
#   RXE_TIMEOUT   seconds for the whole run, boot included (default 600); on expiry
#                 qemu is killed and the exit code is 124
#   RXE_MEM       VM memory (default 2G)      RXE_SMP   VM CPUs (default 2)
#   RXE_PMEM      size of an emulated pmem DAX filesystem on /run/pmem, e.g. 256M (a
#                 multiple of 2M; default none: it adds about 4 s to the boot), added
#                 to the VM's memory; if it cannot be set up the run fails (exit 125)
#                 instead of running CMD without it
#   RXE_DEVDAX    size of an emulated device-dax region, e.g. 128M (a multiple of 2M;
#                 default none), added to the VM's memory like RXE_PMEM; exit 125 if it
#                 cannot be set up. Usable bytes are a little less (ndctl keeps the
#                 struct pages and an info block in the namespace)
#   RXE_DEVDAX_COUNT  how many device-dax devices of RXE_DEVDAX each (default 1; 1 to
#                 8), each in its own region 128 MiB-aligned above the previous one
#   RXE_WRITABLE  extra host directories (space-separated) to cover with an empty tmpfs
#   RXE_OVERLAY   host directories (space-separated) made writable in the VM by an
#                 overlay: the host's files are visible, writes are thrown away
#   RXE_PASSENV   extra environment variable names to pass into the VM; variables named
#                 REPLOG_*, RUST_*, CARGO_* and RXE_TEST_* always pass
#   RXE_KEEP_LOG  a path: keep the VM's serial console log there
#   RXE_QUIET     1: no progress lines from this script on stderr
#
# Exit codes: run: CMD's exit code; 124 timeout; 125 the VM did not boot, or rxe0 (or
# the pmem filesystem, or the devdax device) did not come up, or CMD could not be started (the reason is
# printed). setup: 0 or 1. selftest: 0 all PASS, 1 a FAIL. 2: usage. Needs root.
set -euo pipefail

ME=rxe-vm.sh
CACHE=${RXE_CACHE:-/var/tmp/replog-rxe}
TIMEOUT=${RXE_TIMEOUT:-600}
MEM=${RXE_MEM:-2G}
SMP=${RXE_SMP:-2}
PMEM=${RXE_PMEM:-0}
DEVDAX=${RXE_DEVDAX:-0}
DEVDAX_COUNT=${RXE_DEVDAX_COUNT:-1}
KPATTERN='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
PACKAGES=(qemu-system-x86 busybox-static kmod rdma-core ibverbs-providers ibverbs-utils
    libibverbs-dev librdmacm-dev perftest xz-utils cpio iproute2 util-linux ndctl)
# The 9p client modules the initramfs loads; their dependencies are resolved with modprobe.
NINEP_MODULES=(9pnet_virtio 9p)
# Loaded inside the VM. Without the crc32 modules `rdma link add` fails ("failed to add
# veth0"). rdma_ucm gives /dev/infiniband/rdma_cm (librdmacm); rdma_rxe does not pull it.
VM_MODULES=(veth crc32_generic crc32-pclmul rdma_rxe rdma_ucm ib_uverbs)
# Emulated persistent memory (RXE_PMEM): the legacy e820 pmem driver, the pmem block
# device (with DAX), and ext4 (its dependencies come with modprobe).
PMEM_MODULES=(nd_e820 nd_pmem ext4)
# Emulated device-DAX (RXE_DEVDAX): the same region drivers, plus the nd dax driver and
# the character device it gives (ndctl switches the namespace to devdax mode).
DEVDAX_MODULES=(nd_e820 nd_pmem dax_pmem device_dax)

usage() {
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "$ME: error: $*" >&2
    exit 1
}
say() {
    [ "${RXE_QUIET:-0}" = 1 ] || echo "$ME: $*" >&2
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (apt-get, and qemu's virtfs share of / with security_model=passthrough)"
}

# ---- setup -------------------------------------------------------------------------

# The newest linux-image-6.12.*+deb12-amd64-unsigned known to apt, or nothing.
newest_kernel_package() {
    local p
    for p in $(apt-cache pkgnames linux-image-6.12. 2>/dev/null | grep -E "$KPATTERN" | sort -Vr); do
        # Only a package with a version to install (not a name merely referenced).
        if [[ $(apt-cache policy "$p" 2>/dev/null) == *"Candidate: "[0-9]* ]]; then
            echo "$p"
            return 0
        fi
    done
    return 0
}

# The kernel release of a cached, complete tree (empty if none).
cached_release() {
    [ -f "$CACHE/current" ] || return 0
    local rel
    rel=$(cat "$CACHE/current")
    [ -n "$rel" ] && [ -f "$CACHE/$rel/complete" ] && echo "$rel"
    return 0
}

build_initramfs() { # tree release out
    local tree=$1 rel=$2 out=$3 work
    work=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$work"/{bin,dev,proc,sys,newroot,lib/mods}
    cp /bin/busybox "$work/bin/busybox"
    # modprobe prints "insmod /path/x.ko.xz" lines in dependency order.
    local mods=() line path name
    while read -r line; do
        case $line in
        insmod\ *) path=${line#insmod }; path=${path%% *} ;;
        *) continue ;;
        esac
        name=$(basename "$path")
        case $name in
        *.ko.xz) xz -dc "$path" >"$work/lib/mods/${name%.xz}" ;;
        *.ko.zst) zstd -qdc "$path" >"$work/lib/mods/${name%.zst}" ;;
        *.ko.gz) gzip -dc "$path" >"$work/lib/mods/${name%.gz}" ;;
        *) cp "$path" "$work/lib/mods/$name" ;;
        esac
        case " ${mods[*]} " in *" ${name%%.ko*}.ko "*) ;; *) mods+=("${name%%.ko*}.ko") ;; esac
    done < <(modprobe -d "$tree" -S "$rel" -a --show-depends "${NINEP_MODULES[@]}")
    for name in "${NINEP_MODULES[@]}"; do
        [ -f "$work/lib/mods/$name.ko" ] || die "module $name not found in $tree (modprobe --show-depends ${NINEP_MODULES[*]})"
    done
    printf '%s\n' "${mods[@]}" >"$work/lib/mods/order"
    cat >"$work/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "RXE-STAGE initramfs (uptime $(cut -d" " -f1 /proc/uptime) s)" >/dev/ttyS0
fail() {
    echo "RXE-STAGE initramfs-failed: $*" >/dev/ttyS0
    poweroff -f; reboot -f; echo o >/proc/sysrq-trigger
}
for m in $(cat /lib/mods/order); do
    insmod /lib/mods/$m || fail "insmod $m"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /newroot || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs /run"
mkdir -p /newroot/run/rxe-io
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rxeio /newroot/run/rxe-io || fail "mount rxeio"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
echo "RXE-STAGE root (uptime $(cut -d" " -f1 /proc/uptime) s)" >/dev/ttyS0
chroot /newroot /bin/bash /run/rxe-io/inner.sh </dev/null >/dev/ttyS0 2>&1
echo "RXE-STAGE poweroff" >/dev/ttyS0
sync
poweroff -f
reboot -f
echo o >/proc/sysrq-trigger
EOF
    chmod 0755 "$work/init"
    (cd "$work" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$work"
    initramfs_recipe >"$out.recipe"
}

# The modules loaded inside the VM: decompress them in the tree (kmod would do it in the
# emulated guest), then index the tree again. Idempotent.
decompress_vm_modules() { # tree release
    local tree=$1 rel=$2 line path changed=
    while read -r line; do
        case $line in
        insmod\ *.ko.xz*) path=${line#insmod }; path=${path%% *} ;;
        *) continue ;;
        esac
        [ -f "$path" ] || continue
        xz -dc "$path" >"${path%.xz}.tmp" && mv "${path%.xz}.tmp" "${path%.xz}" && rm -f "$path"
        changed=1
    done < <(modprobe -d "$tree" -S "$rel" -a --show-depends "${VM_MODULES[@]}" "${PMEM_MODULES[@]}" "${DEVDAX_MODULES[@]}" overlay)
    [ -z "$changed" ] || depmod -b "$tree" "$rel"
}

# Whether a module loaded in the VM is still compressed in the tree (a cache prepared
# by an older version of this script).
compressed_vm_modules() { # tree release
    modprobe -d "$1" -S "$2" -a --show-depends "${VM_MODULES[@]}" "${PMEM_MODULES[@]}" "${DEVDAX_MODULES[@]}" overlay 2>/dev/null |
        grep -q '^insmod .*\.ko\.xz'
}

# A pmem size variable's value as MiB (0: none); dies on a malformed size.
region_mib() { # name value
    local v=${2,,} n
    case $v in
    '' | 0 | off | no) echo 0; return 0 ;;
    esac
    [[ $v =~ ^([1-9][0-9]*)([mg])i?b?$ ]] || die "$1 must be a size like 256M or 1G (or 0 for none), not '$2'"
    n=${BASH_REMATCH[1]}
    [ "${BASH_REMATCH[2]}" = g ] && n=$((n * 1024))
    [ $((n % 2)) = 0 ] || die "$1 must be a multiple of 2M (the kernel maps pmem in 2 MiB sections), not '$2'"
    echo "$n"
}
pmem_mib() { region_mib RXE_PMEM "$PMEM"; }
devdax_mib() { region_mib RXE_DEVDAX "$DEVDAX"; }
devdax_count() {
    [[ $DEVDAX_COUNT =~ ^[1-8]$ ]] || die "RXE_DEVDAX_COUNT must be a number from 1 to 8, not '$DEVDAX_COUNT'"
    echo "$DEVDAX_COUNT"
}

# Where a device-dax region starts, in MiB after the start of the reserved span: past
# the end of the region before it (the pmem region's, or the previous device-dax
# region's; 0: none) and a gap of at least 2 MiB (adjacent memmap= ranges of one type
# merge into one region), rounded up to 128 MiB (a memory section apart from the region
# before when the span starts on a section boundary, as with RXE_MEM=2G).
devdax_offset_mib() { # end_mib of the region before
    [ "$1" = 0 ] && { echo 0; return 0; }
    echo $(((($1 + 2 + 127) / 128) * 128))
}

# RXE_MEM as MiB (qemu's -m: a bare number is MiB); dies on a malformed size.
mem_mib() {
    local v=${MEM,,} n
    [[ $v =~ ^([1-9][0-9]*)([mg]?)i?b?$ ]] || die "RXE_MEM must be a size like 2G or 2048M, not '$MEM'"
    n=${BASH_REMATCH[1]}
    [ "${BASH_REMATCH[2]}" = g ] && n=$((n * 1024))
    echo "$n"
}

# The VM's memory (-m) with pmem: RXE_MEM, the region, and PMEM_SLACK MiB above it,
# because the firmware reserves the last bytes of RAM below 4 GiB (a region reaching
# them is split, and nd_pmem refuses pieces not aligned to 2 MiB).
PMEM_SLACK=64
# Where the reserved span (the pmem region, then any device-dax region) starts in the
# guest's physical memory (MiB): qemu's default machine (pc) keeps all RAM below 4 GiB
# when it is under 3.5 GiB, else the first 3 GiB there and the rest from 4 GiB on. The
# span sits just below the slack at the top.
pmem_start_mib() { # mem_mib span_mib
    local total=$(($1 + $2 + PMEM_SLACK))
    if [ "$total" -lt 3584 ]; then
        echo "$1"
    elif [ $((total - 3072)) -ge $(($2 + PMEM_SLACK)) ]; then
        echo $((4096 + total - 3072 - $2 - PMEM_SLACK))
    else
        die "RXE_MEM=$MEM plus RXE_PMEM=$PMEM and RXE_DEVDAX_COUNT=$DEVDAX_COUNT x RXE_DEVDAX=$DEVDAX (a span of $2M) puts the pmem regions across the PCI hole below 4 GiB: choose RXE_MEM below $((3584 - $2 - PMEM_SLACK))M, or at least 3G"
    fi
}

# Changes to build_initramfs invalidate the cached initramfs.
initramfs_recipe() {
    { declare -f build_initramfs; echo "${NINEP_MODULES[*]} ${VM_MODULES[*]}"; } | sha256sum | cut -d' ' -f1
}

cmd_setup() {
    need_root
    local t0 t1 missing=() p
    t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$CACHE"
    say "apt-get update"
    if ! apt-get update -qq >"$CACHE/apt.log" 2>&1; then
        say "warning: apt-get update failed (see $CACHE/apt.log); using the indexes already present"
    fi
    for p in "${PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed: are the Debian 12 (bookworm) package registries reachable?"
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after installing qemu-system-x86"
    [ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"

    local pkg rel tree cached=''
    pkg=$(newest_kernel_package)
    if [ -z "$pkg" ]; then
        cached=$(cached_release)
        [ -n "$cached" ] || die "no package matching linux-image-6.12.*+deb12-amd64-unsigned in the apt indexes: check that /etc/apt/sources.list(.d) has Debian 12 bookworm, bookworm-updates and bookworm-security (main), then run apt-get update"
        say "warning: no 6.12 kernel package in the apt indexes; keeping the cached $cached"
    fi
    rel=${pkg#linux-image-}
    rel=${rel%-unsigned}
    rel=${rel:-$cached}
    tree=$CACHE/$rel
    if [ "$(cached_release)" = "$rel" ] && [ -f "$tree/modules-ready" ] &&
        [ "$(cat "$tree/initramfs.gz.recipe" 2>/dev/null)" = "$(initramfs_recipe)" ]; then
        say "kernel $rel: cached in $tree"
    else
        # Exclusive: runs hold the lock shared while their VM uses the cache.
        exec 9>"$CACHE/lock"
        if ! flock -n 9; then
            say "waiting for the VMs that use $CACHE to finish"
            flock 9
        fi
        if [ "$(cached_release)" != "$rel" ]; then
            rm -rf "$tree" "$CACHE/dl"
            mkdir -p "$CACHE/dl"
            say "apt-get download $pkg"
            (cd "$CACHE/dl" && apt-get download -qq "$pkg" >/dev/null 2>&1) ||
                die "apt-get download $pkg failed: is the Debian package registry reachable?"
            say "unpacking $(basename "$CACHE"/dl/*.deb)"
            mkdir -p "$tree/root"
            dpkg -x "$CACHE"/dl/*.deb "$tree/root"
            rm -rf "$CACHE/dl"
            [ -f "$tree/root/boot/vmlinuz-$rel" ] || die "the package $pkg has no boot/vmlinuz-$rel"
            [ -d "$tree/root/lib/modules/$rel" ] || die "the package $pkg has no lib/modules/$rel"
            depmod -b "$tree/root" "$rel"
            touch "$tree/complete"
            echo "$rel" >"$CACHE/current.tmp"
            mv "$CACHE/current.tmp" "$CACHE/current"
            # Older kernels are no longer used.
            for p in "$CACHE"/6.12.*; do
                [ -d "$p" ] && [ "$p" != "$tree" ] && rm -rf "$p"
            done
        else
            say "kernel $rel: cached in $tree"
        fi
        decompress_vm_modules "$tree/root" "$rel"
        touch "$tree/modules-ready"
        if [ "$(cat "$tree/initramfs.gz.recipe" 2>/dev/null)" != "$(initramfs_recipe)" ]; then
            say "building the initramfs"
            build_initramfs "$tree/root" "$rel" "$tree/initramfs.gz"
        fi
        exec 9>&-
    fi
    t1=$(now)
    say "setup done in $(elapsed "$t0" "$t1") s: kernel $rel, cache $CACHE"
}

# ---- run ---------------------------------------------------------------------------

QEMU_PID=
TAIL_PIDS=()
IO=
cleanup() {
    local rc=$?
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$QEMU_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    local p
    for p in "${TAIL_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ -n "$IO" ]; then
        if [ -n "${RXE_KEEP_LOG:-}" ] && [ -f "$IO/console.log" ]; then
            cp "$IO/console.log" "$RXE_KEEP_LOG" 2>/dev/null || true
        fi
        rm -rf "$IO"
    fi
    exit "$rc"
}

console_tail() { # lines: the end of the VM's console, without terminal escapes
    tr -d '\r' <"$IO/console.log" | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1b.//g' |
        grep -v '^[[:space:]]*$' | tail -n "$1" | sed 's/^/  console: /' >&2
}

quote_words() { [ $# -eq 0 ] || printf '%q ' "$@"; }

# The script that runs inside the VM (in the chroot of the host's /, as root).
# shellcheck disable=SC2016 # single quotes: expanded in the VM, not here
write_inner() { # modtree cwd envfile cmd...
    local modtree=$1 cwd=$2 envfile=$3
    shift 3
    {
        echo '#!/bin/bash'
        echo 'set -u'
        echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        echo 'IO=/run/rxe-io'
        echo 'stage() { echo "$1" >"$IO/stage"; echo "RXE-STAGE $1 (uptime $(cut -d" " -f1 /proc/uptime) s)"; }'
        echo 'bad() { echo "$*" >"$IO/failure"; stage failed; exit 0; }'
        printf 'MODTREE=%q\n' "$modtree"
        printf 'CWD=%q\n' "$cwd"
        printf 'VM_MODULES=(%s)\n' "${VM_MODULES[*]}"
        printf 'PMEM_MODULES=(%s)\n' "${PMEM_MODULES[*]}"
        printf 'PMEM_MIB=%q\n' "$PMEM_MIB"
        printf 'DEVDAX_MODULES=(%s)\n' "${DEVDAX_MODULES[*]}"
        printf 'DEVDAX_MIB=%q\n' "$DEVDAX_MIB"
        printf 'DEVDAX_STARTS_MIB=(%s)\n' "${DEVDAX_STARTS_MIB[*]}"
        local writable overlay
        read -ra writable <<<"${RXE_WRITABLE:-}"
        read -ra overlay <<<"${RXE_OVERLAY:-}"
        printf 'WRITABLE=(%s)\n' "$(quote_words "${writable[@]}")"
        printf 'OVERLAY=(%s)\n' "$(quote_words "${overlay[@]}")"
        printf 'CMD=(%s)\n' "$(printf '%q ' "$@")"
        cat <<'EOF'
stage chroot
# The cache (on the read-only host /) may be covered by a tmpfs below: keep the module
# tree reachable through a bind mount under /run, and let the kernel's own module
# requests use it too.
mkdir -p /run/rxe-modules
mount --bind "$MODTREE" /run/rxe-modules || bad "cannot bind-mount the module tree $MODTREE"
printf '#!/bin/sh\nexec /sbin/modprobe -d /run/rxe-modules "$@"\n' >/run/rxe-modprobe
chmod 0755 /run/rxe-modprobe
echo /run/rxe-modprobe >/proc/sys/kernel/modprobe
# The working directory (and the binaries in it) may live under /tmp or /var/tmp, which
# get a tmpfs below: keep the host's view of it and put it back at the same path.
case "$CWD/" in
/tmp/* | /var/tmp/*)
    mkdir -p /run/rxe-cwd
    mount --bind "$CWD" /run/rxe-cwd || bad "cannot bind-mount the working directory $CWD"
    ;;
esac
for d in /tmp /var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "$d" || bad "cannot mount a tmpfs on $d"
done
if mountpoint -q /run/rxe-cwd 2>/dev/null; then
    mkdir -p "$CWD" && mount --bind /run/rxe-cwd "$CWD" || bad "cannot restore the working directory $CWD"
fi
for d in "${WRITABLE[@]}"; do
    [ -d "$d" ] || bad "RXE_WRITABLE: $d is not a directory on the host"
    mount -t tmpfs tmpfs "$d" || bad "cannot mount a tmpfs on $d"
done
if [ ${#OVERLAY[@]} -gt 0 ]; then
    modprobe -d /run/rxe-modules overlay || bad "modprobe overlay failed"
    i=0
    for d in "${OVERLAY[@]}"; do
        [ -d "$d" ] || bad "RXE_OVERLAY: $d is not a directory on the host"
        i=$((i + 1))
        mkdir -p /run/rxe-ovl/$i/lower /run/rxe-ovl/$i/upper /run/rxe-ovl/$i/work
        mount --bind "$d" /run/rxe-ovl/$i/lower || bad "cannot bind-mount $d"
        mount -t overlay overlay -o "lowerdir=/run/rxe-ovl/$i/lower,upperdir=/run/rxe-ovl/$i/upper,workdir=/run/rxe-ovl/$i/work" "$d" ||
            bad "cannot mount an overlay on $d"
    done
fi

# Soft-RoCE: one rxe device on one end of a veth pair, shared by every local process.
modprobe -d /run/rxe-modules -a "${VM_MODULES[@]}" >"$IO/modprobe.log" 2>&1 ||
    bad "modprobe ${VM_MODULES[*]} failed: $(cat "$IO/modprobe.log")"
ip link set lo up
ip link add veth0 type veth peer name veth1 || bad "ip link add veth0 type veth failed"
ip addr add 10.77.0.1/24 dev veth0
ip link set veth0 up
ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0 >"$IO/rdma.log" 2>&1 ||
    bad "rdma link add rxe0 type rxe netdev veth0 failed: $(cat "$IO/rdma.log")"
ok=
for _ in $(seq 1 100); do
    if rdma link show rxe0/1 2>/dev/null | grep -q 'state ACTIVE'; then ok=1; break; fi
    sleep 0.1
done
[ -n "$ok" ] || bad "rxe0 not ACTIVE: $(rdma link show 2>&1)"
# GID index 1 must be the IPv4-mapped address of veth0 (RoCE v2).
gid=
for _ in $(seq 1 100); do
    gid=$(cat /sys/class/infiniband/rxe0/ports/1/gids/1 2>/dev/null || true)
    [ "$gid" = 0000:0000:0000:0000:0000:ffff:0a4d:0001 ] && break
    sleep 0.1
done
[ "$gid" = 0000:0000:0000:0000:0000:ffff:0a4d:0001 ] ||
    bad "rxe0 GID index 1 is '$gid', not ::ffff:10.77.0.1 (gids: $(cat /sys/class/infiniband/rxe0/ports/1/gids/[0-3] 2>&1 | tr '\n' ' '))"
stage rxe-active

# Emulated persistent memory: the kernel reserved the region (memmap=SIZE!START, an
# e820 type-12 range); nd_e820 makes it a libnvdimm region whose raw namespace nd_pmem
# serves as /dev/pmem0, with DAX (e820 regions get struct pages). A fresh ext4 on it
# mounted with -o dax takes MAP_SYNC mappings; the mount fails where DAX is missing.
# -C with an empty file: Debian's ndctl package installs an "install libnvdimm" rule
# (ndctl load-keys, then a modprobe without our module tree) that fails here.
: >/run/rxe-modprobe.conf
if [ "$PMEM_MIB" != 0 ]; then
    modprobe -d /run/rxe-modules -C /run/rxe-modprobe.conf -a "${PMEM_MODULES[@]}" >"$IO/modprobe.log" 2>&1 ||
        bad "pmem: modprobe ${PMEM_MODULES[*]} failed: $(cat "$IO/modprobe.log")"
    stage pmem-modules
    for _ in $(seq 1 100); do
        [ -b /dev/pmem0 ] && break
        sleep 0.1
    done
    [ -b /dev/pmem0 ] || bad "pmem: no /dev/pmem0 after loading ${PMEM_MODULES[*]} (kernel command line: $(cat /proc/cmdline); persistent memory in /proc/iomem: $(grep -i persistent /proc/iomem | tr '\n' ' '); nvdimm devices: $(ls /sys/bus/nd/devices 2>&1 | tr '\n' ' '); /dev: $(ls /dev | grep -E 'pmem|dax' | tr '\n' ' '); kernel: $(dmesg | grep -iE 'nd_|pmem|nvdimm|e820|dax|memmap' | tail -n 12 | tr '\n' ' '))"
    stage pmem-device
    size=$(($(cat /sys/block/pmem0/size) / 2048))
    [ "$size" = "$PMEM_MIB" ] || bad "pmem: /dev/pmem0 has $size MiB, not the $PMEM_MIB MiB reserved"
    [ "$(cat /sys/block/pmem0/queue/dax 2>/dev/null)" = 1 ] || bad "pmem: /dev/pmem0 does not support DAX (/sys/block/pmem0/queue/dax)"
    mkfs.ext4 -q -F -b 4096 -O ^has_journal -E nodiscard,lazy_itable_init=1 /dev/pmem0 >"$IO/mkfs.log" 2>&1 ||
        bad "pmem: mkfs.ext4 /dev/pmem0 failed: $(cat "$IO/mkfs.log")"
    stage pmem-mkfs
    mkdir -p /run/pmem
    mount -t ext4 -o dax /dev/pmem0 /run/pmem >"$IO/mount.log" 2>&1 ||
        bad "pmem: mount -o dax /dev/pmem0 failed: $(cat "$IO/mount.log") $(dmesg | grep -iE 'dax|ext4|pmem' | tail -n 5 | tr '\n' ' ')"
    opts=$(findmnt -n -o OPTIONS /run/pmem)
    [[ ,$opts, == *,dax,* || ,$opts, == *,dax=always,* ]] || bad "pmem: /run/pmem is mounted without dax (options: $opts)"
    chmod 1777 /run/pmem
    stage pmem-ready
fi

# Emulated device-DAX: each further reserved range is a libnvdimm region of its own
# (found by its start address); ndctl rewrites its raw namespace as a devdax namespace
# (an info block and the struct pages at its start, the rest 2 MiB-aligned), which the
# device_dax driver serves as the character device /dev/daxN.0. One per start, in
# address order.
DEVDAX_DEVS=()
if [ "$DEVDAX_MIB" != 0 ]; then
    command -v ndctl >/dev/null || bad "devdax: ndctl is not installed on the host (apt-get install ndctl, or rxe-vm.sh setup)"
    modprobe -d /run/rxe-modules -C /run/rxe-modprobe.conf -a "${DEVDAX_MODULES[@]}" >"$IO/modprobe.log" 2>&1 ||
        bad "devdax: modprobe ${DEVDAX_MODULES[*]} failed: $(cat "$IO/modprobe.log")"
    stage devdax-modules
    : >"$IO/devdax.note"
    for dstart in "${DEVDAX_STARTS_MIB[@]}"; do
        want=$(printf '0x%x' $((dstart * 1048576)))
        region=
        for _ in $(seq 1 100); do
            for r in /sys/bus/nd/devices/region*; do
                [ "$(cat "$r/resource" 2>/dev/null)" = "$want" ] && region=${r##*/}
            done
            [ -n "$region" ] && [ -e "/sys/bus/nd/devices/namespace${region#region}.0" ] && break
            sleep 0.1
        done
        [ -n "$region" ] || bad "devdax: no nvdimm region starts at $want (kernel command line: $(cat /proc/cmdline); persistent memory in /proc/iomem: $(grep -i persistent /proc/iomem | tr '\n' ' '); regions: $(for r in /sys/bus/nd/devices/region*; do echo "${r##*/}=$(cat "$r/resource" 2>/dev/null)"; done | tr '\n' ' '))"
        rsize=$(cat "/sys/bus/nd/devices/$region/size" 2>/dev/null || echo 0)
        [ "$rsize" = $((DEVDAX_MIB * 1048576)) ] || bad "devdax: region $region at $want has $rsize bytes, not the $DEVDAX_MIB MiB reserved (adjacent memmap= ranges merged?)"
        ns=namespace${region#region}.0
        [ -e "/sys/bus/nd/devices/$ns" ] || bad "devdax: region $region has no $ns (nvdimm devices: $(ls /sys/bus/nd/devices 2>&1 | tr '\n' ' '))"
        stage "devdax-region $region"
        ndctl create-namespace -f -e "$ns" --mode=devdax >"$IO/ndctl.log" 2>&1 ||
            bad "devdax: ndctl create-namespace -f -e $ns --mode=devdax failed: $(tr '\n' ' ' <"$IO/ndctl.log") $(dmesg | grep -iE 'nd_|pmem|dax|pfn' | tail -n 5 | tr '\n' ' ')"
        chardev=$(sed -n 's/.*"chardev":"\(dax[0-9.]*\)".*/\1/p' "$IO/ndctl.log" | head -n 1)
        [ -n "$chardev" ] || bad "devdax: ndctl create-namespace named no dax character device: $(tr '\n' ' ' <"$IO/ndctl.log")"
        for _ in $(seq 1 100); do
            [ -c "/dev/$chardev" ] && break
            sleep 0.1
        done
        [ -c "/dev/$chardev" ] || bad "devdax: no character device /dev/$chardev after ndctl create-namespace ($(ls /dev | grep -E 'dax' | tr '\n' ' '))"
        dsize=$(cat "/sys/bus/dax/devices/$chardev/size" 2>/dev/null || echo 0)
        [ "$dsize" -gt 0 ] || bad "devdax: /dev/$chardev has size '$dsize' (/sys/bus/dax/devices/$chardev/size)"
        for d in "${DEVDAX_DEVS[@]}"; do
            [ "$d" != "/dev/$chardev" ] || bad "devdax: ndctl gave /dev/$chardev for region $region too"
        done
        chmod 0666 "/dev/$chardev"
        DEVDAX_DEVS+=("/dev/$chardev")
        echo "devdax: /dev/$chardev, $((dsize / 1048576)) MiB usable of the ${DEVDAX_MIB} MiB region $region at $want, align $(cat "/sys/bus/dax/devices/$chardev/align" 2>/dev/null || echo '?')" >>"$IO/devdax.note"
    done
    [ "${#DEVDAX_DEVS[@]}" = "${#DEVDAX_STARTS_MIB[@]}" ] || bad "devdax: ${#DEVDAX_DEVS[@]} devices for ${#DEVDAX_STARTS_MIB[@]} regions"
    stage devdax-ready
fi

export RXE_DEV=rxe0 RXE_GID_INDEX=1 RXE_IP=10.77.0.1 RXE_NETDEV=veth0 RXE_VM=1
export TMPDIR=/tmp HOME=/root
[ -d /root/.cargo/bin ] && export PATH=/root/.cargo/bin:$PATH
EOF
        cat "$envfile"
        cat <<'EOF'
# After the host's variables: a host path in REPLOG_TEST_PMEM_DIR means nothing here.
if [ "$PMEM_MIB" != 0 ]; then export REPLOG_TEST_PMEM_DIR=/run/pmem; else unset REPLOG_TEST_PMEM_DIR; fi
if [ "${#DEVDAX_DEVS[@]}" != 0 ]; then
    export REPLOG_TEST_DEVDAX=${DEVDAX_DEVS[0]} REPLOG_TEST_DEVDAX_ALL="${DEVDAX_DEVS[*]}"
else
    unset REPLOG_TEST_DEVDAX REPLOG_TEST_DEVDAX_ALL
fi
cd "$CWD" || bad "cannot cd to $CWD in the VM"
awk '{ print $1 }' /proc/uptime >"$IO/uptime-at-command"
stage command
"${CMD[@]}" </dev/null >"$IO/stdout" 2>"$IO/stderr"
rc=$?
echo "$rc" >"$IO/rc.tmp"
mv "$IO/rc.tmp" "$IO/rc"
stage done
EOF
    } >"$IO/inner.sh"
}

cmd_run() {
    need_root
    [ $# -gt 0 ] || usage
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run '$0 setup' first"
    [[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "RXE_TIMEOUT must be a positive number of seconds, not '$TIMEOUT'"
    local rel tree
    rel=$(cached_release)
    [ -n "$rel" ] || die "no prepared kernel in $CACHE: run '$0 setup' first (or set RXE_CACHE)"
    tree=$CACHE/$rel
    PMEM_MIB=$(pmem_mib) || exit 1
    DEVDAX_MIB=$(devdax_mib) || exit 1
    local ndevdax
    ndevdax=$(devdax_count) || exit 1
    DEVDAX_STARTS_MIB=()
    local qmem=$MEM append="console=ttyS0 panic=-1 quiet loglevel=3 8250.nr_uarts=1" mem start span off
    if [ "$PMEM_MIB" != 0 ] || [ "$DEVDAX_MIB" != 0 ]; then
        mem=$(mem_mib) || exit 1
        span=$PMEM_MIB
        local offs=() i
        if [ "$DEVDAX_MIB" != 0 ]; then
            for ((i = 0; i < ndevdax; i++)); do
                off=$(devdax_offset_mib "$span")
                offs+=("$off")
                span=$((off + DEVDAX_MIB))
            done
        fi
        start=$(pmem_start_mib "$mem" "$span") || exit 1
        qmem=$((mem + span + PMEM_SLACK))M
        [ "$PMEM_MIB" = 0 ] || append+=" memmap=${PMEM_MIB}M!${start}M"
        for off in "${offs[@]}"; do
            DEVDAX_STARTS_MIB+=($((start + off)))
            append+=" memmap=${DEVDAX_MIB}M!$((start + off))M"
        done
    fi
    if compressed_vm_modules "$tree/root" "$rel"; then
        # A cache from an older version of this script: decompress the modules it lacks.
        (
            flock 9
            if compressed_vm_modules "$tree/root" "$rel"; then
                say "decompressing the VM's modules (this script changed since setup)"
                decompress_vm_modules "$tree/root" "$rel"
            fi
        ) 9>"$CACHE/lock"
    fi
    if [ "$(cat "$tree/initramfs.gz.recipe" 2>/dev/null)" != "$(initramfs_recipe)" ]; then
        # Made by another version of this script: rebuild it (cheap; the kernel is cached).
        if ! command -v cpio >/dev/null || [ ! -x /bin/busybox ]; then
            die "cpio or busybox-static missing: run '$0 setup' first"
        fi
        (
            flock 9
            if [ "$(cat "$tree/initramfs.gz.recipe" 2>/dev/null)" != "$(initramfs_recipe)" ]; then
                say "rebuilding the initramfs (this script changed since setup)"
                build_initramfs "$tree/root" "$rel" "$tree/initramfs.gz"
            fi
        ) 9>"$CACHE/lock"
    fi
    # Shared while the VM runs: setup waits before it replaces the kernel.
    exec 8<"$CACHE/lock"
    flock -s 8

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # Directories left by runs that were killed with SIGKILL (their owner is gone).
    local d
    for d in /tmp/replog-rxe-run.*; do
        [ -f "$d/owner" ] && ! kill -0 "$(cat "$d/owner")" 2>/dev/null && rm -rf "$d"
    done
    IO=$(mktemp -d /tmp/replog-rxe-run.XXXXXX)
    chmod 0755 "$IO"
    echo $$ >"$IO/owner"
    : >"$IO/stdout"
    : >"$IO/stderr"
    : >"$IO/console.log"

    # Environment for the command: REPLOG_*, RUST_*, CARGO_*, RXE_TEST_* and RXE_PASSENV.
    local name
    : >"$IO/env"
    while read -r name; do
        case $name in
        REPLOG_* | RUST_* | CARGO_* | RXE_TEST_*) ;;
        *) case " ${RXE_PASSENV:-} " in *" $name "*) ;; *) continue ;; esac ;;
        esac
        printf 'export %s=%q\n' "$name" "${!name}" >>"$IO/env"
    done < <(compgen -e)
    write_inner "$tree/root" "$PWD" "$IO/env" "$@"

    local pdeath=()
    if [[ $(setpriv --help 2>&1) == *--pdeathsig* ]]; then pdeath=(setpriv --pdeathsig KILL); fi
    local t0 t_cmd t_end
    t0=$(now)
    local pmem_note=
    [ "$PMEM_MIB" = 0 ] || pmem_note=" + ${PMEM_MIB}M pmem"
    [ "$DEVDAX_MIB" = 0 ] || pmem_note+=" + ${ndevdax} x ${DEVDAX_MIB}M devdax"
    say "booting the VM (kernel $rel, TCG, ${SMP} CPUs, $MEM$pmem_note, timeout ${TIMEOUT}s)"
    "${pdeath[@]}" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -m "$qmem" -smp "$SMP" \
        -nographic -monitor none -serial "file:$IO/console.log" -no-reboot -nic none \
        -kernel "$tree/root/boot/vmlinuz-$rel" -initrd "$tree/initramfs.gz" \
        -append "$append" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
        -virtfs "local,path=$IO,mount_tag=rxeio,security_model=passthrough,multidevs=remap" \
        </dev/null >"$IO/qemu.out" 2>&1 &
    QEMU_PID=$!

    local deadline stage='' streaming= note_line
    deadline=$(awk -v t="$t0" -v d="$TIMEOUT" 'BEGIN { printf "%d", t + d }')
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [ -z "$streaming" ] && grep -qxE 'command|done' "$IO/stage" 2>/dev/null; then
            t_cmd=$(now)
            if [ -f "$IO/devdax.note" ]; then
                while IFS= read -r note_line; do say "$note_line"; done <"$IO/devdax.note"
            fi
            say "rxe0 ACTIVE; running: ${RXE_LABEL:-$(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-100)}"
            # Stream the command's output as it comes; tail exits after qemu does.
            tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$IO/stdout" &
            TAIL_PIDS+=($!)
            tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$IO/stderr" >&2 &
            TAIL_PIDS+=($!)
            streaming=1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            stage=$(cat "$IO/stage" 2>/dev/null || echo "none (the VM did not reach its root filesystem)")
            echo "$ME: error: timeout: RXE_TIMEOUT=${TIMEOUT}s expired (last stage: $stage); killing qemu" >&2
            console_tail 20
            exit 124
        fi
        sleep 0.2
    done
    local qrc=0
    wait "$QEMU_PID" || qrc=$?
    QEMU_PID=
    local p
    for p in "${TAIL_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    TAIL_PIDS=()
    t_end=$(now)
    if [ -z "$streaming" ] && [ -f "$IO/rc" ]; then
        # The command ended between two polls: print its output now.
        t_cmd=${t_cmd:-$t_end}
        cat "$IO/stdout"
        cat "$IO/stderr" >&2
    fi
    stage=$(cat "$IO/stage" 2>/dev/null || true)

    if [ ! -f "$IO/rc" ]; then
        if [ -z "$stage" ]; then
            echo "$ME: error: the VM did not boot to its root filesystem (qemu exit $qrc)." >&2
            echo "  qemu said: $(tr '\n' ' ' <"$IO/qemu.out")" >&2
            console_tail 30
            echo "  Run '$0 setup' again to rebuild the cache; RXE_KEEP_LOG=FILE keeps the whole console log." >&2
        elif [ "$stage" = failed ]; then
            local failure
            failure=$(cat "$IO/failure" 2>/dev/null)
            if [[ $failure == devdax:* ]]; then
                echo "$ME: error: setting up the emulated device-dax (RXE_DEVDAX=$DEVDAX) in the VM failed: ${failure#devdax: }" >&2
                echo "  The command was not run. It needs ndctl on the host and the kernel's nd_e820, nd_pmem, dax_pmem, device_dax; RXE_DEVDAX=0 runs without it." >&2
            elif [[ $failure == pmem:* ]]; then
                echo "$ME: error: setting up the emulated pmem DAX filesystem (RXE_PMEM=$PMEM) in the VM failed: ${failure#pmem: }" >&2
                echo "  The command was not run. The kernel in $CACHE needs nd_e820, nd_pmem, ext4 and FS_DAX; RXE_PMEM=0 runs without pmem." >&2
            else
                echo "$ME: error: setting up soft-RoCE in the VM failed: $failure" >&2
                echo "  The kernel in $CACHE may lack rdma_rxe/veth; run '$0 setup' again (RXE_CACHE=$CACHE)." >&2
            fi
        else
            echo "$ME: error: the VM stopped at stage '$stage' without the command's exit code." >&2
            console_tail 30
        fi
        exit 125
    fi
    local rc up
    rc=$(cat "$IO/rc")
    up=$(cat "$IO/uptime-at-command" 2>/dev/null || echo '?')
    say "exit code $rc; boot to command $(elapsed "$t0" "${t_cmd:-$t_end}") s (guest uptime ${up} s), command $(elapsed "${t_cmd:-$t_end}" "$t_end") s, total $(elapsed "$t0" "$t_end") s"
    exit "$rc"
}

# ---- selftest ----------------------------------------------------------------------

# Runs inside the VM (shipped as text by declare -f).
# shellcheck disable=SC2317,SC2016
selftest_body() {
    fails=0
    check() { # name command...
        local name=$1 t0 t1 out
        shift
        t0=$(date +%s.%N)
        if out=$("$@" 2>&1); then
            t1=$(date +%s.%N)
            echo "PASS $name ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s)"
        else
            echo "FAIL $name"
            echo "$out" | tail -n 15 | sed 's/^/    /'
            fails=$((fails + 1))
        fi
    }
    # A server and a client on the same device; the client retries until the server listens.
    pair() { # server-cmd... -- client-cmd...
        local srv=() cli=() spid rc=1
        while [ "$1" != -- ]; do srv+=("$1"); shift; done
        shift
        cli=("$@")
        "${srv[@]}" >/tmp/server.log 2>&1 &
        spid=$!
        for _ in $(seq 1 40); do
            sleep 0.5
            if "${cli[@]}" >/tmp/client.log 2>&1; then rc=0; break; fi
            kill -0 "$spid" 2>/dev/null || break
        done
        if [ "$rc" = 0 ]; then wait "$spid" || rc=$?; else kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; fi
        cat /tmp/server.log /tmp/client.log
        return "$rc"
    }
    check "ibv_devices lists rxe0" sh -c 'ibv_devices | tee /dev/stderr | grep -qw rxe0'
    check "rxe0 port ACTIVE, GID index $RXE_GID_INDEX = ::ffff:$RXE_IP (RoCE v2)" sh -c \
        'ibv_devinfo -v -d rxe0 | grep -q PORT_ACTIVE &&
         ibv_devinfo -v -d rxe0 | grep -E "GID\[ *$RXE_GID_INDEX\]:.*::ffff:$RXE_IP, RoCE v2"'
    check "ibv_rc_pingpong -d rxe0 -g $RXE_GID_INDEX (server + client on rxe0)" \
        pair timeout 60 ibv_rc_pingpong -d rxe0 -g "$RXE_GID_INDEX" -n 100 -- \
        timeout 60 ibv_rc_pingpong -d rxe0 -g "$RXE_GID_INDEX" -n 100 127.0.0.1
    check "ib_write_lat -d rxe0 -x $RXE_GID_INDEX (RDMA WRITE, 1000 iterations)" \
        pair timeout 120 ib_write_lat -d rxe0 -x "$RXE_GID_INDEX" -n 1000 -- \
        timeout 120 ib_write_lat -d rxe0 -x "$RXE_GID_INDEX" -n 1000 127.0.0.1
    grep -h -A1 't_avg' /tmp/client.log 2>/dev/null | sed 's/^/    /' || true
    check "ib_read_lat -R (rdma_cm connection, RDMA READ, 200 iterations)" \
        pair timeout 120 ib_read_lat -d rxe0 -R -n 200 -- \
        timeout 120 ib_read_lat -d rxe0 -R -n 200 "$RXE_IP"
    [ "$fails" = 0 ]
}

cmd_selftest() {
    local body
    body="$(declare -f selftest_body); selftest_body"
    local rc=0
    RXE_LABEL="the selftest" "$BASH" "$0" run -- bash -c "$body" || rc=$?
    if [ "$rc" = 0 ]; then
        echo "PASS selftest"
    else
        echo "FAIL selftest (exit $rc)"
        exit 1
    fi
}

[ $# -ge 1 ] || usage
case $1 in
setup) cmd_setup ;;
run)
    shift
    [ "${1:-}" = -- ] && shift
    cmd_run "$@"
    ;;
selftest) cmd_selftest ;;
-h | --help | help) usage ;;
*) usage ;;
esac
