//! Process-level plumbing: file limits and systemd notification.

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
