//! Owners of the verbs objects the RDMA transport uses: the device (context, two
//! protection domains, one completion queue), memory regions and reliable-connected
//! queue pairs.
//!
//! The two protection domains ([`Pd`]) keep the acknowledgement path away from the log
//! region: the log region and the log queue pairs live in [`Pd::Log`]; the
//! acknowledgement areas, their staging memory and the acknowledgement queue pairs live
//! in [`Pd::Ack`]. A queue pair can reach only memory registered in its own protection
//! domain (whatever rkey it presents), so an acknowledgement queue pair, whose access
//! flags always allow remote write, can never write the log region.
//!
//! This module is the only one that calls into libibverbs. Each owner frees its object
//! on drop; memory regions and queue pairs hold an `Arc` of the device so that the
//! device is closed last whatever order the transport drops things in.

use super::RdmaError;
use rdma_sys::*;
use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::ptr;
use std::sync::Arc;

/// What one side of a queue pair tells the other so that they can connect, and where
/// its log region is. Sent over the side channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Queue pair number.
    pub(crate) qpn: u32,
    /// First packet sequence number this side sends with.
    pub(crate) psn: u32,
    /// Port LID (0 on RoCE).
    pub(crate) lid: u16,
    /// The GID at the configured index (RoCE v2: the IPv4-mapped address).
    pub(crate) gid: [u8; 16],
    /// Virtual address of the log region.
    pub(crate) addr: u64,
    /// Remote key of the log region.
    pub(crate) rkey: u32,
    /// Length of the log region in bytes.
    pub(crate) len: u64,
}

/// Encoded length of an [`Endpoint`].
pub(crate) const ENDPOINT_LEN: usize = 4 + 4 + 2 + 16 + 8 + 4 + 8;

impl Endpoint {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// Parses exactly [`ENDPOINT_LEN`] bytes; `None` on any other length.
    pub(crate) fn decode(b: &[u8]) -> Option<Endpoint> {
        if b.len() != ENDPOINT_LEN {
            return None;
        }
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(Endpoint {
            qpn: u32_at(0)?,
            psn: u32_at(4)? & 0x00ff_ffff,
            lid: u16::from_le_bytes(b.get(8..10)?.try_into().ok()?),
            gid: b.get(10..26)?.try_into().ok()?,
            addr: u64_at(26)?,
            rkey: u32_at(34)?,
            len: u64_at(38)?,
        })
    }
}

/// The acknowledgement half of the queue-pair bootstrap (bootstrap extension version 1):
/// the acknowledgement queue pair and the acknowledgement area the peer may write into.
/// The GID and LID are the [`Endpoint`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckEndpoint {
    /// Queue pair number of the acknowledgement queue pair.
    pub(crate) qpn: u32,
    /// Its first packet sequence number.
    pub(crate) psn: u32,
    /// Virtual address of the acknowledgement area the receiver of this endpoint writes into.
    pub(crate) addr: u64,
    /// Its remote key (registered in the acknowledgement protection domain).
    pub(crate) rkey: u32,
    /// Its length in bytes.
    pub(crate) len: u64,
}

/// Encoded length of an [`AckEndpoint`].
pub(crate) const ACK_ENDPOINT_LEN: usize = 4 + 4 + 8 + 4 + 8;

impl AckEndpoint {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// Parses the first [`ACK_ENDPOINT_LEN`] bytes of `b`; `None` if `b` is shorter.
    pub(crate) fn decode(b: &[u8]) -> Option<AckEndpoint> {
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(AckEndpoint {
            qpn: u32_at(0)?,
            psn: u32_at(4)? & 0x00ff_ffff,
            addr: u64_at(8)?,
            rkey: u32_at(16)?,
            len: u64_at(20)?,
        })
    }

    /// The endpoint to connect the acknowledgement queue pair to: `main`'s address
    /// (GID, LID) with this queue pair number and PSN.
    pub(crate) fn endpoint(&self, main: &Endpoint) -> Endpoint {
        Endpoint { qpn: self.qpn, psn: self.psn, addr: self.addr, rkey: self.rkey, len: self.len, ..*main }
    }
}

