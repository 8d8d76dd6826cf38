//! The `cluster:` section: several corerelay nodes on one Redis behave as
//! one server (DESIGN.md section 6). Its names: the node's id, and the key
//! and channel prefix every name below is built from.

use std::time::Duration;

use serde::Deserialize;

use super::{Dur, RedisFile, Size};

/// Every key and channel starts with this unless set.
pub const DEFAULT_CLUSTER_PREFIX: &str = "corerelay";
/// Largest message sent to another node: well under Redis' pub/sub output
/// buffer limit (32 MiB hard by default), which would otherwise disconnect
/// every subscriber of the receiving node at once.
pub const DEFAULT_CLUSTER_MAX_MESSAGE: u64 = 8 << 20;
/// How often a node says it is alive on the control channel.
pub const DEFAULT_CLUSTER_PING_INTERVAL: Duration = Duration::from_secs(2);
/// A node not heard from for this long is forgotten (three pings).
pub const DEFAULT_CLUSTER_NODE_EXPIRY: Duration = Duration::from_secs(6);
/// How long an admin call waits for the other nodes' counts.
pub const DEFAULT_CLUSTER_SURVEY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an owner key outlives its login's last word (a login that
/// ends deletes its key; this bounds what a killed node leaves behind).
pub const DEFAULT_CLUSTER_OWNER_TTL: Duration = Duration::from_secs(24 * 3600);

/// The `cluster:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterFile {
    /// The Redis every node of the cluster shares.
    pub redis_url: Option<String>,
    /// Connection settings for it (as in `redis:`; its `url` is
    /// `redis_url`).
    pub redis: Option<RedisFile>,
    /// This node's name (default: the host name and a random suffix).
    pub node_id: Option<String>,
    /// Prefix of every key and channel.
    pub prefix: Option<String>,
    /// Largest message sent to another node.
    pub max_message_size: Option<Size>,
    /// Lifetime of an id's owner key.
    pub owner_ttl: Option<Dur>,
    /// How often this node says it is alive.
    pub ping_interval: Option<Dur>,
    /// A node not heard from for this long is forgotten.
    pub node_expiry: Option<Dur>,
    /// How long an admin call waits for the other nodes.
    pub survey_timeout: Option<Dur>,
}

/// A validated `cluster:` section.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name.
    pub node_id: String,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// Its Redis server's index (`Config::redis_server`).
    pub server: usize,
    /// Largest message sent to another node.
    pub max_message_size: usize,
    /// Lifetime of an owner key.
    pub owner_ttl: Duration,
    /// `{prefix}:id:`, made once (it is written per relayed message).
    pub id_prefix: Vec<u8>,
    /// How often this node says it is alive.
    pub ping_interval: Duration,
    /// A node not heard from for this long is forgotten.
    pub node_expiry: Duration,
    /// How long an admin call waits for the other nodes.
    pub survey_timeout: Duration,
}

impl ClusterConfig {
    /// The channel node-bound messages for id `id` travel on, subscribed
    /// by whichever node holds it.
    pub fn id_channel(&self, id: &[u8]) -> Vec<u8> {
        let mut c = format!("{}:id:", self.prefix).into_bytes();
        c.extend_from_slice(id);
        c
    }

    /// The prefix of [`Self::id_channel`] names.
    pub fn id_channel_prefix(&self) -> Vec<u8> {
        self.id_prefix.clone()
    }

    /// The hash that names the node holding `id` and each node's newest
    /// claim on it (last login wins).
    pub fn owner_key(&self, id: &[u8]) -> Vec<u8> {
        let mut c = format!("{}:own:", self.prefix).into_bytes();
        c.extend_from_slice(id);
        c
    }

    /// The prefix of every node's own channel (its id follows).
    pub fn node_channel_prefix(&self) -> String {
        format!("{}:node:", self.prefix)
    }

    /// This node's own channel (kicks and survey answers for it).
    pub fn node_channel(&self) -> Vec<u8> {
        format!("{}{}", self.node_channel_prefix(), self.node_id).into_bytes()
    }

    /// The channel every node hears: pings and surveys.
    pub fn ctl_channel(&self) -> Vec<u8> {
        format!("{}:ctl", self.prefix).into_bytes()
    }
}

/// A node name: the host name and 6 random hex digits, so two nodes on one
/// host (or a restarted node) never share one.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let r = uuid::Uuid::new_v4().as_u128() as u32 & 0xff_ffff;
    format!("{host}-{r:06x}")
}

impl ClusterFile {
    /// Validates; errors are (key under `cluster.`, message). The Redis
    /// settings come back apart, for the caller to give an index.
    pub fn validate(self) -> Result<(ClusterConfig, RedisFile), (String, String)> {
        let mut redis = self.redis.unwrap_or_default();
        match (self.redis_url, &redis.url) {
            (Some(_), Some(_)) => {
                return Err((
                    "redis.url".into(),
                    "give the URL once: redis_url or redis.url".into(),
                ))
            }
            (Some(u), None) => redis.url = Some(u),
            _ => {}
        }
        let node_id = self.node_id.unwrap_or_else(default_node_id);
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'|')
        };
        if !name_ok(&node_id) {
            return Err((
                "node_id".into(),
                "1 to 128 printable characters, no spaces and no '|'".into(),
            ));
        }
        let prefix = self
            .prefix
            .unwrap_or_else(|| DEFAULT_CLUSTER_PREFIX.to_owned());
        if !name_ok(&prefix) {
            return Err((
                "prefix".into(),
                "1 to 128 printable characters, no spaces and no '|'".into(),
            ));
        }
        let max = self
            .max_message_size
            .map_or(DEFAULT_CLUSTER_MAX_MESSAGE, |s| s.0);
        if !(1..=512 << 20).contains(&max) {
            return Err((
                "max_message_size".into(),
                format!("{max} is outside 1..=512MiB"),
            ));
        }
        let ttl = self.owner_ttl.map_or(DEFAULT_CLUSTER_OWNER_TTL, |d| d.0);
        if ttl < Duration::from_secs(1) {
            return Err(("owner_ttl".into(), "at least 1s".into()));
        }
        let ping = self
            .ping_interval
            .map_or(DEFAULT_CLUSTER_PING_INTERVAL, |d| d.0);
        if ping < Duration::from_millis(100) {
            return Err(("ping_interval".into(), "at least 100ms".into()));
        }
        let expiry = self
            .node_expiry
            .map_or(DEFAULT_CLUSTER_NODE_EXPIRY, |d| d.0);
        if expiry < 2 * ping {
            return Err((
                "node_expiry".into(),
                "at least twice ping_interval (one lost ping must not forget a node)".into(),
            ));
        }
        let survey = self
            .survey_timeout
            .map_or(DEFAULT_CLUSTER_SURVEY_TIMEOUT, |d| d.0)
            .max(Duration::from_millis(10));
        Ok((
            ClusterConfig {
                node_id,
                id_prefix: format!("{prefix}:id:").into_bytes(),
                prefix,
                server: usize::MAX,
                max_message_size: max as usize,
                owner_ttl: ttl,
                ping_interval: ping,
                node_expiry: expiry,
                survey_timeout: survey,
            },
            redis,
        ))
    }
}
