//! Baselines measured in the same run as the results they explain: the TCP loopback
//! round trip (raw `std::net::TcpStream`, TCP_NODELAY, 64 B ping-pong, as
//! `fallback-tcp/examples/pingpong.rs` measures it) and the latency of a 4 KiB
//! `pwrite` + `fdatasync` on the data directory.

use crate::stats::{new_hist, record};
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Round trips of `size`-byte messages between two threads over loopback TCP: `iters`
/// timed after `warmup` untimed, stopping early after `max_time`.
pub fn tcp_rtt(size: usize, iters: usize, warmup: usize, max_time: Duration) -> Result<Histogram<u64>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let size = size.max(1);
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; size];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = vec![0x5A; size];
    let mut back = vec![0u8; size];
    let mut h = new_hist();
    let t_end = Instant::now() + max_time;
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        if i >= warmup {
            record(&mut h, t0.elapsed());
        }
        if t0 >= t_end || crate::proc::stopped() {
            break;
        }
    }
    drop(s);
    let _ = echo.join();
    Ok(h)
}

/// `pwrite` of 4 KiB at rotating offsets of a preallocated 1 MiB file in `dir`, each
/// followed by `fdatasync`: `iters` timed (after 10 untimed), stopping after `max_time`.
pub fn fdatasync(dir: &Path, iters: usize, max_time: Duration) -> Result<Histogram<u64>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("fdatasync-probe-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 256;
    let zeros = vec![0u8; BLOCK * BLOCKS as usize];
    f.write_all_at(&zeros, 0)?;
    f.sync_all()?;
    let mut buf = vec![0xA5u8; BLOCK];
    let mut h = new_hist();
    let t_end = Instant::now() + max_time;
    let warmup = 10;
    let mut result = Ok(());
    for i in 0..warmup + iters {
        buf[0] = i as u8;
        let t0 = Instant::now();
        if let Err(e) = f.write_all_at(&buf, (i as u64 % BLOCKS) * BLOCK as u64).and_then(|_| f.sync_data()) {
            result = Err(e);
            break;
        }
        if i >= warmup {
            record(&mut h, t0.elapsed());
        }
        if t0 >= t_end || crate::proc::stopped() {
            break;
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("pwrite+fdatasync on {}", path.display()))?;
    Ok(h)
}
