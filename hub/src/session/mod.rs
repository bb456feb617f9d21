//! One WebSocket connection, from upgrade to close.
//!
//! A session is up to three tasks: the reader (this task: parses client
//! frames, stores messages), the writer ([`crate::writer`]'s loop with this
//! module's [`writer`]: alone owns the sink, drains a bounded queue) and
//! the replier (answers this socket's questions in order; started by the
//! first question, so an idle socket costs two tasks). They
//! share one [`SessionCloser`]; whichever side ends first cancels it and
//! the writer sends the close frame with the recorded reason.

pub(crate) mod handoff;
mod reader;
mod writer;

pub(crate) use reader::{FrameReader, Inbound, error_frame, forbidden, refresh, send_to_this_socket};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use crate::AppState;
use crate::fanout::{SessionCloser, SessionHandle};
use crate::ids::{ConversationId, ConversationKey, Party, SessionId};
use crate::protocol::close::{self, CloseReason};
use crate::protocol::{ErrorCode, ServerFrame};
use crate::reply::Question;
use crate::store::StoreError;

/// How long a closing session waits for the client's close frame.
pub(crate) const CLOSE_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Who is connecting and where they want to resume, from the `/ws` query.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The tenant and user it speaks for (see [`Party`]).
    pub party: Party,
    pub conversation: Option<ConversationId>,
    pub after: Option<u64>,
    /// The log epoch the client last saw; a different current epoch means
    /// its history was lost.
    pub epoch: Option<String>,
    /// `timing=1`: replies to this socket's questions carry a `timing` object.
    pub timing: bool,
    /// The verified token's identity, when the socket was opened with one
    /// (`tenant` and `user` above are then the token's).
    pub identity: Option<crate::auth::Identity>,
}

/// Runs a session to completion.
///
/// Not an `async fn`: its future is the whole life of an idle socket, and an
/// `async fn` would keep a second copy of the socket and params beside the
/// inner block that takes them. For the same reason the socket is boxed (a
/// future keeps room for what it captured even after moving it out), and
/// the set-up runs in a future of its own, boxed ([`start`]): what only it
/// needs (the store's answers, the snapshot, the intro) is freed with it
/// instead of keeping room in the socket's future for its life.
pub fn run(socket: WebSocket, params: SessionParams, app: Arc<AppState>) -> impl Future<Output = ()> {
    let socket = Box::new(socket);
    let session_id = SessionId::next();
    let span = info_span!("session", tenant_id = %params.party.tenant, user_id = %params.party.user, session_id = %session_id, conversation_id = tracing::field::Empty);
    async move {
        let _open = OpenSession::count(&app);
        let Some(Started { key, mut pending, mut stream, writer, closer, handle }) =
            Box::pin(start(socket, &params, &app, session_id)).await
        else {
            return;
        };
        let replies = Replies {
            app: app.clone(),
            key: key.clone(),
            closer: closer.clone(),
            capacity: app.config.websocket.max_pending_questions,
            questions: None,
        };
        let token = params.identity.clone().map(|identity| {
            crate::auth::expiry::SessionToken::start(app.auth.clone(), identity, handle.clone(), &app.tracker)
        });
        let client_closed =
            reader::run_reader(&mut stream, &app, &params, &key, &mut pending, &handle, replies, token.as_ref()).await;
        closer.close(close::NORMAL);
        app.conversations.detach(&key, session_id).await;
        // A conversation that was never created leaves nothing to touch.
        if pending.is_none() {
            app.conversations.touch(&params.party.user, &key).await;
        }
        // Closing handshake: the writer sends our close frame; keep reading
        // until the client answers it, so the client sees the code before TCP goes.
        let _ = writer.await;
        if !client_closed {
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        debug!(reason = closer.reason().reason, "session ended");
    }
    .instrument(span)
}

/// What a session keeps once it has started.
struct Started {
    key: ConversationKey,
    /// The conversation to create with the first message, until it exists.
    pending: Option<crate::store::Pending>,
    stream: futures::stream::SplitStream<WebSocket>,
    writer: tokio::task::JoinHandle<()>,
    closer: SessionCloser,
    handle: SessionHandle,
}

/// Opens the socket's conversation, attaches the socket to it and starts
/// its writer with `ready` and what the client missed. `None` when the
/// store refused (the client was told why, and the socket is closed).
async fn start(
    mut socket: Box<WebSocket>,
    params: &SessionParams,
    app: &AppState,
    session_id: SessionId,
) -> Option<Started> {
    let crate::store::Opened { key, pending } =
        match app.conversations.open(&params.party, params.conversation.as_ref()).await {
            Ok(opened) => opened,
            Err(error) => {
                refuse(&mut socket, &error).await;
                return None;
            }
        };
    tracing::Span::current().record("conversation_id", tracing::field::display(&key.conversation()));
    let ws = &app.config.websocket;
    let closer = SessionCloser::child_of(&app.shutdown);
    let (out_tx, out_rx) = mpsc::channel(ws.outbound_queue_frames);
    let handle = SessionHandle::customer(session_id, out_tx, closer.clone());
    let snapshot = match app.conversations.attach(&key, handle.clone(), params.after, pending.as_ref()).await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            refuse(&mut socket, &error).await;
            return None;
        }
    };
    // Until its first message is stored, the conversation exists only for this socket.
    let pending = pending.filter(|_| !snapshot.exists);
    debug!(last_seq = snapshot.last_seq, missed = snapshot.missed.len(), pending = pending.is_some(), "session ready");

    let conversation = key.conversation().as_str();
    let mut intro = Vec::with_capacity(2 + snapshot.missed.len());
    intro.push(ServerFrame::Ready { conversation, seq: snapshot.last_seq, epoch: &snapshot.epoch }.encode());
    match &params.epoch {
        Some(epoch) if *epoch != snapshot.epoch => intro.push(history_lost()),
        _ => intro.extend(snapshot.missed.iter().map(|event| event.message_frame(conversation))),
    }

    let (sink, stream) = (*socket).split();
    let ping_interval = std::time::Duration::from_millis(ws.ping_interval_ms);
    let writer = app.tracker.spawn(
        crate::writer::run(
            sink,
            out_rx,
            None,
            writer::Replay {
                conversations: app.conversations.clone(),
                key: key.clone(),
                intro,
                sent: crate::event::Cursor::in_epoch(crate::event::LogEpoch::of(&snapshot.epoch), snapshot.last_seq)
                    .with_owner(snapshot.ownership.epoch),
                delivery: metrics::histogram!(crate::metric::FRAME_DELIVERY),
            },
            closer.clone(),
            crate::writer::Pings { first: first_ping(ping_interval, session_id), interval: ping_interval },
        )
        .in_current_span(),
    );
    Some(Started { key, pending, stream, writer, closer, handle })
}

