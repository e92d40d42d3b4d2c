//! Process and thread set-up: file-descriptor limit, CPU pinning.

use std::io;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::Pid;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft
/// limit. Each proxied TCP connection costs two descriptors.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Pin the calling thread to `cpu` (an index into the CPUs this process may
/// run on, wrapping around).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    set.set(cpus[cpu % cpus.len()])?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

/// Number of CPUs this process may run on (`workers: auto`).
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Number of descriptors this process has open (entries of /proc/self/fd).
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Ask the kernel to migrate connections queued on a closing SO_REUSEPORT
/// listener to the other listeners of the same address
/// (`net.ipv4.tcp_migrate_req=1`) instead of resetting them. Returns whether
/// the setting is on afterwards; needs root to change.
pub fn enable_tcp_migrate_req() -> bool {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if std::fs::read_to_string(PATH)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return true;
    }
    std::fs::write(PATH, "1").is_ok()
}
