//! Veltix listeners (`veltix:`): each speaks one wire format (v1, the
//! README's, or v3, what PyPI's veltix 3.3.0 speaks) and is a hub, an echo,
//! or a sink.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, Size};
use crate::protocol::veltix::Version;

/// Veltix: the wire format PyPI's client speaks.
pub const DEFAULT_VELTIX_VERSION: u8 = 3;
/// Veltix's own largest frame (header and content): 10 MiB.
pub const DEFAULT_VELTIX_MAX_MESSAGE: u64 = 10 * 1024 * 1024;
/// Veltix 3.3.0: each handshake read must come within 5 s.
pub const DEFAULT_VELTIX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Close a client whose ping is unanswered this long (when pinging).
pub const DEFAULT_VELTIX_PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// What a Veltix listener does with a client's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VeltixOnMessage {
    /// Every other client of the listener gets it, on every core (the
    /// README's chat; Veltix's `broadcast(..., except_clients=[sender])`).
    Hub,
    /// The sender gets it back (v3: same type, content and request id, as
    /// `Request.respond` does).
    Echo,
    /// Discarded (counted).
    None,
}

/// One `veltix:` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeltixFile {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// 1 or 3.
    pub version: Option<u8>,
    /// hub, echo or none.
    pub on_message: Option<VeltixOnMessage>,
    /// Clients at once on this listener (v3 answers server_full past it).
    pub max_clients: Option<usize>,
    /// Largest frame, header and content.
    pub max_message_size: Option<Size>,
    /// The v3 handshake must complete within this.
    pub handshake_timeout: Option<Dur>,
    /// v3: ping idle clients this often; 0 (the default) never.
    pub ping_interval: Option<Dur>,
    /// v3: close a client whose ping is unanswered this long.
    pub pong_timeout: Option<Dur>,
    /// Serve this listener over TLS.
    pub tls: Option<super::TlsFile>,
}

/// A validated Veltix listener.
#[derive(Debug, Clone)]
pub struct VeltixConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Wire format.
    pub version: Version,
    /// What client frames do.
    pub on_message: VeltixOnMessage,
    /// Clients at once (default: the server's max_connections).
    pub max_clients: usize,
    /// Largest frame, header and content.
    pub max_message_size: usize,
    /// v3 handshake deadline.
    pub handshake_timeout: Duration,
    /// v3 server pings (None: never).
    pub ping_interval: Option<Duration>,
    /// v3 pong deadline.
    pub pong_timeout: Duration,
    /// TLS for this listener (None: plain TCP).
    pub tls: Option<super::ServerTls>,
}

/// Validates the `veltix:` list.
pub(super) fn validate_veltix(
    files: Vec<VeltixFile>,
    max_connections: usize,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<VeltixConfig>, ConfigError> {
    let mut out = Vec::with_capacity(files.len());
    for (i, f) in files.into_iter().enumerate() {
        let key = |k: &str| format!("veltix[{i}].{k}");
        let version = match f.version.unwrap_or(DEFAULT_VELTIX_VERSION) {
            1 => Version::V1,
            3 => Version::V3,
            v => return Err(err(&key("version"), format!("{v} is not 1 or 3"))),
        };
        let max = f
            .max_message_size
            .map_or(DEFAULT_VELTIX_MAX_MESSAGE, |s| s.0);
        if !(64..=1 << 30).contains(&max) {
            return Err(err(
                &key("max_message_size"),
                format!("{max} is not within 64 bytes and 1 GiB"),
            ));
        }
        let tls = match f.tls {
            None => None,
            Some(t) => Some(
                t.validate()
                    .map_err(|(k, m)| err(&key(&format!("tls.{k}")), m))?,
            ),
        };
        let max_clients = f.max_clients.unwrap_or(max_connections);
        if max_clients == 0 {
            return Err(err(&key("max_clients"), "must be at least 1".into()));
        }
        out.push(VeltixConfig {
            listen: f.listen,
            version,
            on_message: f.on_message.unwrap_or(VeltixOnMessage::Hub),
            max_clients,
            max_message_size: max as usize,
            handshake_timeout: f
                .handshake_timeout
                .map_or(DEFAULT_VELTIX_HANDSHAKE_TIMEOUT, |d| d.0),
            ping_interval: f.ping_interval.map(|d| d.0).filter(|d| !d.is_zero()),
            pong_timeout: f.pong_timeout.map_or(DEFAULT_VELTIX_PONG_TIMEOUT, |d| d.0),
            tls,
        });
    }
    Ok(out)
}
