//! Who may hold a connection: the node's connection cap, kept below its
//! open-file limit, and the per-client-address cap and rate.
//!
//! A node that runs out of file descriptors cannot even answer its liveness
//! probe, so the cap leaves [`RESERVED_FDS`](crate::config::RESERVED_FDS)
//! free: some of them serve the connections being refused (a few at a time,
//! briefly: a JSON `429`/`503`, while `/healthz` and `/readyz` are still
//! answered on them). The per-address limits stop one machine from taking
//! the node's sockets; connections from a trusted proxy are not limited by
//! the proxy's address but, at the `/ws` upgrade, by the client address it
//! forwards in `X-Forwarded-For`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::HeaderMap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ProxyAddrs, ServerConfig};

/// Connections being refused at once (each answered, then closed within
/// [`super::REFUSAL_DEADLINE`]); beyond them a refused connection is closed
/// without an answer. Taken from the reserved descriptors.
pub const REFUSAL_LANE: usize = 64;

/// The part of [`REFUSAL_LANE`] that refusals of one client address's
/// limits may use. The rest is kept for refusals at the node's cap, whose
/// lane is what still answers the orchestrator's health probes when the
/// node is full: one flooding address must not crowd them out.
pub const ADDRESS_REFUSAL_LANE: usize = REFUSAL_LANE / 4;

/// Why a connection (or an upgrade through a trusted proxy) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `server.max_connections` connections.
    AtCapacity,
    /// The client address holds `server.max_connections_per_ip` connections.
    AddressConnections,
    /// The client address opened connections faster than
    /// `server.connection_rate_per_ip`; it may retry after this many seconds.
    AddressRate { retry_after_secs: u64 },
}

impl Refusal {
    /// The `reason` label of `fengda_hub_connections_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::AtCapacity => "at_capacity",
            Self::AddressConnections => "address_connections",
            Self::AddressRate { .. } => "address_rate",
        }
    }

    pub fn count(self) {
        metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "reason" => self.reason()).increment(1);
    }
}

/// What the accept loop does with a new connection.
pub enum Verdict {
    /// Serve it; the slot is released when the connection (or the WebSocket
    /// it became) closes.
    Admitted(Slot),
    /// Answer it with the refusal, holding a place in the refusal lane.
    Refused(Refusal, OwnedSemaphorePermit),
    /// Refused, and the refusal lane is full: close it at once.
    Dropped(Refusal),
}

/// A connection's places under the node's and its address's caps.
pub struct Slot {
    _open: OwnedSemaphorePermit,
    _address: Option<AddressGuard>,
}

/// The node's connection limits.
pub struct ConnectionLimits {
    max_open: usize,
    open: Arc<Semaphore>,
    /// Places for refusals at the node's cap.
    refusing: Arc<Semaphore>,
    /// Places for refusals of a client address's limits (kept apart).
    refusing_addresses: Arc<Semaphore>,
    addresses: Arc<AddressLimits>,
    trusted_proxies: Vec<ProxyAddrs>,
}

