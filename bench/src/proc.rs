//! Child processes that cannot outlive the bench, free ports, and a stop flag set by
//! SIGINT/SIGTERM so that every loop ends and every Drop guard runs.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the stop flag (loops poll [`stopped`]) instead of killing
/// the bench before its guards stop the replicas and etcd.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether a stop was asked for (Ctrl-C, SIGTERM).
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Asks every loop to stop (as a signal would).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Spawns `cmd` so that the kernel SIGKILLs it if the bench dies (even by SIGKILL).
pub fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Kills `child` (SIGKILL) and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGTERM to `child`, waits up to `grace` for it to exit, then SIGKILLs it.
pub fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: a plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let end = std::time::Instant::now() + grace;
    while std::time::Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(child);
}

/// A run of `n` consecutive free loopback ports (probed, below the ephemeral range:
/// [`replog::config::free_loopback_ports`]).
pub fn free_ports(n: u16) -> anyhow::Result<u16> {
    Ok(replog::config::free_loopback_ports(n)?)
}

/// A directory removed (with its contents) when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `parent/name-<pid>-<n>`.
    pub fn new(parent: &std::path::Path, name: &str) -> anyhow::Result<TempDir> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
