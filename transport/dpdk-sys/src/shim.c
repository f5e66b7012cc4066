/* Small C helpers for what bindgen cannot express (macros over thread-locals). */
#include "wrapper.h"

int dpdk_sys_rte_errno(void) { return rte_errno; }