impl ConnectionLimits {
    /// `max_open` is `server.max_connections` with its default applied (see [`max_connections`]).
    pub fn new(config: &ServerConfig, max_open: usize) -> Self {
        let rate = NonZeroU32::new(config.connection_rate_per_ip).map(|rate| {
            let burst = NonZeroU32::new(config.connection_burst_per_ip).unwrap_or(NonZeroU32::MIN);
            RateLimiter::dashmap_with_clock(Quota::per_second(rate).allow_burst(burst), DefaultClock::default())
        });
        Self {
            max_open,
            open: Arc::new(Semaphore::new(max_open)),
            refusing: Arc::new(Semaphore::new(REFUSAL_LANE - ADDRESS_REFUSAL_LANE)),
            refusing_addresses: Arc::new(Semaphore::new(ADDRESS_REFUSAL_LANE)),
            addresses: Arc::new(AddressLimits {
                max: config.max_connections_per_ip,
                counts: DashMap::default(),
                rate,
                clock: DefaultClock::default(),
            }),
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    /// Decides on a connection accepted from `peer`.
    pub fn admit(&self, peer: IpAddr) -> Verdict {
        let address = if self.is_trusted_proxy(&peer) { Ok(None) } else { self.addresses.acquire(peer) };
        let admitted = address.and_then(|address| match self.open.clone().try_acquire_owned() {
            Ok(open) => Ok(Slot { _open: open, _address: address }),
            Err(_) => Err(Refusal::AtCapacity),
        });
        match admitted {
            Ok(slot) => Verdict::Admitted(slot),
            Err(refusal) => {
                refusal.count();
                let lane = match refusal {
                    Refusal::AtCapacity => &self.refusing,
                    Refusal::AddressConnections | Refusal::AddressRate { .. } => &self.refusing_addresses,
                };
                match lane.clone().try_acquire_owned() {
                    Ok(lane) => Verdict::Refused(refusal, lane),
                    Err(_) => Verdict::Dropped(refusal),
                }
            }
        }
    }

    /// The per-address limits for a client a trusted proxy forwarded: the
    /// guard is held for the WebSocket's life.
    pub fn admit_forwarded(&self, client: IpAddr) -> Result<Option<AddressGuard>, Refusal> {
        self.addresses.acquire(client).inspect_err(|refusal| refusal.count())
    }

    pub fn is_trusted_proxy(&self, ip: &IpAddr) -> bool {
        self.trusted_proxies.iter().any(|proxy| proxy.contains(ip))
    }

    /// The client address a trusted proxy forwarded: the rightmost
    /// `X-Forwarded-For` entry that is not a trusted proxy itself (entries
    /// further left were written by the client and prove nothing). None
    /// without the header, or when an entry on the way is not an address.
    pub fn forwarded_client(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for entry in entries.iter().rev() {
            let ip = parse_forwarded(entry)?;
            if !self.is_trusted_proxy(&ip) {
                return Some(ip);
            }
        }
        entries.first().and_then(|entry| parse_forwarded(entry))
    }

    /// Connections open now (WebSockets included).
    pub fn open(&self) -> usize {
        self.max_open - self.open.available_permits()
    }

    pub fn max_open(&self) -> usize {
        self.max_open
    }

    pub fn at_capacity(&self) -> bool {
        self.open.available_permits() == 0
    }

    /// Forgets rate-limit state of addresses that are back to a full burst.
    pub fn upkeep(&self) {
        if let Some(rate) = &self.addresses.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }
}

/// `1.2.3.4`, `::1`, `1.2.3.4:5678` or `[::1]:5678`.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|addr| addr.ip()))
}

type AddressRateLimiter = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

struct AddressLimits {
    /// 0: no cap.
    max: usize,
    /// Connections per address; an address leaves the map with its last one.
    counts: DashMap<IpAddr, usize>,
    rate: Option<AddressRateLimiter>,
    clock: DefaultClock,
}

impl AddressLimits {
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<AddressGuard>, Refusal> {
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check_key(&ip)
        {
            let wait = not_until.wait_time_from(self.clock.now());
            return Err(Refusal::AddressRate { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 });
        }
        if self.max == 0 {
            return Ok(None);
        }
        let mut count = self.counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return Err(Refusal::AddressConnections);
        }
        *count += 1;
        Ok(Some(AddressGuard { limits: self.clone(), ip }))
    }
}