/// The read-only half of the queue-pair bootstrap (bootstrap extension version 2): the
/// owner's **read mirror**, a memory region of the acknowledgement protection domain
/// registered with `IBV_ACCESS_REMOTE_READ` only, which the receiver of this endpoint may
/// RDMA READ on the acknowledgement queue pair and never write (the NIC refuses a write
/// to a region without remote-write access). What its bytes mean is the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MirrorEndpoint {
    /// Virtual address of the mirror.
    pub(crate) addr: u64,
    /// Its remote key.
    pub(crate) rkey: u32,
    /// Its length in bytes (0: the owner has no mirror).
    pub(crate) len: u64,
}

/// Encoded length of a [`MirrorEndpoint`].
pub(crate) const MIRROR_ENDPOINT_LEN: usize = 8 + 4 + 8;

impl MirrorEndpoint {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// Parses the first [`MIRROR_ENDPOINT_LEN`] bytes of `b`; `None` if `b` is shorter.
    pub(crate) fn decode(b: &[u8]) -> Option<MirrorEndpoint> {
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        Some(MirrorEndpoint { addr: u64_at(0)?, rkey: u32_at(8)?, len: u64_at(12)? })
    }
}

fn verbs_err(call: &'static str, rc: i32) -> RdmaError {
    // Verbs calls return an errno (positive or negative) or -1 with errno set.
    let code = if rc == -1 || rc == 0 { io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { rc.abs() };
    RdmaError::Verbs { call, source: io::Error::from_raw_os_error(code) }
}

fn null_err(call: &'static str) -> RdmaError {
    RdmaError::Verbs { call, source: io::Error::last_os_error() }
}

/// Which of the device's protection domains an object belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pd {
    /// The log region, the staging memory of writes and reads, the log queue pairs.
    Log,
    /// The acknowledgement areas, their staging memory and the acknowledgement queue pairs.
    Ack,
}

/// An opened RDMA device with its two protection domains and the transport's one
/// completion queue.
pub(crate) struct Device {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    ack_pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    /// The device's name (e.g. `rxe0`).
    pub(crate) name: String,
    /// The port used.
    pub(crate) port: u8,
    /// The GID index used.
    pub(crate) gid_index: u8,
    /// The port's GID at `gid_index`.
    pub(crate) gid: [u8; 16],
    /// The port's LID.
    pub(crate) lid: u16,
    /// The port's active MTU (an `ibv_mtu` value).
    pub(crate) mtu: ibv_mtu::Type,
    /// Outstanding RDMA READs a queue pair may have (clamped to the device's limits).
    pub(crate) rd_atomic: u8,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is thread-safe); the
// transport drives them from one thread at a time.
unsafe impl Send for Device {}
// SAFETY: as above; `&Device` only exposes calls libibverbs allows concurrently.
unsafe impl Sync for Device {}

