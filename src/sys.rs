//! Process-level plumbing: file limits, the allocator's settings and
//! systemd notification.

use std::io;

/// Soft and hard RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// Soft limit in force.
    pub soft: u64,
    /// Hard ceiling.
    pub hard: u64,
}

/// Current RLIMIT_NOFILE.
pub fn file_limit() -> io::Result<FileLimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FileLimit {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft file limit to the hard limit (a million connections need
/// a million descriptors; the hard limit is what the admin granted).
pub fn raise_file_limit() -> io::Result<FileLimit> {
    let cur = file_limit()?;
    if cur.soft < cur.hard {
        let r = libc::rlimit {
            rlim_cur: cur.hard,
            rlim_max: cur.hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    file_limit()
}

/// Output queues that grow are held in buffers of 256 KiB
/// (`engine::outbox`). Fixing glibc's mmap threshold there makes each such
/// buffer its own mapping, unmapped when freed, so the memory of a slow
/// consumer that is cut goes back to the system at once. With glibc's
/// default, the threshold rises after the first such buffer is freed; the
/// next slow consumer's buffers then come from a worker's heap, which keeps
/// them after they are freed (measured: 62 MiB still resident after a
/// second 64 MiB slow consumer was cut). Smaller allocations are unchanged.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called once
        // before any worker starts.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) } != 1 {
            log::debug!("mallopt(M_MMAP_THRESHOLD) refused");
        }
    }
}

/// Gives the pages free inside the allocator's heaps back to the system
/// (glibc returns only the top of a heap by itself). Its cost grows with
/// the heaps' size; callers rate-limit it.
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tells systemd (Type=notify) we are ready; a no-op outside systemd.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify READY failed: {e}");
    }
}

/// Tells systemd we are stopping; a no-op outside systemd.
pub fn notify_stopping() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]) {
        log::debug!("sd_notify STOPPING failed: {e}");
    }
}