/// One connection of an address, counted until dropped.
pub struct AddressGuard {
    limits: Arc<AddressLimits>,
    ip: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        self.limits.counts.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// `server.max_connections` with its default applied: the open-file limit
/// minus the reserve, which is also its ceiling (a larger configured value
/// is lowered to it, with a warning).
pub fn max_connections(configured: Option<usize>) -> usize {
    let ceiling = match open_file_limit() {
        Some(limit) => limit.saturating_sub(crate::config::RESERVED_FDS as u64).max(1) as usize,
        None => usize::MAX >> 4,
    };
    match configured {
        Some(max) if max > ceiling => {
            tracing::warn!(
                configured = max,
                ceiling,
                "server.max_connections is above the open-file limit minus its reserve; using the ceiling"
            );
            ceiling
        }
        Some(max) => max,
        None => ceiling,
    }
}

/// The soft `RLIMIT_NOFILE`, if the platform has one.
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 && limit.rlim_cur != libc::RLIM_INFINITY {
            #[allow(clippy::unnecessary_cast, reason = "rlim_t is not u64 on every platform")]
            return Some(limit.rlim_cur as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: ServerConfig, max_open: usize) -> ConnectionLimits {
        ConnectionLimits::new(&config, max_open)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_address_cap_counts_until_the_guard_drops() {
        let limits = limits(ServerConfig { max_connections_per_ip: 2, ..Default::default() }, 10);
        let a = limits.admit(ip("10.0.0.1"));
        let b = limits.admit(ip("10.0.0.1"));
        assert!(matches!(limits.admit(ip("10.0.0.1")), Verdict::Refused(Refusal::AddressConnections, _)));
        assert!(matches!(limits.admit(ip("10.0.0.2")), Verdict::Admitted(_)));
        drop(a);
        assert!(matches!(limits.admit(ip("10.0.0.1")), Verdict::Admitted(_)));
        drop(b);
        assert_eq!(limits.open(), 0, "every slot released");
        assert!(limits.addresses.counts.is_empty());
    }

    #[test]
    fn node_cap_then_refusal_lane_then_drop() {
        let limits = limits(ServerConfig { max_connections_per_ip: 0, ..Default::default() }, 1);
        let _held = limits.admit(ip("10.0.0.1"));
        assert!(limits.at_capacity());
        let lane: Vec<_> = (0..REFUSAL_LANE - ADDRESS_REFUSAL_LANE).map(|_| limits.admit(ip("10.0.0.2"))).collect();
        assert!(lane.iter().all(|a| matches!(a, Verdict::Refused(Refusal::AtCapacity, _))));
        assert!(matches!(limits.admit(ip("10.0.0.2")), Verdict::Dropped(Refusal::AtCapacity)));
    }

    #[test]
    fn a_flooding_address_cannot_take_the_lane_of_refusals_at_capacity() {
        let config = ServerConfig { max_connections_per_ip: 1, ..Default::default() };
        let limits = limits(config, 1);
        let _held = limits.admit(ip("10.0.0.1"));
        let flood: Vec<_> = (0..ADDRESS_REFUSAL_LANE).map(|_| limits.admit(ip("10.0.0.1"))).collect();
        assert!(flood.iter().all(|a| matches!(a, Verdict::Refused(Refusal::AddressConnections, _))));
        assert!(matches!(limits.admit(ip("10.0.0.1")), Verdict::Dropped(Refusal::AddressConnections)));
        // A probe from elsewhere at the full node is still answered.
        assert!(matches!(limits.admit(ip("10.0.0.9")), Verdict::Refused(Refusal::AtCapacity, _)));
    }

    #[test]
    fn rate_limit_refuses_past_the_burst_with_a_retry_time() {
        let config = ServerConfig { connection_rate_per_ip: 1, connection_burst_per_ip: 3, ..Default::default() };
        let limits = limits(config, 100);
        let held: Vec<_> = (0..3).map(|_| limits.admit(ip("10.0.0.1"))).collect();
        assert!(held.iter().all(|a| matches!(a, Verdict::Admitted(_))));
        match limits.admit(ip("10.0.0.1")) {
            Verdict::Refused(Refusal::AddressRate { retry_after_secs }, _) => assert_eq!(retry_after_secs, 1),
            _ => panic!("expected a rate refusal"),
        }
    }

    #[test]
    fn trusted_proxies_are_not_limited_and_forward_the_rightmost_untrusted_address() {
        let config = ServerConfig {
            max_connections_per_ip: 1,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.1".parse().unwrap()],
            ..Default::default()
        };
        let limits = limits(config, 100);
        let held: Vec<_> = (0..5).map(|_| limits.admit(ip("10.1.2.3"))).collect();
        assert!(held.iter().all(|a| matches!(a, Verdict::Admitted(_))));
        let forwarded = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", value.parse().unwrap());
            limits.forwarded_client(&headers)
        };
        assert_eq!(forwarded("1.1.1.1, 203.0.113.7, 10.0.0.9"), Some(ip("203.0.113.7")));
        assert_eq!(forwarded("203.0.113.7:4567"), Some(ip("203.0.113.7")));
        assert_eq!(forwarded("garbage, 192.168.1.1"), None);
        assert_eq!(forwarded("10.0.0.2, 192.168.1.1"), Some(ip("10.0.0.2")));
        assert_eq!(limits.forwarded_client(&HeaderMap::new()), None);
        let guard = limits.admit_forwarded(ip("203.0.113.7")).unwrap();
        assert_eq!(limits.admit_forwarded(ip("203.0.113.7")).err(), Some(Refusal::AddressConnections));
        drop(guard);
        assert!(limits.admit_forwarded(ip("203.0.113.7")).is_ok());
    }
}