impl Device {
    /// Opens `name` (or the first device when `None`), checks that `port` is active and
    /// reads its GID at `gid_index`, allocates a protection domain and a completion
    /// queue of `cq_depth` entries.
    pub(crate) fn open(name: Option<&str>, port: u8, gid_index: u8, cq_depth: i32) -> Result<Arc<Device>, RdmaError> {
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed below.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(RdmaError::NoDevice(format!("ibv_get_device_list failed: {}", io::Error::last_os_error())));
        }
        let mut found: *mut ibv_device = ptr::null_mut();
        let mut names = Vec::new();
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is valid; the name is a NUL-terminated string it owns.
            let dn = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }.to_string_lossy().into_owned();
            if found.is_null() && name.is_none_or(|w| w == dn) {
                found = dev;
            }
            names.push(dn);
        }
        let ctx = if found.is_null() { ptr::null_mut() } else { unsafe { ibv_open_device(found) } };
        let open_err = io::Error::last_os_error();
        // SAFETY: the list came from ibv_get_device_list; an opened context stays valid.
        unsafe { ibv_free_device_list(list) };
        if found.is_null() {
            let want = name.map_or("any RDMA device".to_string(), |w| format!("device {w}"));
            return Err(RdmaError::NoDevice(format!("{want} not found (devices present: {names:?})")));
        }
        if ctx.is_null() {
            return Err(RdmaError::Verbs { call: "ibv_open_device", source: open_err });
        }
        let mut dev = Device {
            ctx,
            pd: ptr::null_mut(),
            ack_pd: ptr::null_mut(),
            cq: ptr::null_mut(),
            name: String::new(),
            port,
            gid_index,
            gid: [0; 16],
            lid: 0,
            mtu: ibv_mtu::IBV_MTU_1024,
            rd_atomic: 1,
        };
        // From here on `dev`'s Drop frees what was created.
        // SAFETY: `ctx` is an open context.
        dev.name = unsafe { CStr::from_ptr(ibv_get_device_name((*ctx).device)) }.to_string_lossy().into_owned();
        // SAFETY: zeroed attribute structs are valid out-parameters.
        let mut pattr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { ___ibv_query_port(ctx, port, &mut pattr) };
        if rc != 0 {
            return Err(verbs_err("ibv_query_port", rc));
        }
        if pattr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::NoDevice(format!("{} port {port} is not ACTIVE (state {})", dev.name, pattr.state)));
        }
        dev.lid = pattr.lid;
        dev.mtu = pattr.active_mtu;
        // SAFETY: zeroed attribute structs are valid out-parameters.
        let mut dattr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { ibv_query_device(ctx, &mut dattr) };
        if rc != 0 {
            return Err(verbs_err("ibv_query_device", rc));
        }
        dev.rd_atomic = dattr.max_qp_rd_atom.min(dattr.max_qp_init_rd_atom).clamp(1, 16) as u8;
        // SAFETY: a zeroed union is a valid GID; valid context and out-pointer.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv_query_gid(ctx, port, gid_index as i32, &mut gid) };
        if rc != 0 {
            return Err(verbs_err("ibv_query_gid", rc));
        }
        // SAFETY: every bit pattern of the union is a valid `raw`.
        dev.gid = unsafe { gid.raw };
        // SAFETY: valid context.
        dev.pd = unsafe { ibv_alloc_pd(ctx) };
        if dev.pd.is_null() {
            return Err(null_err("ibv_alloc_pd"));
        }
        // SAFETY: valid context.
        dev.ack_pd = unsafe { ibv_alloc_pd(ctx) };
        if dev.ack_pd.is_null() {
            return Err(null_err("ibv_alloc_pd(ack)"));
        }
        // SAFETY: valid context; no completion channel (the transport polls).
        dev.cq = unsafe { ibv_create_cq(ctx, cq_depth, ptr::null_mut(), ptr::null_mut(), 0) };
        if dev.cq.is_null() {
            return Err(null_err("ibv_create_cq"));
        }
        Ok(Arc::new(dev))
    }

    fn pd(&self, which: Pd) -> *mut ibv_pd {
        match which {
            Pd::Log => self.pd,
            Pd::Ack => self.ack_pd,
        }
    }

    /// Takes up to `wcs.len()` completions off the completion queue.
    pub(crate) fn poll_cq(&self, wcs: &mut [ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: the CQ is valid while `self` lives; `wcs` has room for the count given.
        let n = unsafe { ibv_poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(verbs_err("ibv_poll_cq", n));
        }
        Ok(n as usize)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: each object was created by this device and is destroyed once; memory
        // regions and queue pairs hold an Arc of the device, so they are gone already.
        unsafe {
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.ack_pd.is_null() {
                ibv_dealloc_pd(self.ack_pd);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx);
        }
    }
}

/// Page-aligned memory registered with the device: anonymous, or a shared mapping of a
/// file or device-dax character device ([`Region::from_path`]).
pub(crate) struct Region {
    dev: Arc<Device>,
    mr: *mut ibv_mr,
    buf: *mut u8,
    map_len: usize,
    len: usize,
}

