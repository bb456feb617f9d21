//! Fengda's connection hub: customers' WebSockets in, NLP answers streamed
//! back token by token.
//!
//! Module map:
//! - [`config`]: the one typed [`Config`] and the `serve` flags.
//! - [`auth`]: identity: tokens verified at the upgrade, per-tenant keys, expiry, reload.
//! - [`ids`]: validated newtype ids (`TenantId`, `ConversationId`, …) and `Party`, the
//!   only maker of a `ConversationKey` (a conversation within its tenant).
//! - [`protocol`]: the wire contract: frames, error codes, close codes.
//! - [`http`]: routes and listeners: `/ws` upgrade, `/healthz`, `/readyz`, the
//!   web demo on the public port; `/metrics` on the admin port.
//! - [`session`]: one customer's connection: reader, writer, bounded outbound queue.
//! - [`agent`]: one agent's connection: the conversations it watches, each
//!   with its own delivery cursor.
//! - [`writer`]: the writer half of every session: the one loop that owns a
//!   socket's sink (bursts, pings, the close frame).
//! - [`event`]: a conversation's durable events and the delivery [`event::Cursor`]
//!   (a leaf: shared by log, bus, fan-out and replier).
//! - [`store`]: the conversation log seam (durable events, seqs, idempotency,
//!   epochs, which conversation a user opens): in memory, or Redis for clusters
//!   ([`store::redis`] also holds the Redis event bus: one wire, one set of names).
//! - [`bus`]: the event bus seam (a conversation's events between nodes, handed
//!   to an incoming-event handler; presence): local only, or Redis pub/sub.
//! - [`owner`]: who answers a conversation (assistant, waiting, an agent)
//!   and the rules of taking it.
//! - [`presence`]: who is in a conversation (customer online, agents
//!   viewing) and who is typing: expiring signals, kept apart from the owner.
//! - [`listing`]: the agents' live list of a tenant's conversations: a
//!   snapshot, then each change (from every node).
//! - [`fanout`]: this node's sockets by conversation; encode once, fan out
//!   (the bus's incoming-event handler).
//! - [`conversations`]: log, bus and fan-out composed, local first: what
//!   sessions and replies call.
//! - [`reply`]: one question's answer: history, NLP stream, deltas, stored reply.
//! - [`nlp`]: the NLP endpoints: gRPC clients, breakers, retries, admission.
//! - [`tenant`]: per-tenant limits (connections and message rates counted
//!   across the cluster, message length, history turns, NLP calls, origins).
//! - [`server`]: the accept loop, connection caps and HTTP limits before any upgrade.
//! - [`metric`]: every exported metric's name and help text.
//! - [`redact`]: URLs as logs and metric labels show them (no credentials).
//!
//! [`App::build`] binds the listeners (and, without `nlp.url`, loads the
//! built-in answerer, called in-process through its service trait);
//! [`App::run`] serves until the shutdown future resolves, then closes every
//! session with 1001 and waits for its tasks within `shutdown_grace_ms`.
//!
//! These docs are written for the hub's maintainers and link to private
//! items: read them with `cargo doc -p fengda --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod agent;
pub mod auth;
pub mod bus;
pub mod config;
pub mod conversations;
pub mod event;
pub mod fanout;
pub mod http;
pub mod ids;
pub mod listing;
pub mod metric;
pub mod nlp;
pub mod owner;
pub mod presence;
pub mod protocol;
pub mod redact;
pub mod reply;
pub mod server;
pub mod session;
pub mod store;
pub mod tenant;
pub mod writer;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

use bus::{EventBus, LocalBus};
use config::StoreKind;
use conversations::Conversations;
use fanout::FanOut;
use nlp::{NlpClient, NlpPool};
use reply::Replier;
use store::{ConversationLog, MemoryLog, StoreError};

