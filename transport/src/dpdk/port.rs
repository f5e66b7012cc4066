//! EAL and the Ethernet port: the only module of the DPDK transport with `unsafe` code.

use super::{DpdkError, EalConfig};
use dpdk_sys as sys;
use std::sync::{Arc, Mutex, Weak};

/// The process's EAL. `rte_eal_init` succeeds once per process, so there is one [`Eal`]
/// per process, shared by the ports that use it; `rte_eal_cleanup` runs when the last
/// handle is dropped (after which EAL cannot start again in this process).
#[derive(Debug)]
pub struct Eal {
    args: Vec<String>,
}

/// The live EAL (if any) and whether EAL was ever started in this process.
static EAL: Mutex<(Weak<Eal>, bool)> = Mutex::new((Weak::new(), false));

impl Eal {
    /// Starts EAL with `cfg`'s arguments, or returns the running one when it was started
    /// with the same arguments.
    ///
    /// # Errors
    /// [`DpdkError::Eal`] when `rte_eal_init` fails (with `rte_strerror`), and
    /// [`DpdkError::EalUsed`] when EAL runs with other arguments or was cleaned up.
    pub fn init(cfg: &EalConfig) -> Result<Arc<Eal>, DpdkError> {
        let args = cfg.args();
        let mut g = EAL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.0.upgrade() {
            if e.args == args {
                return Ok(e);
            }
            return Err(DpdkError::EalUsed(format!("EAL already runs with other arguments: {}", e.args.join(" "))));
        }
        if g.1 {
            return Err(DpdkError::EalUsed("EAL was started and cleaned up in this process already".into()));
        }
        g.1 = true;
        sys::eal_init(&args).map_err(|e| DpdkError::Eal {
            args: args.join(" "),
            errno: e.errno,
            message: e.message,
        })?;
        let eal = Arc::new(Eal { args });
        g.0 = Arc::downgrade(&eal);
        Ok(eal)
    }

    /// Adds a device after start-up (hot-plug): `devargs` as for `--vdev`, e.g.
    /// `net_af_packet3,iface=eth1`. Its port is then found by name.
    pub fn probe(&self, devargs: &str) -> Result<(), DpdkError> {
        let c = std::ffi::CString::new(devargs).map_err(|_| DpdkError::Config("devargs with a NUL byte".into()))?;
        // SAFETY: EAL is initialised (we are a live handle); `c` is NUL-terminated.
        let rc = unsafe { sys::rte_dev_probe(c.as_ptr()) };
        if rc < 0 {
            return Err(DpdkError::Port { what: "rte_dev_probe", port: u16::MAX, message: sys::strerror(-rc) });
        }
        Ok(())
    }

    /// The arguments EAL started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: every port of this process holds an `Arc<Eal>` and is closed before
        // its handle drops, so no DPDK object is in use any more.
        let rc = unsafe { sys::rte_eal_cleanup() };
        if rc < 0 {
            tracing::warn!("rte_eal_cleanup: {}", sys::strerror(-rc));
        } else {
            tracing::info!("EAL cleaned up");
        }
    }
}

/// A started port with its own mbuf pool. Stopped and closed on drop.
pub(crate) struct Port {
    id: u16,
    pool: *mut sys::rte_mempool,
    pub(crate) mac: [u8; 6],
    // Declared last: dropped after the port is closed.
    _eal: Arc<Eal>,
}

// SAFETY: the port's queue and its pool are used by one thread at a time (the owner of
// the transport, its polling thread); the pool has no per-lcore cache (see `open`), so
// using it from another thread after a move is sound.
unsafe impl Send for Port {}

fn check(rc: i32, what: &'static str, port: u16) -> Result<(), DpdkError> {
    if rc < 0 {
        Err(DpdkError::Port { what, port, message: sys::strerror(-rc) })
    } else {
        Ok(())
    }
}

/// Burst size of rx and tx.
pub(crate) const BURST: usize = 32;

