//! The load generator: `clients` threads, each with its own connection (a [`Driver`]),
//! closed-loop (send, wait for the answer, send again) or open-loop (each thread sends
//! on a fixed schedule; latency runs from the *intended* send time, so a slow answer
//! that delays later sends is charged to them too: no coordinated omission).

use crate::etcd::{base64, Http};
use crate::stats::{new_hist, record};
use anyhow::Result;
use bytes::Bytes;
use hdrhistogram::Histogram;
use replog::client::{Client, ClientConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// One client connection of a system under test.
pub trait Driver: Send {
    /// Sends one request carrying `entries` and returns once the system acknowledged it
    /// (committed).
    fn append(&mut self, entries: &[Bytes]) -> Result<()>;
}

/// A replog client (the library's blocking [`Client`]: one request in flight).
pub struct ReplogDriver(pub Client);

impl ReplogDriver {
    /// Connects a client with `cfg`.
    pub fn connect(cfg: ClientConfig) -> Result<ReplogDriver> {
        Ok(ReplogDriver(Client::connect(cfg)?))
    }
}

impl Driver for ReplogDriver {
    fn append(&mut self, entries: &[Bytes]) -> Result<()> {
        if entries.len() == 1 {
            self.0.append(entries[0].clone())?;
        } else {
            self.0.append_batch(entries.to_vec())?;
        }
        Ok(())
    }
}

/// An etcd client: `POST /v3/kv/put` for one entry, `POST /v3/kv/txn` with one put per
/// entry for a batch, each value under its own key `bench/<client>/<n mod 4096>`.
pub struct EtcdDriver {
    http: Http,
    client: usize,
    n: u64,
    body: Vec<u8>,
}

impl EtcdDriver {
    /// Connects to the member at `addr` (the leader, to compare like with like).
    pub fn connect(addr: SocketAddr, client: usize) -> Result<EtcdDriver> {
        Ok(EtcdDriver { http: Http::connect(addr, Duration::from_secs(10))?, client, n: 0, body: Vec::new() })
    }

    fn next_key(&mut self) -> String {
        self.n += 1;
        base64(format!("bench/{}/{}", self.client, self.n % 4096).as_bytes())
    }
}

impl Driver for EtcdDriver {
    fn append(&mut self, entries: &[Bytes]) -> Result<()> {
        use std::io::Write;
        self.body.clear();
        if entries.len() == 1 {
            let key = self.next_key();
            write!(self.body, "{{\"key\":\"{key}\",\"value\":\"{}\"}}", base64(&entries[0]))?;
            self.http.post("/v3/kv/put", &self.body)?;
        } else {
            self.body.extend_from_slice(b"{\"success\":[");
            for (i, e) in entries.iter().enumerate() {
                let key = self.next_key();
                let sep = if i == 0 { "" } else { "," };
                write!(self.body, "{sep}{{\"requestPut\":{{\"key\":\"{key}\",\"value\":\"{}\"}}}}", base64(e))?;
            }
            self.body.extend_from_slice(b"]}");
            self.http.post("/v3/kv/txn", &self.body)?;
        }
        Ok(())
    }
}

/// Closed or open loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loop {
    /// Each client sends its next request when the previous one is answered.
    Closed,
    /// The clients together offer `rate` entries per second on a fixed schedule.
    Open {
        /// Offered entries per second (all clients).
        rate: f64,
    },
}

/// What one load run asks for.
#[derive(Clone, Debug)]
pub struct Load {
    /// Client threads (connections).
    pub clients: usize,
    /// Bytes per entry.
    pub size: usize,
    /// Entries per request.
    pub batch: usize,
    /// Closed or open loop.
    pub mode: Loop,
    /// Untimed lead-in.
    pub warmup: Duration,
    /// Measured time after the warm-up.
    pub duration: Duration,
}

/// What a run measured (over the measured window only).
pub struct Outcome {
    /// Latency of each request, from its (intended, in open loop) send time to its answer.
    pub hist: Histogram<u64>,
    /// Requests answered.
    pub requests: u64,
    /// Entries acknowledged.
    pub entries: u64,
    /// The measured window.
    pub elapsed: Duration,
    /// Failed requests.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Open loop: requests due in the window that were never sent (the clients fell
    /// behind); each is in `hist` with its wait until the end as a lower bound.
    pub missed: u64,
}

impl Outcome {
    /// Nothing measured yet, over a window of `elapsed`.
    fn empty(elapsed: Duration) -> Self {
        Outcome { hist: new_hist(), requests: 0, entries: 0, elapsed, errors: 0, first_error: None, missed: 0 }
    }

