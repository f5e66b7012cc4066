/* The DPDK headers dpdk-sys binds. Compiled with pkg-config's own cflags for libdpdk
 * (which include `-include rte_config.h` and `-march=...`). */
#include <rte_dev.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>

/* `rte_errno` is a macro over a thread-local variable; Rust cannot name a C
 * thread-local portably, so shim.c gives a getter. */
int dpdk_sys_rte_errno(void);
