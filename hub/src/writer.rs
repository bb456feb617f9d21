//! The writer half of every session, a customer's or an agent's: the only
//! owner of the socket's sink, and the one loop that drives it ([`run`]).
//!
//! It writes the session's intro, then drains the bounded outbound queue in
//! bursts (feed every queued item, flush once), takes the reader's commands
//! (an agent's watches) and sends keepalive pings. Every write that has to
//! wait for the client races the cancellation token ([`Sink`]), so a client
//! that stops reading cannot pin the task; the work between writes runs to
//! its end. When the session is cancelled, a write fails or a channel
//! closes, it sends the close frame whose reason the [`SessionCloser`]
//! recorded (or, when the client closed first, the echo of the client's
//! close frame), within [`CLOSE_TIMEOUT`]. What the queue's items mean for
//! the socket (one conversation's delivery cursor, or one per watched
//! conversation) is each kind's [`Writes`]; reading a gap's events from the
//! log is shared ([`read_log_gap`]).

mod sink;

use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
pub(crate) use sink::Sink;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::conversations::Conversations;
use crate::fanout::{Outbound, SessionCloser};
use crate::ids::ConversationKey;
use crate::protocol::close::{self, CloseReason};
use crate::store::{Snapshot, StoreError};

/// Queue items written per flush at most (a gap's fill or a batch of
/// deltas adds frames to its item's).
pub(crate) const BURST: usize = 64;
/// How long a closing socket gets to take its close frame.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pauses before each new try to read a gap's events from the store (about
/// 1.5 s in all) before the session gives up and closes with 4503.
const GAP_READ_RETRIES: [Duration; 4] =
    [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400), Duration::from_millis(800)];

/// Why a writer stopped early.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The socket refused a write (the client went away, or closed first).
    Socket(axum::Error),
    /// The session was cancelled while a write waited for the client.
    Cancelled,
    /// A gap could not be filled from the store: the session closes with
    /// 4503 rather than skip events, and the client resumes from the last
    /// seq it really got.
    GapUnfilled,
}

/// What one kind of session writes for the items of its queue.
pub(crate) trait Writes: Send {
    /// What the session's reader hands the writer.
    type Command: Send;

    /// The frames written before anything queued (`ready`, a replay).
    fn intro(&mut self) -> Vec<Utf8Bytes>;