    /// Adds one client's outcome to the total.
    fn merge(&mut self, part: Outcome) {
        self.hist.add(&part.hist).expect("same histogram bounds");
        self.requests += part.requests;
        self.entries += part.entries;
        self.errors += part.errors;
        self.missed += part.missed;
        if self.first_error.is_none() {
            self.first_error = part.first_error;
        }
    }
}

/// Runs `load` against drivers made by `connect(client_index)`. `progress` is bumped
/// with every acknowledged entry (for a live rate). Every thread stops at the end of
/// the window (open loop: at most 1 s later), after 100 errors, or on a stop request.
pub fn run<F>(load: &Load, connect: F, progress: Arc<AtomicU64>) -> Result<Outcome>
where
    F: Fn(usize) -> Result<Box<dyn Driver>> + Sync,
{
    let mut drivers = Vec::with_capacity(load.clients);
    for i in 0..load.clients {
        drivers.push(connect(i)?);
    }
    let payload: Vec<Bytes> = (0..load.batch)
        .map(|i| Bytes::from((0..load.size).map(|j| (i * 31 + j) as u8 | 1).collect::<Vec<u8>>()))
        .collect();
    let barrier = Arc::new(Barrier::new(load.clients + 1));
    let start_at = Arc::new(Mutex::new(None::<Instant>));
    let abort = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (idx, mut d) in drivers.into_iter().enumerate() {
        let (barrier, start_at, abort, progress) = (barrier.clone(), start_at.clone(), abort.clone(), progress.clone());
        let payload = payload.clone();
        let load = load.clone();
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            let start = start_at.lock().unwrap().expect("start time set before the barrier");
            client_loop(idx, &mut *d, &payload, &load, start, &abort, &progress)
        }));
    }
    // Everyone connected: start together.
    *start_at.lock().unwrap() = Some(Instant::now() + Duration::from_millis(5));
    barrier.wait();
    let mut out = Outcome::empty(load.duration);
    for h in handles {
        let part = h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        out.merge(part);
    }
    Ok(out)
}

fn client_loop(
    idx: usize,
    d: &mut dyn Driver,
    payload: &[Bytes],
    load: &Load,
    start: Instant,
    abort: &AtomicBool,
    progress: &AtomicU64,
) -> Outcome {
    let mut out = Outcome::empty(load.duration);
    let now = Instant::now();
    if start > now {
        std::thread::sleep(start - now);
    }
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let batch = payload.len() as u64;
    // Open loop: this thread's share of the rate, staggered among the clients.
    let interval = match load.mode {
        Loop::Closed => None,
        Loop::Open { rate } => {
            let per_thread = rate / load.clients as f64 / batch as f64;
            Some(Duration::from_secs_f64(1.0 / per_thread.max(1e-3)))
        }
    };
    let offset = interval.map(|iv| iv.mul_f64(idx as f64 / load.clients as f64)).unwrap_or_default();
    const MAX_REQUESTS: u64 = 100_000_000;
    for i in 0..MAX_REQUESTS {
        if abort.load(Ordering::Relaxed) || crate::proc::stopped() {
            break;
        }
        let intended = match interval {
            None => {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                t
            }
            Some(iv) => {
                let t = start + offset + iv.mul_f64(i as f64);
                if t >= end {
                    break;
                }
                let now = Instant::now();
                if now >= end + Duration::from_secs(1) {
                    // Hopelessly behind: charge every request still due its wait so far.
                    let mut k = i;
                    loop {
                        let due = start + offset + iv.mul_f64(k as f64);
                        if due >= end {
                            break;
                        }
                        if due >= measure_from {
                            record(&mut out.hist, now - due);
                            out.missed += 1;
                        }
                        k += 1;
                    }
                    break;
                }
                if t > now {
                    std::thread::sleep(t - now);
                }
                t
            }
        };
        match d.append(payload) {
            Ok(()) => {
                let done = Instant::now();
                progress.fetch_add(batch, Ordering::Relaxed);
                // Closed loop: answers inside the window; open loop: requests due in it.
                let counted = match interval {
                    None => intended >= measure_from && done <= end,
                    Some(_) => intended >= measure_from,
                };
                if counted {
                    record(&mut out.hist, done - intended);
                    out.requests += 1;
                    out.entries += batch;
                }
            }
            Err(e) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{e:#}"));
                }
                if out.errors >= 100 {
                    abort.store(true, Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    out
}
