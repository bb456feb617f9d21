//! `[server]`: TCP connections and their HTTP requests before any upgrade
//! (caps, per-address limits, header and idle deadlines, trusted proxies).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Limits on TCP connections and their HTTP requests, before any upgrade.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TCP connections held at once, WebSockets included; beyond it new
    /// connections are refused (`503 at_capacity`) while `/healthz` is still
    /// answered. Default: the process's open-file limit (`RLIMIT_NOFILE`)
    /// minus [`RESERVED_FDS`], which is also the most it may be set to.
    pub max_connections: Option<usize>,
    /// A request's head (request line and headers) must arrive whole within
    /// this long from when the hub starts waiting for it: a new connection's
    /// first request, or a keep-alive connection's next. Default 10000 ms.
    pub header_read_timeout_ms: u64,
    /// A connection that has not become a WebSocket is closed after this
    /// long without a byte read or written. Default 30000 ms.
    pub http_idle_timeout_ms: u64,
    /// Largest request head in bytes; larger gets `431`. Default 16384.
    pub max_header_bytes: usize,
    /// TCP connections (WebSockets included) one client address may hold;
    /// 0 = no limit. Default 1000.
    pub max_connections_per_ip: usize,
    /// New connections per second one client address may open, sustained;
    /// 0 = no limit. Default 50.
    pub connection_rate_per_ip: u32,
    /// New connections one client address may open at once above the
    /// sustained rate. Default 1000.
    pub connection_burst_per_ip: u32,
    /// Proxies (addresses or CIDR blocks) whose connections are not limited
    /// per address; for their `/ws` upgrades the client address is the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy,
    /// and the per-address limits apply to it. Default empty.
    pub trusted_proxies: Vec<ProxyAddrs>,
    /// Accept HTTP/2 over cleartext TCP with prior knowledge (h2c), for a
    /// proxy that speaks it to the hub. WebSockets always use HTTP/1.1.
    /// Default false: HTTP/1.1 only.
    pub http2_cleartext: bool,
}

/// A trusted proxy: one address (`10.0.0.5`) or a CIDR block (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProxyAddrs(pub ipnet::IpNet);

impl std::str::FromStr for ProxyAddrs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match text.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Self(ip.into())),
            Err(_) => text
                .parse::<ipnet::IpNet>()
                .map(Self)
                .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR block")),
        }
    }
}

impl TryFrom<String> for ProxyAddrs {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<ProxyAddrs> for String {
    fn from(addrs: ProxyAddrs) -> Self {
        addrs.0.to_string()
    }
}

impl ProxyAddrs {
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.contains(ip)
    }
}

/// File descriptors kept out of `server.max_connections`: the listener,
/// Redis and NLP connections, logs, and connections being refused.
pub const RESERVED_FDS: usize = 128;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            header_read_timeout_ms: 10_000,
            http_idle_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_connections_per_ip: 1000,
            connection_rate_per_ip: 50,
            connection_burst_per_ip: 1000,
            trusted_proxies: Vec::new(),
            http2_cleartext: false,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.max_connections == Some(0) {
            return invalid("server.max_connections", "must be at least 1");
        }
        if self.header_read_timeout_ms == 0 || self.http_idle_timeout_ms == 0 {
            return invalid("server.header_read_timeout_ms", "and server.http_idle_timeout_ms must be non-zero");
        }
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return invalid("server.max_header_bytes", "must be between 8 KiB and 1 MiB");
        }
        if self.connection_rate_per_ip > 0 && self.connection_burst_per_ip == 0 {
            return invalid("server.connection_burst_per_ip", "must be at least 1 when connection_rate_per_ip is set");
        }
        Ok(())
    }
}