/// State shared by every request and session of this node.
pub struct AppState {
    pub config: Arc<Config>,
    pub conversations: Arc<Conversations>,
    pub replier: Replier,
    /// Owns every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the node shuts down; every session token is a child.
    pub shutdown: CancellationToken,
    /// False once shutdown begins: `/readyz` turns red and upgrades are refused.
    pub accepting: AtomicBool,
    /// Sessions running on this node (sockets past the upgrade).
    pub sessions_open: AtomicUsize,
    /// Renders `/metrics` (Prometheus text format, on the admin listener).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The node's connection caps (and per-address limits).
    pub connections: Arc<server::limits::ConnectionLimits>,
    /// Who may open sockets: token verification and the keys (reloadable).
    pub auth: Arc<auth::Auth>,
    /// Per-tenant limits and their counts (reloadable).
    pub tenants: Arc<tenant::Tenants>,
    /// The agents' live lists of this node ([`listing::run_listing`]).
    pub lists: listing::Lists,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the built-in answerer: {0}")]
    Answerer(#[from] fengda_nlp::error::BridgeError),
    #[error(transparent)]
    Nlp(#[from] nlp::NlpError),
    #[error("cannot connect to Redis: {0}")]
    Redis(#[from] StoreError),
    #[error("cannot connect to Redis for the tenant limits: {0}")]
    TenantCounts(#[from] tenant::CountError),
    #[error("cannot load the auth keys: {0}")]
    Keys(#[from] auth::keyring::KeyError),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// The endpoint name of the built-in answerer in logs and metric labels.
pub const IN_PROCESS: &str = "in-process";

/// A hub node, bound and ready to run.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// `admin_listen`: `/metrics` and the health probes, for operators.
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    state: Arc<AppState>,
    /// The in-process answerer, when no external NLP URL is configured.
    embedded_answerer: Option<fengda_nlp::NlpService>,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let auth = Arc::new(auth::Auth::new(&config.auth)?);
        auth.warn_if_exposed(config.listen);
        let (endpoints, embedded_answerer) = match config.nlp.endpoints() {
            urls if !urls.is_empty() => {
                let clients = urls.into_iter().map(|url| {
                    let client = NlpClient::connect_lazy(&url, &config.nlp)?;
                    Ok((url, client))
                });
                (clients.collect::<Result<Vec<_>, nlp::NlpError>>()?, None)
            }
            _ => {
                let backend = fengda_nlp::backend::BuiltinBackend::new(&config.answerer)?;
                // The hub's admission bounds the calls and its text limit the
                // questions; the service must not refuse below either.
                let limits = fengda_nlp::config::Limits {
                    max_concurrent_streams: config.nlp.max_concurrent,
                    max_question_bytes: config.websocket.max_text_bytes,
                    ..Default::default()
                };
                let service = fengda_nlp::NlpService::with_limits(Arc::new(backend), limits);
                info!("built-in answerer loaded; answering in-process");
                let client = NlpClient::in_process(service.clone(), &config.nlp);
                (vec![(IN_PROCESS.to_owned(), client)], Some(service))
            }
        };
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        // Before anything records a metric (the pool sets its endpoints' gauges).
        let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                tracker.spawn(run_metrics_upkeep(handle.clone(), shutdown.clone()));
                metric::describe();
                let version = env!("CARGO_PKG_VERSION");
                metrics::gauge!(crate::metric::INFO, "backend" => config.backend.name(), "version" => version).set(1.0);
                Some(handle)
            }
            Err(error) => {
                warn!(%error, "metrics recorder not installed; /metrics will be empty");
                None
            }
        };
        let nlp = Arc::new(NlpPool::new(endpoints, &config.nlp));
        let fanout = Arc::new(
            FanOut::with_max_sockets(config.conversation.max_sockets).with_typing_ttl(config.agents.typing_ttl()),
        );
        type Backend =
            (Arc<dyn ConversationLog>, Arc<dyn EventBus>, Arc<dyn presence::PresenceBoard>, Arc<dyn tenant::Counts>);
        let (log, bus, board, counts): Backend = match config.backend {
            StoreKind::Memory => {
                let memory = Arc::new(MemoryLog::new(&config.conversation));
                tracker.spawn(memory.clone().run_sweeper(fanout.clone(), shutdown.clone()));
                let counts = Arc::new(tenant::memory::MemoryCounts::new());
                tracker.spawn(run_tenant_upkeep(counts.clone(), shutdown.clone()));
                (memory, Arc::new(LocalBus), Arc::new(presence::LocalBoard), counts)
            }
            StoreKind::Redis => {
                let incoming = fanout.clone();
                let (log, bus) =
                    store::redis::connect(&config.redis, &config.conversation, incoming, &tracker, shutdown.clone())
                        .await?;
                let counts = tenant::redis::RedisCounts::connect(&config.redis, &tracker, shutdown.clone()).await?;
                (Arc::new(log), Arc::new(bus.clone()), Arc::new(bus), counts)
            }
        };
        tracker.spawn(fanout::run_presence(
            fanout.clone(),
            board.clone(),
            config.agents.presence_ttl(),
            config.agents.typing_ttl(),
            shutdown.clone(),
        ));
        let tenants = Arc::new(tenant::Tenants::new(&config, counts));
        nlp.set_tenant_caps(tenants.nlp_caps());
        let conversations = Arc::new(Conversations::new(log, bus, fanout, board));
        let (lists, lists_inbox) = listing::Lists::new();
        tracker.spawn(listing::run_listing(
            conversations.clone(),
            lists_inbox,
            config.agents.list_window(),
            config.agents.presence_ttl(),
            shutdown.clone(),
        ));
        tracker.spawn(session::handoff::run_timeouts(
            conversations.clone(),
            Duration::from_secs(config.agents.handoff_timeout_secs),
            shutdown.clone(),
        ));
        let replier = Replier::new(conversations.clone(), nlp.clone(), &config.nlp);
        tracker.spawn(nlp::run_health_checks(nlp, shutdown.clone()));
        let listener = bind_listener(config.listen).map_err(|source| AppError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(AppError::Serve)?;
        let admin_listener = bind_listener(config.admin_listen)
            .map_err(|source| AppError::Bind { addr: config.admin_listen, source })?;
        let admin_addr = admin_listener.local_addr().map_err(AppError::Serve)?;
        let max_connections = server::limits::max_connections(config.server.max_connections);
        info!(max_connections, "connection cap");
        let connections = Arc::new(server::limits::ConnectionLimits::new(&config.server, max_connections));
        tracker.spawn(run_limits_upkeep(connections.clone(), shutdown.clone()));
        let state = Arc::new(AppState {
            config: Arc::new(config),
            conversations,
            replier,
            tracker,
            shutdown,
            metrics,
            accepting: AtomicBool::new(true),
            sessions_open: AtomicUsize::new(0),
            connections,
            auth,
            tenants,
            lists,
        });
        Ok(Self { listener, local_addr, admin_listener, admin_addr, state, embedded_answerer })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What SIGHUP reloads: the auth keys and the tenant limits.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            auth: self.state.auth.clone(),
            tenants: self.state.tenants.clone(),
            nlp: self.state.replier.nlp.clone(),
        }
    }

    /// The admin listener's address (`/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` resolves, then drains: readiness goes red,
    /// sessions close with 1001, their tasks get `shutdown_grace_ms` to end.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), AppError> {
        let state = self.state.clone();
        let routes = http::routes(state.clone());
        let stop = CancellationToken::new();
        let stop_sessions = {
            let (state, stop) = (state.clone(), stop.clone());
            async move {
                shutdown.await;
                info!("shutting down: refusing new sockets, closing sessions");
                state.accepting.store(false, Ordering::Release);
                state.shutdown.cancel();
                stop.cancel();
            }
        };
        // The admin port answers (readiness red, metrics) until the drain is
        // over. It is the operators' (loopback by default): no connection limits.
        let stop_admin = CancellationToken::new();
        let admin = tokio::spawn(
            axum::serve(self.admin_listener, http::admin_routes(state.clone()).into_make_service())
                .with_graceful_shutdown(stop_admin.clone().cancelled_owned())
                .into_future(),
        );
        let signal = tokio::spawn(stop_sessions);
        let server = server::Server::new(&state.config.server, state.connections.clone(), routes);
        let connections = TaskTracker::new();
        server.run(self.listener, stop, connections.clone()).await;
        signal.abort();
        // Connections still speaking HTTP finish their request and close
        // (each bounded by the header and idle timeouts).
        let deadline = tokio::time::Instant::now() + state.config.shutdown_grace();
        connections.close();
        if tokio::time::timeout_at(deadline, connections.wait()).await.is_err() {
            warn!(remaining = connections.len(), "HTTP connections still open after the grace period");
        }
        state.tracker.close();
        if tokio::time::timeout_at(deadline, state.tracker.wait()).await.is_err() {
            warn!(remaining = state.tracker.len(), "sessions still running after the grace period");
        }
        stop_admin.cancel();
        let _ = admin.await;
        if let Some(answerer) = self.embedded_answerer {
            // Its token producers end once their replies are dropped.
            answerer.tasks().close();
            let _ = tokio::time::timeout(Duration::from_secs(1), answerer.tasks().wait()).await;
        }
        Ok(())
    }
}

/// Pending connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`, 4096 on current kernels). tokio's default of 1024
/// overflows when thousands of clients reconnect at once after a node
/// dies, and each overflowed SYN costs its client a 1 s retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Swaps in a new configuration's reloadable parts (SIGHUP).
pub struct Reloader {
    auth: Arc<auth::Auth>,
    tenants: Arc<tenant::Tenants>,
    nlp: Arc<NlpPool>,
}

impl Reloader {
    /// `config` was validated. The keys first: if they are refused, nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), auth::ReloadError> {
        self.auth.reload(&config.auth, config.listen)?;
        self.tenants.reload(config);
        self.nlp.set_tenant_caps(self.tenants.nlp_caps());
        Ok(())
    }
}

/// Forgets the message-rate state of users who have been quiet.
async fn run_tenant_upkeep(counts: Arc<tenant::memory::MemoryCounts>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => counts.upkeep(),
        }
    }
}

/// Forgets the connection-rate state of addresses that have been quiet.
async fn run_limits_upkeep(limits: Arc<server::limits::ConnectionLimits>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => limits.upkeep(),
        }
    }
}

/// Drains the metrics histograms into their summaries every few seconds (the
/// exporter keeps raw samples until then).
async fn run_metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, stop: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => handle.run_upkeep(),
        }
    }
}
