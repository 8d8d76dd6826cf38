//! The process logger: env_logger's lines (text, or one JSON object a line)
//! behind a filter that SIGHUP can change while the server runs.
//!
//! Which filter applies, first match wins: RUST_LOG, then the command
//! line's (`-v`, or wsproxy's LOG_LEVEL), then the config's `log_level`,
//! then `warn`. Only the config's can change live: the other two are the
//! operator's explicit choice for this process.

use std::sync::{OnceLock, RwLock};

use crate::config::LogFormat;

/// The installed logger.
struct Live {
    /// Rebuilt on a level change. The read lock is taken only for records
    /// that pass `log::max_level`, and is contended only during a reload.
    inner: RwLock<env_logger::Logger>,
    format: LogFormat,
    /// RUST_LOG or the command line chose the filter.
    pinned: bool,
}

static LOGGER: OnceLock<&'static Live> = OnceLock::new();

impl log::Log for Live {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .enabled(m)
    }

    fn log(&self, r: &log::Record<'_>) {
        let l = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if l.matches(r) {
            l.log(r);
        }
    }

    fn flush(&self) {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

/// An env_logger writing `format` lines through `filter`.
fn build(filter: &str, format: LogFormat) -> env_logger::Logger {
    let mut b = env_logger::Builder::new();
    b.parse_filters(filter);
    if format == LogFormat::Json {
        // serde_json escapes the message, so any message stays one line.
        b.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.build()
}

/// Installs the logger (once per process; later calls do nothing).
/// `cli` is the command line's filter, `config` the config's `log_level`.
pub fn init(cli: Option<&str>, config: Option<&str>, format: LogFormat) {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let pinned = env.is_some() || cli.is_some();
    let filter = env.as_deref().or(cli).or(config).unwrap_or("warn");
    let inner = build(filter, format);
    let max = inner.filter();
    let live: &'static Live = Box::leak(Box::new(Live {
        inner: RwLock::new(inner),
        format,
        pinned,
    }));
    if LOGGER.set(live).is_ok() && log::set_logger(live).is_ok() {
        log::set_max_level(max);
    }
}

/// What a new config `log_level` did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// It applies from now on.
    Applied,
    /// RUST_LOG or the command line chose the filter; it stays.
    Pinned,
    /// No logger is installed (a library user's own).
    NoLogger,
}

/// Applies the config's `log_level` (None: warnings) unless RUST_LOG or
/// the command line chose the filter.
pub fn set_config_level(level: Option<&str>) -> LevelChange {
    let Some(live) = LOGGER.get() else {
        return LevelChange::NoLogger;
    };
    if live.pinned {
        return LevelChange::Pinned;
    }
    let inner = build(level.unwrap_or("warn"), live.format);
    let max = inner.filter();
    *live.inner.write().unwrap_or_else(|e| e.into_inner()) = inner;
    log::set_max_level(max);
    LevelChange::Applied
}
