//! The peer: a 3-member etcd cluster on loopback (Debian's `etcd-server`, installed by
//! `bench/setup-etcd.sh`), stopped when dropped, and a client that puts keys through
//! etcd's JSON gRPC gateway (`POST /v3/kv/put`, base64 key and value) over HTTP/1.1
//! keep-alive on a plain `TcpStream` (hand-rolled: one request in flight per
//! connection, like the replog client).

use crate::proc::{free_ports, spawn_tied, stop, TempDir};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `etcd` binary on the PATH (or `/usr/bin/etcd`).
pub fn find_etcd() -> Result<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let p = d.join("etcd");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let p = PathBuf::from("/usr/bin/etcd");
    if p.is_file() {
        return Ok(p);
    }
    bail!("etcd is not installed (run bench/setup-etcd.sh: it installs Debian's etcd-server)")
}

/// `etcd --version`'s first line.
pub fn version(etcd: &Path) -> String {
    Command::new(etcd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// A running etcd cluster.
pub struct EtcdCluster {
    /// Client URLs' addresses, one per member.
    pub client_addrs: Vec<SocketAddr>,
    procs: Vec<Child>,
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts `n` members on free loopback ports with data under a fresh directory in
    /// `parent`, and waits (up to 30 s) until one is leader.
    pub fn start(etcd: &Path, n: usize, parent: &Path) -> Result<EtcdCluster> {
        let dir = TempDir::new(parent, "etcd-bench")?;
        let base = free_ports(2 * n as u16)?;
        let client = |i: usize| SocketAddr::from(([127, 0, 0, 1], base + 2 * i as u16));
        let peer = |i: usize| format!("http://127.0.0.1:{}", base + 2 * i as u16 + 1);
        let initial: Vec<String> = (0..n).map(|i| format!("e{i}={}", peer(i))).collect();
        let initial = initial.join(",");
        let mut c = EtcdCluster { client_addrs: (0..n).map(client).collect(), procs: Vec::new(), dir };
        for i in 0..n {
            let log = std::fs::File::create(c.dir.path().join(format!("e{i}.log")))?;
            let url = format!("http://{}", client(i));
            let child = spawn_tied(
                Command::new(etcd)
                    .arg(format!("--name=e{i}"))
                    .arg(format!("--data-dir={}", c.dir.path().join(format!("e{i}")).display()))
                    .arg(format!("--listen-client-urls={url}"))
                    .arg(format!("--advertise-client-urls={url}"))
                    .arg(format!("--listen-peer-urls={}", peer(i)))
                    .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
                    .arg(format!("--initial-cluster={initial}"))
                    .arg(format!("--initial-cluster-token=replog-bench-{}", std::process::id()))
                    .arg("--initial-cluster-state=new")
                    .arg("--logger=zap")
                    .arg("--log-level=warn")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )
            .with_context(|| format!("starting {}", etcd.display()))?;
            c.procs.push(child);
        }
        c.leader(Duration::from_secs(30))?;
        Ok(c)
    }

    /// The client address of the leader, waiting up to `timeout` for one.
    pub fn leader(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < timeout && !crate::proc::stopped() {
            for (i, p) in self.procs.iter_mut().enumerate() {
                if let Ok(Some(st)) = p.try_wait() {
                    bail!("etcd member e{i} exited ({st}); its log:\n{}", self.log_tail(i));
                }
            }
            for &addr in &self.client_addrs {
                match status(addr) {
                    Ok((member, leader)) if member != 0 && member == leader => return Ok(addr),
                    Ok(_) => {}
                    Err(e) => last = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("no etcd leader within {timeout:?} (last error: {last}); member e0's log:\n{}", self.log_tail(0))
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("e{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops every member (SIGTERM, then SIGKILL after 3 s). Also done on drop.
    pub fn stop(&mut self) {
        for p in &mut self.procs {
            stop(p, Duration::from_secs(3));
        }
        self.procs.clear();
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `(member_id, leader_id)` from `POST /v3/maintenance/status` on `addr`.
pub fn status(addr: SocketAddr) -> Result<(u64, u64)> {
    let mut h = Http::connect(addr, Duration::from_millis(500))?;
    let body = h.post("/v3/maintenance/status", b"{}")?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    // uint64 fields come as JSON strings from the gateway.
    let num =
        |v: &serde_json::Value| -> u64 { v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_u64()).unwrap_or(0) };
    Ok((num(&v["header"]["member_id"]), num(&v["leader"])))
}

/// Standard base64 (with padding).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// One HTTP/1.1 keep-alive connection (requests one at a time).
pub struct Http {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl Http {
    /// Connects to `addr` (TCP_NODELAY; reads and writes bounded by `timeout`).
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Http> {
        let stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Http { stream, addr, buf: Vec::with_capacity(8192), req: Vec::with_capacity(1024) })
    }

    /// POSTs a JSON `body` to `path`; returns the response body of a 200 answer.
    pub fn post(&mut self, path: &str, body: &[u8]) -> Result<Vec<u8>> {
        self.req.clear();
        write!(
            self.req,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )?;
        self.req.extend_from_slice(body);
        self.stream.write_all(&self.req).with_context(|| format!("POST {path} to {}", self.addr))?;
        let (code, body) = self.read_response().with_context(|| format!("POST {path} to {}", self.addr))?;
        if code != 200 {
            bail!("POST {path} to {}: HTTP {code}: {}", self.addr, String::from_utf8_lossy(&body));
        }
        Ok(body)
    }

    fn fill(&mut self) -> Result<()> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    fn read_response(&mut self) -> Result<(u16, Vec<u8>)> {
        let mut guard = 0;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            guard += 1;
            if guard > 10_000 || self.buf.len() > 1 << 20 {
                bail!("no end of HTTP headers");
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?.to_string();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status:?}"))?;
        let mut len = None;
        let mut chunked = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = Some(v.parse::<usize>()?);
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
        self.buf.drain(..head_end + 4);
        let body = if chunked {
            self.read_chunked()?
        } else {
            let len = len.ok_or_else(|| anyhow!("response without Content-Length"))?;
            let mut guard = 0;
            while self.buf.len() < len {
                guard += 1;
                if guard > 100_000 {
                    bail!("body too slow");
                }
                self.fill()?;
            }
            self.buf.drain(..len).collect()
        };
        Ok((code, body))
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        for _ in 0..100_000 {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                self.fill()?;
            };
            let size_text = std::str::from_utf8(&self.buf[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill()?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
        bail!("too many chunks")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