    /// Writes a burst of queued items, then flushes the sink.
    #[allow(clippy::vec_box, reason = "the items arrive boxed from the queue (see `SessionHandle::tx`)")]
    fn burst(
        &mut self,
        sink: &mut Sink<'_>,
        burst: &mut Vec<Box<Outbound>>,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Carries out a command of the reader's.
    fn command(
        &mut self,
        sink: &mut Sink<'_>,
        command: Self::Command,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// What a closing socket still gets of what is left in its queue
    /// (not asked after a failed write or an intro cut short, nor when the
    /// socket is closed for being a slow consumer).
    fn before_close(&mut self, queued: &mut dyn Iterator<Item = Outbound>) -> Vec<Utf8Bytes>;

    /// Runs once the loop has ended, before the queue's last frames and the
    /// close frame (an agent leaves its watches).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// When the keepalive pings go.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pings {
    pub first: Duration,
    pub interval: Duration,
}

/// Not an `async fn`, so that its arguments are not kept twice in the
/// future (as arguments and as the locals they move into): it lives as long
/// as the socket, so the ping timer is made here, not from `pings` inside
/// it. `commands` is `None` for a session whose reader has none. Call it
/// within the runtime (making the timer takes the runtime's handle).
#[allow(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(crate) fn run<W: Writes>(
    socket: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Box<Outbound>>,
    mut commands: Option<mpsc::Receiver<W::Command>>,
    mut writes: W,
    closer: SessionCloser,
    pings: Pings,
) -> impl Future<Output = ()> + Send {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + pings.first, pings.interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    async move {
        // Grows on the first burst (`recv_many` reserves); an idle socket never pays for it.
        let mut burst = Vec::new();
        let intro = writes.intro();
        // One waiter for the session's life, not one registration per write.
        let cancelled = closer.token().clone().cancelled_owned();
        tokio::pin!(cancelled);
        let mut sink = Sink::new(socket, cancelled);
        let mut intro_written = false;
        let result: Result<(), WriteError> = async {
            write_intro(&mut sink, intro).await?;
            intro_written = true;
            loop {
                tokio::select! {
                    biased;
                    () = sink.cancelled() => return Ok(()),
                    command = next_command(&mut commands) => {
                        let Some(command) = command else { return Ok(()) };
                        writes.command(&mut sink, command).await?;
                    }
                    received = queue.recv_many(&mut burst, BURST) => {
                        if received == 0 {
                            return Ok(());
                        }
                        writes.burst(&mut sink, &mut burst).await?;
                    }
                    _ = ping.tick() => sink.send(Message::Ping(Default::default())).await?,
                }
            }
        }
        .await;
        // The socket refused a write: nothing more can go out on it.
        let failed = matches!(result, Err(WriteError::Socket(_)));
        match result {
            Err(WriteError::GapUnfilled) => closer.close(close::UNAVAILABLE),
            Err(WriteError::Socket(error)) => {
                // Also what a write after the client's close frame gets.
                debug!(%error, "socket write failed");
                closer.close(close::NORMAL);
            }
            Ok(()) | Err(WriteError::Cancelled) => {}
        }
        writes.finish().await;
        sink.closing();
        let reason = closer.reason();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            // Frames queued before the close (say, the error that explains it)
            // still go out first, unless the client is the reason we stop. Not
            // after an intro cut short: the queue's events come after a replay
            // the client did not get whole, and the writer counts it as sent,
            // so the client would take the gap for events it has.
            if !failed && intro_written && reason != close::SLOW_CONSUMER {
                let mut queued = std::iter::from_fn(|| queue.try_recv().ok().map(|item| *item));
                for frame in writes.before_close(&mut queued) {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        break;
                    }
                }
            }
            // Refused once the client's own close frame has arrived: the
            // library has then queued its echo (RFC 6455 §5.5.1), which
            // `close` sends; otherwise `close` just flushes ours.
            let _ = sink.send(close_message(reason)).await;
            sink.close().await
        })
        .await;
    }
}

/// The reader's next command; never, for a session without commands.
async fn next_command<C>(commands: &mut Option<mpsc::Receiver<C>>) -> Option<C> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

async fn write_intro(sink: &mut Sink<'_>, intro: Vec<Utf8Bytes>) -> Result<(), WriteError> {
    for frame in intro {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

/// The close frame that tells the client `reason`.
pub(crate) fn close_message(reason: CloseReason) -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame { code: reason.code, reason: reason.reason.into() }))
}

/// Reads a socket's missed events, with where the log stands (its epoch:
/// the gap may be a new log), after `after`, for a gap before `before`
/// (`u64::MAX`: a resync). A store that just came back gets a few more
/// tries; past them it is [`WriteError::GapUnfilled`], and the caller
/// closes the socket rather than skip past the gap (sending what comes
/// after would tell the client it has events it never got). A resync asks
/// "did I miss anything?": if the store cannot say yet, `None` (the next
/// event's seq will show any gap, which is then filled).
pub(crate) async fn read_log_gap(
    conversations: &Conversations,
    key: &ConversationKey,
    after: u64,
    before: u64,
) -> Result<Option<Snapshot>, WriteError> {
    let resync = before == u64::MAX;
    let mut tries = if resync { [].iter() } else { GAP_READ_RETRIES.iter() };
    loop {
        let read = conversations.read_log(key, after).await;
        match read.and_then(|log| log.ok_or(StoreError::ConversationNotFound)) {
            Ok(log) => return Ok(Some(log)),
            Err(error) if resync => {
                warn!(%error, after, "cannot re-read the event stream after a resync");
                return Ok(None);
            }
            Err(error) if tries.len() > 0 => {
                debug!(%error, after, "cannot fill a gap yet; retrying");
                tokio::time::sleep(*tries.next().unwrap_or(&Duration::ZERO)).await;
            }
            Err(error) => {
                warn!(%error, after, "cannot fill a gap in the event stream; closing the session");
                return Err(WriteError::GapUnfilled);
            }
        }
    }
}