// SAFETY: the region is plain memory plus a verbs handle; see `Device`.
unsafe impl Send for Region {}
// SAFETY: shared access only reads the handle's keys and the base pointer.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` zeroed bytes and registers them in `pd` with `access` (`ibv_access_flags` bits).
    pub(crate) fn new(dev: &Arc<Device>, pd: Pd, len: usize, access: u32) -> Result<Region, RdmaError> {
        let page = 4096;
        let map_len = len.max(1).div_ceil(page) * page;
        // SAFETY: an anonymous private mapping with no address hint.
        let buf = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if buf == libc::MAP_FAILED {
            return Err(RdmaError::Verbs { call: "mmap", source: io::Error::last_os_error() });
        }
        Region::register(dev, pd, buf, map_len, len, access)
    }

    /// Maps `len` bytes of `path` shared (`MAP_SHARED`), keeping what they hold, and
    /// registers them like [`Region::new`]. `path` is a device-dax character device
    /// (`/dev/daxN.M`, persistent memory the device writes into directly; the mapping is
    /// `len` rounded up to the device's alignment, which must fit in the device), or a
    /// existing regular file (extended to `len` if shorter; for tests: page-cache pages are not
    /// persistent memory, and most filesystems refuse the registration's long-term pin,
    /// tmpfs does not). An fsdax file (ext4 or xfs mounted `-o dax`) cannot be
    /// registered: the kernel refuses long-term pins of fsdax pages (EOPNOTSUPP).
    pub(crate) fn from_path(
        dev: &Arc<Device>,
        pd: Pd,
        path: &Path,
        len: usize,
        access: u32,
    ) -> Result<Region, RdmaError> {
        let err = |what: String| RdmaError::RegionPath { path: path.to_path_buf(), what };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open it read-write: {e}")))?;
        let meta = file.metadata().map_err(|e| err(format!("cannot stat it: {e}")))?;
        let page = 4096;
        let map_len = if meta.file_type().is_char_device() {
            let (size, align) = devdax_geometry(meta.rdev()).map_err(|e| err(e.to_string()))?;
            let map_len = len.max(1).div_ceil(align) * align;
            if map_len > size {
                return Err(err(format!(
                    "the device-dax device has {size} bytes; the log region needs {len} bytes, {map_len} \
                     rounded up to the device's alignment of {align} bytes"
                )));
            }
            map_len
        } else if meta.file_type().is_file() {
            let map_len = len.max(1).div_ceil(page) * page;
            if meta.len() < map_len as u64 {
                file.set_len(map_len as u64).map_err(|e| err(format!("cannot extend it to {map_len} bytes: {e}")))?;
            }
            map_len
        } else {
            return Err(err("neither a device-dax character device nor a regular file".into()));
        };
        // SAFETY: a shared mapping of an open descriptor with no address hint; the
        // mapping stays valid after the descriptor is closed.
        let buf = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if buf == libc::MAP_FAILED {
            return Err(err(format!("mmap of {map_len} bytes failed: {}", io::Error::last_os_error())));
        }
        Region::register(dev, pd, buf, map_len, len, access).map_err(|e| match e {
            RdmaError::Verbs { source, .. } if source.raw_os_error() == Some(libc::EOPNOTSUPP) => err(format!(
                "ibv_reg_mr failed: {source} (the kernel refuses long-term pins of this memory: an fsdax \
                 file, or a filesystem that tracks dirty pages; use a device-dax device, ndctl \
                 create-namespace --mode=devdax)"
            )),
            RdmaError::Verbs { source, .. } => err(format!("ibv_reg_mr failed: {source}")),
            e => e,
        })
    }

    /// Registers `map_len` bytes mapped at `buf`; unmaps them on failure.
    fn register(
        dev: &Arc<Device>,
        pd: Pd,
        buf: *mut libc::c_void,
        map_len: usize,
        len: usize,
        access: u32,
    ) -> Result<Region, RdmaError> {
        // SAFETY: the PD is valid; `buf` maps `map_len` bytes that outlive the MR.
        let mr = unsafe { ibv_reg_mr(dev.pd(pd), buf, map_len, access as i32) };
        if mr.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping what the caller just mapped.
            unsafe { libc::munmap(buf, map_len) };
            return Err(RdmaError::Verbs { call: "ibv_reg_mr", source: e });
        }
        Ok(Region { dev: dev.clone(), mr, buf: buf.cast(), map_len, len })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.buf
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: the MR is valid while `self` lives.
        unsafe { (*self.mr).lkey }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
}

/// The size and mapping alignment of the device-dax character device `rdev`, from
/// `/sys/dev/char/MAJOR:MINOR/{size,align}` (no `align`: 2 MiB, the usual one).
fn devdax_geometry(rdev: u64) -> io::Result<(usize, usize)> {
    let dir = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
    let read = |name: &str| -> io::Result<Option<usize>> {
        match std::fs::read_to_string(format!("{dir}/{name}")) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{dir}/{name} holds '{}', not a number", s.trim()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{dir}/{name}: {e}"))),
        }
    };
    let size = read("size")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a character device without {dir}/size: not a device-dax device"),
        )
    })?;
    let align = read("align")?.unwrap_or(2 << 20);
    if align == 0 || !align.is_power_of_two() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{dir}/align is {align}, not a power of two")));
    }
    Ok((size, align))
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: deregistered once, then the mapping it covered is unmapped.
        unsafe {
            ibv_dereg_mr(self.mr);
            libc::munmap(self.buf.cast(), self.map_len);
        }
        let _ = &self.dev;
    }
}

