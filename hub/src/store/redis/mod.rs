//! Cluster mode: many hub nodes sharing one Redis, as a [`RedisLog`] (the
//! conversation log) and a [`RedisBus`] (events between nodes), built
//! together by [`connect`] over one command connection.
//!
//! Storage: each conversation is a meta hash (its user, epoch, last seq,
//! and who answers it: `owner`, `owner_name`, `owner_epoch`, `owner_since`,
//! absent until the first change, which `append.lua` makes), a
//! capped list of durable events (JSON), a zset of customer message ids for
//! idempotent resends and a hash of the nodes listening to it, all under one
//! hash tag (see [`keys`]), their expiry refreshed by appends (see
//! [`Retention`]). Append is one Lua script (`append.lua`): check duplicate, assign
//! seq, push, trim, publish if another node listens — atomic, so two nodes
//! appending to one conversation can never race or leave a gap. The hub
//! encodes the event and its payload ([`wire`]); the script splices in the
//! seq and decodes nothing, and answers one string ([`answer`]). Opening a socket writes nothing for a
//! conversation that has no log yet: the first message's append creates it
//! (same script), counting it against the user's creation cap (their
//! `created` set, in the user's slot). A customer message's append also
//! returns the turns before it (the question's history): the script reads
//! them from the list it holds only when the log is not at the epoch and
//! seq this node knows its last turns at (see `recent.rs`), and refreshes
//! the user's `latest` pointer (in the user's slot, like the tenant's keys
//! the script touches: see [`keys`]). Each append is one command, an
//! `EVALSHA`: a reply costs two round trips, the question's append and its
//! own.
//!
//! Routing: pub/sub is the doorbell, the log is the truth. A node subscribes
//! to a conversation's channel (on one dedicated RESP3 connection, whatever
//! its socket count) when its first socket of the conversation arrives,
//! after entering the conversation's listeners hash and saying hello on the
//! channel (`listen.lua`; a lost log's old id gets no hash: the append that
//! creates it again enters its node). A new conversation is subscribed just
//! before its creating append instead, without `listen.lua`: no one else can
//! name it before it exists, and that append enters its node. Until then it
//! is neither read nor given a presence entry, so a socket that never asks
//! costs Redis one read, its open's (the user's most recent conversation).
//! A node unsubscribes, then leaves the hash, when the last socket goes. The node that produces
//! an event or a frame delivers it to its own sockets at once
//! ([`crate::conversations`]) and publishes it only for the other nodes: the append script publishes a durable event only if the
//! listeners hash names another node (exact: a node enters it before its
//! subscription and its log read, so an event it is not sent is in that
//! read), and deltas follow what the last append or PUBLISH said (see
//! [`publisher`]). What a node published and hears back (when it listens
//! too) is skipped from its first bytes, undecoded. A node that crashes
//! leaves its name in the hashes it was in until they expire: other nodes
//! then publish for nobody, which costs a PUBLISH and loses nothing.
//!
//! A log that is lost (flush, failover, expiry) takes its listeners hash
//! with it. The append that recreates it (seq 1, a new epoch) enters its
//! own node and publishes the event whoever listens; a node that hears it
//! on a channel it is subscribed to enters the hash again and has its
//! sessions of the conversation re-read the log (see `bus.rs`). Every
//! published event names its log's epoch, so a node's fan-out and each
//! socket follow the new log from seq 1 and never deliver the old one's
//! events after it ([`crate::event::Cursor`]).
//!
//! If the subscription drops, `/readyz` turns red, the connection manager
//! reconnects and resubscribes by itself (a heartbeat PING makes sure it
//! tries), and every local session re-reads the log after its last seq, so
//! nothing durable is missed; deltas published meanwhile are lost and
//! repaired by their `reply.done`. An append whose answer was lost on its
//! way back (a timeout) is stored but not delivered locally: the next event
//! of the conversation shows the gap and the sessions fill it from the log.
//!
//! All reads that decide correctness go to the one configured Redis (the
//! primary); there are no replica reads.

mod answer;
mod bus;
pub mod keys;
mod leftovers;
mod log;
mod presence;
mod publisher;
mod recent;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use super::StoreError;
use crate::bus::IncomingEvents;
use crate::config::{ConversationConfig, RedisConfig};
use keys::Keys;
use publisher::Listeners;
use recent::RecentTurns;
use wire::NodeId;

pub use bus::RedisBus;
pub use log::RedisLog;

impl From<RedisError> for StoreError {
    fn from(error: RedisError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// What the log and the bus share: names, this node's id, the command
/// connection, and what the node knows of other nodes' listening.
struct Link {
    keys: Keys,
    /// Names this node in published payloads, so it skips its own echoes,
    /// and in listeners hashes.
    node_id: NodeId,
    commands: ConnectionManager,
    command_timeout: Duration,
    /// How long a conversation's keys live.
    retention: Retention,
    listeners: Listeners,
    /// The last turns of the conversations this node listens to.
    recent: RecentTurns,
}

impl Link {
    /// Runs one Redis call. Its one deadline is the connection manager's
    /// ([`connect`]): no timer of our own is wrapped around the client's.
    async fn call<T>(&self, future: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        future.await.map_err(StoreError::from)
    }

    /// Runs `request`, whose commands include EVALSHAs of `scripts`, in one
    /// round trip; should Redis not know them (it restarted, SCRIPT FLUSH),
    /// loads them and runs the request once more (so every command in it
    /// must be one that may run twice: an EVALSHA that failed did nothing).
    async fn run_with_scripts<T: redis::FromRedisValue>(
        &self,
        scripts: &[&redis::Script],
        request: Request<'_>,
    ) -> Result<T, StoreError> {
        let mut con = self.commands.clone();
        match request.query::<T>(&mut con).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for script in scripts {
                    self.call(script.load_async(&mut con)).await?;
                }
                self.call(request.query::<T>(&mut con)).await
            }
            other => other.map_err(StoreError::from),
        }
    }