/// The `error` that tells a client its conversation's log was lost and
/// recreated (after a `ready` with the new log's epoch).
pub(crate) fn history_lost() -> axum::extract::ws::Utf8Bytes {
    let message = "this conversation's history was lost; events before the new epoch cannot be replayed";
    ServerFrame::Error { code: ErrorCode::HistoryLost.as_str(), message, id: None, retry_after_ms: None }.encode()
}

/// When a session sends its first ping: somewhere in the second half of the
/// interval, spread by session id, so that sockets that connected together
/// (after a node restart, a reconnect storm) are not all pinged, and do not
/// all answer, in the same instant every interval.
pub(crate) fn first_ping(interval: std::time::Duration, session: SessionId) -> std::time::Duration {
    let half = interval / 2;
    let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
    // Fibonacci hashing: consecutive ids land far apart.
    let offset = session.as_u64().wrapping_mul(0x9E37_79B9_7F4A_7C15) % spread;
    half + std::time::Duration::from_micros(offset)
}

/// Counts a running session in `AppState::sessions_open` until dropped.
pub(crate) struct OpenSession<'a>(&'a AtomicUsize);

impl<'a> OpenSession<'a> {
    pub(crate) fn count(app: &'a AppState) -> Self {
        app.sessions_open.fetch_add(1, Ordering::Relaxed);
        Self(&app.sessions_open)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The way to this session's replier task, which the first question starts:
/// most sockets never ask anything, and an idle one should not hold a task
/// and a channel for it. Dropping it closes the channel; questions already
/// queued are still answered.
pub(super) struct Replies {
    app: Arc<AppState>,
    key: ConversationKey,
    closer: SessionCloser,
    capacity: usize,
    questions: Option<mpsc::Sender<Box<Question>>>,
}

impl Replies {
    pub(super) fn questions(&mut self) -> &mpsc::Sender<Box<Question>> {
        self.questions.get_or_insert_with(|| {
            // Boxed questions keep the channel's first block (32 slots) small.
            let (tx, rx) = mpsc::channel(self.capacity);
            let replier = run_replier(self.app.clone(), self.key.clone(), rx, self.closer.clone());
            self.app.tracker.spawn(replier.in_current_span());
            tx
        })
    }
}

/// Answers this session's questions one at a time, in the order asked.
///
/// A reply belongs to the conversation, not to the socket that asked: when
/// that socket goes, the reply (and any question still queued) goes on while
/// some socket of the conversation is open on any node, and for
/// `conversation.reply_grace_ms` after the last one left (the clock starts
/// again whenever one comes back), so the customer's other device, or the
/// same customer reconnecting, gets it. Past the grace, and on hub shutdown,
/// the reply is cancelled, never dropped: what streamed is stored as a
/// cancelled reply, and each question still queued gets an empty cancelled
/// reply without an NLP call.
async fn run_replier(
    app: Arc<AppState>,
    key: ConversationKey,
    mut questions: mpsc::Receiver<Box<Question>>,
    closer: SessionCloser,
) {
    let stop = app.shutdown.child_token();
    let abandon = async {
        nobody_came_back(&app, &key, &closer).await;
        debug!("no socket of the conversation came back within the grace; cancelling its replies");
        stop.cancel();
        std::future::pending::<()>().await
    };
    // The channel closes when the session's reader ends; what was queued is still answered.
    let answer_all = async {
        while let Some(question) = questions.recv().await {
            // Boxed: the answer's state machine is ~4 KiB, and an idle
            // session's task should not carry it while no question is asked.
            Box::pin(app.replier.answer(&key, *question, &stop)).await;
        }
    };
    tokio::select! {
        () = abandon => {}
        () = answer_all => {}
    }
}

/// How often a reply whose asking socket is gone checks for listeners.
const LISTENER_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Resolves once the asking session has ended and the conversation has then
/// had no socket open anywhere for the whole reply grace.
async fn nobody_came_back(app: &AppState, key: &ConversationKey, closer: &SessionCloser) {
    closer.token().cancelled().await;
    let grace = app.config.conversation.reply_grace();
    let mut alone_since = None;
    loop {
        if app.conversations.has_listeners(key).await {
            alone_since = None;
        } else if alone_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= grace {
            return;
        }
        let wait = alone_since
            .map_or(LISTENER_CHECK, |since| (since + grace).saturating_duration_since(tokio::time::Instant::now()));
        tokio::time::sleep(wait.min(LISTENER_CHECK)).await;
    }
}

/// Ends a session that could not start: an `error` frame, then a close code.
async fn refuse(socket: &mut WebSocket, error: &StoreError) {
    let (code, reason) = refusal(error);
    if matches!(error, StoreError::TooManySockets) {
        metrics::counter!(crate::metric::SESSIONS_REFUSED, "reason" => "too_many_sockets").increment(1);
        debug!(%error, "session refused");
    } else {
        warn!(%error, "session refused");
    }
    let message = error.to_string();
    let frame = ServerFrame::Error { code, message: &message, id: None, retry_after_ms: None }.encode();
    let _ = socket.send(Message::Text(frame)).await;
    let _ = socket.send(crate::writer::close_message(reason)).await;
}

/// The error code and close code that tell a client why the store refused.
pub(crate) fn refusal(error: &StoreError) -> (&'static str, CloseReason) {
    match error {
        StoreError::ConversationNotFound => (ErrorCode::ConversationNotFound.as_str(), close::CONVERSATION_NOT_FOUND),
        StoreError::Unavailable(_) => (ErrorCode::Unavailable.as_str(), close::UNAVAILABLE),
        StoreError::TooManyConversations { .. } => {
            (ErrorCode::TooManyConversations.as_str(), close::TOO_MANY_CONVERSATIONS)
        }
        StoreError::TooManySockets => (ErrorCode::TooManySockets.as_str(), close::TOO_MANY_SOCKETS),
        StoreError::OwnerChanged(_) => (ErrorCode::NotOwner.as_str(), close::NORMAL),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn first_pings_fall_in_the_second_half_of_the_interval_spread_over_sessions() {
        let interval = Duration::from_secs(20);
        let firsts: Vec<_> = (1..=1000).map(|id| first_ping(interval, SessionId::from_u64(id))).collect();
        assert!(firsts.iter().all(|first| (interval / 2..interval).contains(first)), "{firsts:?}");
        // Sessions that connected together are pinged apart: every second of the window is used.
        let seconds: std::collections::BTreeSet<_> = firsts.iter().map(Duration::as_secs).collect();
        assert_eq!(seconds, (10..20).collect());
        // An interval too short to spread still pings within it.
        assert_eq!(first_ping(Duration::from_micros(1), SessionId::from_u64(7)), Duration::from_nanos(500));
    }
}