/// A reliable-connected queue pair on the device's one completion queue.
pub(crate) struct Qp {
    dev: Arc<Device>,
    qp: *mut ibv_qp,
    /// Its number.
    pub(crate) qpn: u32,
    /// Inline data the device accepted at creation (bytes).
    pub(crate) max_inline: u32,
}

// SAFETY: see `Device`.
unsafe impl Send for Qp {}

impl Qp {
    /// Creates a queue pair in `pd`, in RESET, with room for `depth` send work requests.
    pub(crate) fn new(dev: &Arc<Device>, pd: Pd, depth: u32, max_inline: u32) -> Result<Qp, RdmaError> {
        // SAFETY: a zeroed init attribute is valid; fields set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = dev.cq;
        init.recv_cq = dev.cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.cap.max_inline_data = max_inline;
        // SAFETY: valid PD and init attribute.
        let qp = unsafe { ibv_create_qp(dev.pd(pd), &mut init) };
        if qp.is_null() {
            return Err(null_err("ibv_create_qp"));
        }
        // SAFETY: a freshly created QP.
        let qpn = unsafe { (*qp).qp_num };
        Ok(Qp { dev: dev.clone(), qp, qpn, max_inline: init.cap.max_inline_data })
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, call: &'static str) -> Result<(), RdmaError> {
        // SAFETY: valid QP and attribute.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(verbs_err(call, rc));
        }
        Ok(())
    }

    /// RESET -> INIT with the remote access `access` (`ibv_access_flags` bits).
    pub(crate) fn init(&self, access: u32) -> Result<(), RdmaError> {
        // SAFETY: zeroed attribute; fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.dev.port;
        a.qp_access_flags = access;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut a, mask, "ibv_modify_qp(INIT)")
    }

    /// INIT -> RTR towards `remote`, then RTR -> RTS sending from `psn`.
    pub(crate) fn connect(&self, remote: &Endpoint, psn: u32) -> Result<(), RdmaError> {
        // SAFETY: zeroed attribute; fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = self.dev.mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = self.dev.rd_atomic;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = self.dev.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.port_num = self.dev.port;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask, "ibv_modify_qp(RTR)")?;
        // SAFETY: zeroed attribute; fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = psn;
        a.timeout = 14; // 4.096 us * 2^14 = 67 ms per try
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.max_rd_atomic = self.dev.rd_atomic;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask, "ibv_modify_qp(RTS)")
    }

    /// Changes the remote access flags in place (INIT or RTS).
    pub(crate) fn set_access(&self, access: u32) -> Result<(), RdmaError> {
        // SAFETY: zeroed attribute; the mask names only the access flags.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_access_flags = access;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS, "ibv_modify_qp(access flags)")
    }

    /// Moves the queue pair to the error state (outstanding work requests are flushed).
    pub(crate) fn to_error(&self) -> Result<(), RdmaError> {
        // SAFETY: zeroed attribute; fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE, "ibv_modify_qp(ERR)")
    }

    /// The queue pair's current state (an `ibv_qp_state` value).
    pub(crate) fn state(&self) -> Result<ibv_qp_state::Type, RdmaError> {
        // SAFETY: zeroed attributes are valid out-parameters; valid QP.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv_query_qp(self.qp, &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32, &mut init) };
        if rc != 0 {
            return Err(verbs_err("ibv_query_qp", rc));
        }
        Ok(a.qp_state)
    }

    /// Posts a chain of send work requests. On failure returns the errno and the first
    /// work request that was not posted.
    ///
    /// # Safety
    /// `wr` must be a valid chain whose scatter/gather entries point into registered
    /// memory that stays valid until the requests complete or the QP is destroyed.
    pub(crate) unsafe fn post(&self, wr: *mut ibv_send_wr) -> Result<(), (i32, *mut ibv_send_wr)> {
        let mut bad = ptr::null_mut();
        // SAFETY: the caller guarantees the chain; the QP is valid.
        let rc = unsafe { ibv_post_send(self.qp, wr, &mut bad) };
        if rc != 0 {
            return Err((rc, bad));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the device outlives it through the Arc.
        unsafe {
            ibv_destroy_qp(self.qp);
        }
        let _ = &self.dev;
    }
}

/// A work completion's status as text.
pub(crate) fn status_str(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }.to_string_lossy().into_owned()
}