    /// Takes this node out of the conversation's listeners hash.
    async fn leave_listeners(&self, key: &crate::ids::ConversationKey) -> Result<(), StoreError> {
        let mut con = self.commands.clone();
        let hdel = redis::cmd("HDEL").arg(self.keys.listeners(key)).arg(self.node_id.as_str()).clone();
        self.call(hdel.query_async::<()>(&mut con)).await
    }
}

/// What [`Link::run_with_scripts`] sends: one command (an append is one
/// `EVALSHA`: a pipeline's bookkeeping showed in its profile) or a pipeline.
#[derive(Clone, Copy)]
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipeline(&'a redis::Pipeline),
}

impl Request<'_> {
    async fn query<T: redis::FromRedisValue>(self, con: &mut ConnectionManager) -> Result<T, RedisError> {
        match self {
            Request::Cmd(cmd) => cmd.query_async(con).await,
            Request::Pipeline(pipe) => pipe.query_async(con).await,
        }
    }
}

/// How long a conversation's keys live: at least `secs` after its last
/// activity, at most `refresh_secs` longer. An append refreshes the
/// expiry of the conversation's keys only when `refresh_secs` have passed
/// since the last refresh (EXPIREs of five keys on every append were a
/// quarter of `append.lua`'s calls), so every expiry set is
/// [`Retention::expire_secs`]: the slack covers the appends between two
/// refreshes.
#[derive(Clone, Copy, Debug)]
struct Retention {
    secs: u64,
    refresh_secs: u64,
}

impl Retention {
    /// A tenth of the retention, at most a minute: a week-long retention
    /// is refreshed at most once a minute per conversation.
    fn new(secs: u64) -> Self {
        Self { secs, refresh_secs: (secs / 10).min(60) }
    }

    /// What every EXPIRE of a conversation's keys sets.
    fn expire_secs(self) -> u64 {
        self.secs + self.refresh_secs
    }
}

/// Connects to Redis (it must be reachable at startup) and starts the bus's
/// dispatcher and publisher tasks on `tracker`, stopped by `shutdown`; what
/// other nodes publish goes to `incoming`.
pub async fn connect(
    config: &RedisConfig,
    conversation: &ConversationConfig,
    incoming: Arc<dyn IncomingEvents>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(RedisLog, RedisBus), StoreError> {
    let command_timeout = Duration::from_millis(config.command_timeout_ms);
    // The one deadline of every Redis call (`redis.command_timeout_ms`): the
    // client's response timeout, from when the command is written. On expiry
    // the manager also drops the connection and makes a new one, so a
    // half-dead link does not keep failing calls. A call made while the
    // link is being made again waits for that first: two attempts at most,
    // each given up after the same timeout, 50–500 ms apart.
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(command_timeout))
        .set_response_timeout(Some(command_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let client = redis::Client::open(config.url.as_str())?;
    let commands = with_timeout(command_timeout, client.get_connection_manager_with_config(manager_config.clone()))
        .await
        .and_then(|r| r.map_err(StoreError::from))?;

    let (push_tx, push_rx) = mpsc::unbounded_channel();
    // Unbounded like the library's own internal push channel that feeds
    // it; the dispatcher does only non-blocking work per push, so it keeps up.
    let subscriber_config = manager_config.set_push_sender(push_tx).set_automatic_resubscription();
    let subscriber = with_timeout(
        command_timeout,
        redis::Client::open(with_resp3(&config.url))?.get_connection_manager_with_config(subscriber_config),
    )
    .await
    .and_then(|r| r.map_err(StoreError::from))?;

    let link = Arc::new(Link {
        keys: Keys::new(&config.key_prefix),
        node_id: NodeId::generate(),
        commands,
        command_timeout,
        retention: Retention::new(conversation.redis_retention_secs(config)),
        listeners: Listeners::default(),
        recent: RecentTurns::new(conversation.history_turns, conversation.log_cap),
    });
    let log = RedisLog::new(link.clone(), conversation);
    let bus = RedisBus::start(link.clone(), subscriber, incoming, push_rx, tracker, shutdown).await?;
    let url = crate::redact::display_url(&config.url);
    info!(node_id = %link.node_id, prefix = %config.key_prefix, %url, "connected to Redis");
    Ok((log, bus))
}

/// Adds `protocol=resp3` to a Redis URL (pushes need RESP3).
fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

async fn with_timeout<T>(limit: Duration, future: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| StoreError::Unavailable(format!("Redis did not answer within {limit:?}")))
}