impl Port {
    /// Finds the port named `name` (a vdev such as `net_af_packet0`, or a PCI address),
    /// creates its mbuf pool of `mbufs` buffers and starts it with one rx and one tx
    /// queue of `ring` descriptors.
    pub(crate) fn open(eal: Arc<Eal>, name: &str, mbufs: u32, ring: u16, mtu: usize) -> Result<Port, DpdkError> {
        let cname = std::ffi::CString::new(name).map_err(|_| DpdkError::Config("port name with a NUL byte".into()))?;
        let mut id = 0u16;
        // SAFETY: EAL is initialised (we hold it); `cname` is NUL-terminated; `id` is a
        // valid out pointer.
        let rc = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
        if rc < 0 {
            return Err(DpdkError::PortNotFound { name: name.into(), eal_args: eal.args.join(" ") });
        }
        let room = sys::RTE_MBUF_DEFAULT_BUF_SIZE as usize - sys::RTE_PKTMBUF_HEADROOM as usize;
        if mtu + super::wire::ETH_LEN + 4 > room {
            return Err(DpdkError::Config(format!(
                "mtu {mtu} + Ethernet header does not fit the mbuf data room of {room} bytes"
            )));
        }
        static POOLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = POOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pool_name = std::ffi::CString::new(format!("replog_{id}_{n}")).expect("no NUL");
        // SAFETY: EAL is initialised; the name is NUL-terminated and unique per port.
        // No per-lcore cache (cache size 0): the polling thread need not be an lcore.
        let pool = unsafe {
            sys::rte_pktmbuf_pool_create(
                pool_name.as_ptr(),
                mbufs,
                0,
                0,
                sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
                sys::rte_socket_id() as i32,
            )
        };
        if pool.is_null() {
            return Err(DpdkError::Pool { mbufs, message: sys::strerror(sys::rte_errno()) });
        }
        let mut port = Port { id, pool, mac: [0; 6], _eal: eal };
        let conf = sys::rte_eth_conf::default();
        // SAFETY: `id` names a port of this process; `conf` is a valid default config;
        // the rx queue gets a live pool; null queue configs mean the driver's defaults.
        unsafe {
            let socket = sys::rte_eth_dev_socket_id(id) as u32; // SOCKET_ID_ANY (-1) wraps on purpose
            check(sys::rte_eth_dev_configure(id, 1, 1, &conf), "rte_eth_dev_configure", id)?;
            check(sys::rte_eth_rx_queue_setup(id, 0, ring, socket, std::ptr::null(), pool), "rx queue setup", id)?;
            check(sys::rte_eth_tx_queue_setup(id, 0, ring, socket, std::ptr::null()), "tx queue setup", id)?;
            check(sys::rte_eth_dev_start(id), "rte_eth_dev_start", id)?;
        }
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: the port is started; `mac` is a valid out pointer.
        check(unsafe { sys::rte_eth_macaddr_get(id, &mut mac) }, "rte_eth_macaddr_get", id)?;
        port.mac = mac.addr_bytes;
        Ok(port)
    }

    /// Receives up to [`BURST`] frames, handing each frame's bytes to `f` (frames of
    /// more than one segment are skipped: our frames fit one mbuf). Returns how many
    /// mbufs came.
    pub(crate) fn rx(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut buf = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST];
        // SAFETY: `buf` has room for BURST mbuf pointers; the port and queue 0 are started.
        let n = usize::from(unsafe { sys::rte_eth_rx_burst(self.id, 0, buf.as_mut_ptr(), BURST as u16) });
        for &m in &buf[..n] {
            // SAFETY: `m` came from rx_burst: a valid mbuf we own; its first segment
            // holds `data_len` bytes at `mtod`. We free it after use and never again.
            unsafe {
                if (*m).nb_segs == 1 {
                    let data = std::slice::from_raw_parts(sys::mtod(m), usize::from((*m).data_len));
                    f(data);
                }
                sys::rte_pktmbuf_free(m);
            }
        }
        n
    }

    /// Sends frames: `fill(i, buf)` writes frame `i` (of `lens[i]` bytes) into its mbuf.
    /// Returns how many the tx queue took (the rest are freed, not sent).
    pub(crate) fn tx(&mut self, lens: &[usize], mut fill: impl FnMut(usize, &mut [u8])) -> Result<usize, DpdkError> {
        let mut sent_total = 0;
        for (chunk_no, chunk) in lens.chunks(BURST).enumerate() {
            let mut mbufs = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST];
            let mut k = 0;
            for (j, &len) in chunk.iter().enumerate() {
                // SAFETY: the pool is live; append on a fresh mbuf returns `len` writable
                // bytes or null (checked); `len` fits the data room (checked at open).
                unsafe {
                    let m = sys::rte_pktmbuf_alloc(self.pool);
                    if m.is_null() {
                        break;
                    }
                    let p = sys::rte_pktmbuf_append(m, len as u16) as *mut u8;
                    if p.is_null() {
                        sys::rte_pktmbuf_free(m);
                        break;
                    }
                    fill(chunk_no * BURST + j, std::slice::from_raw_parts_mut(p, len));
                    mbufs[k] = m;
                    k += 1;
                }
            }
            // SAFETY: mbufs[..k] are valid mbufs we own; tx_burst takes ownership of the
            // first `sent`; we free the rest.
            let sent = usize::from(unsafe { sys::rte_eth_tx_burst(self.id, 0, mbufs.as_mut_ptr(), k as u16) });
            for &m in &mbufs[sent..k] {
                // SAFETY: not taken by tx_burst: still ours.
                unsafe { sys::rte_pktmbuf_free(m) };
            }
            sent_total += sent;
            if sent < chunk.len() {
                break;
            }
        }
        Ok(sent_total)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the port was started by this process and is not used after this; the
        // pool is freed only after the port (which may hold its mbufs) is closed.
        unsafe {
            let rc = sys::rte_eth_dev_stop(self.id);
            if rc < 0 {
                tracing::warn!(port = self.id, "rte_eth_dev_stop: {}", sys::strerror(-rc));
            }
            let rc = sys::rte_eth_dev_close(self.id);
            if rc < 0 {
                tracing::warn!(port = self.id, "rte_eth_dev_close: {}", sys::strerror(-rc));
            }
            sys::rte_mempool_free(self.pool);
        }
        tracing::info!(port = self.id, "DPDK port stopped and closed, pool freed");
    }
}
