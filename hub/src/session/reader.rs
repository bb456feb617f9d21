//! The reader half of a session: client frames in, stored messages out.
//!
//! Each text frame is parsed with precise error codes; a customer message is
//! stored (which acks it through the fan-out, in seq order) and then handed
//! to the replier. Bad input gets an `error` frame and the socket stays
//! open; an oversized frame closes with 1009; silence past `idle_timeout`
//! closes with 4010. Frames beyond the socket's rate
//! (`websocket.max_frames_per_second`, bursts of `websocket.frame_burst`)
//! are ignored with `rate_limited`, and a burst's worth of those in a row
//! closes the socket with 4429: a flood costs the node a bounded amount of
//! work and then the socket. The tenant's limits ([`crate::tenant`]) are
//! read when the session starts: its longest message, and its messages per
//! user per window (over it: `rate_limited` with `retry_after_ms`, the
//! message is not stored, the socket stays open).

use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use futures::stream::SplitStream;
use tokio_tungstenite::tungstenite;
use tracing::{debug, warn};

use crate::AppState;
use crate::auth::expiry::SessionToken;
use crate::event::OwnerEpoch;
use crate::fanout::{Outbound, SessionHandle};
use crate::ids::ConversationKey;
use crate::owner::Owner;
use crate::presence::{Typing, Typist};
use crate::protocol::close;
use crate::protocol::{ClientFrame, ErrorCode, ServerFrame, TextLimit, parse_client_frame};
use crate::reply::Question;
use crate::session::handoff;
use crate::session::{Replies, SessionParams};
use crate::store::{AppendWith, Appended, NewEvent, OwnerOp, Pending, StoreError};

/// What [`FrameReader::next`] read.
pub(crate) enum Inbound {
    /// A text frame, parsed (a bad one is the error to send back).
    Frame(Result<ClientFrame, crate::protocol::FrameError>),
    /// The session is over; true when the client closed the socket itself
    /// (close frame or end of stream).
    End { client_closed: bool },
}

/// The limits every socket's reader applies, customers' and agents' alike:
/// the idle timeout, the frame rate, the transport's frame size, binary
/// frames; what passes is a parsed text frame.
pub(crate) struct FrameReader {
    idle_timeout: Duration,
    text_limit: TextLimit,
    burst: NonZeroU32,
    budget: governor::DefaultDirectRateLimiter,
    refused_in_a_row: u32,
}

impl FrameReader {
    pub(crate) fn new(app: &AppState, limits: &crate::tenant::Limits) -> Self {
        let ws = &app.config.websocket;
        let text_limit = TextLimit { chars: ws.max_text_chars, bytes: limits.max_text_bytes.min(ws.max_text_bytes) };
        let burst = NonZeroU32::new(ws.frame_burst).unwrap_or(NonZeroU32::MIN);
        let rate = NonZeroU32::new(ws.max_frames_per_second).unwrap_or(NonZeroU32::MIN);
        let budget = governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst));
        let idle_timeout = Duration::from_millis(ws.idle_timeout_ms);
        Self { idle_timeout, text_limit, burst, budget, refused_in_a_row: 0 }
    }

    /// The next text frame within the limits; answers what it drops itself.
    pub(crate) async fn next(&mut self, stream: &mut SplitStream<WebSocket>, session: &SessionHandle) -> Inbound {
        loop {
            let next = tokio::select! {
                _ = session.closer.token().cancelled() => return Inbound::End { client_closed: false },
                next = tokio::time::timeout(self.idle_timeout, stream.next()) => next,
            };
            let message = match next {
                Err(_elapsed) => {
                    session.closer.close(close::IDLE_TIMEOUT);
                    return Inbound::End { client_closed: false };
                }
                Ok(None) => return Inbound::End { client_closed: true },
                Ok(Some(Err(error))) => {
                    let error = error.into_inner();
                    if let Some(tungstenite::Error::Capacity(capacity)) = error.downcast_ref::<tungstenite::Error>() {
                        debug!(%capacity, "frame over the transport limit");
                        session.closer.close(close::TOO_BIG);
                        return Inbound::End { client_closed: false };
                    }
                    debug!(%error, "socket read failed");
                    return Inbound::End { client_closed: true };
                }
                Ok(Some(Ok(message))) => message,
            };
            if !matches!(message, Message::Close(_)) {
                if self.budget.check().is_err() {
                    metrics::counter!(crate::metric::FRAMES_RATE_LIMITED).increment(1);
                    self.refused_in_a_row += 1;
                    if self.refused_in_a_row >= self.burst.get() {
                        metrics::counter!(crate::metric::RATE_LIMIT_CLOSES).increment(1);
                        debug!("frames keep coming over the rate limit; closing");
                        session.closer.close(close::RATE_LIMITED);
                        return Inbound::End { client_closed: false };
                    }
                    let id = match &message {
                        Message::Text(text) => match parse_client_frame(text.as_str(), self.text_limit) {
                            Ok(ClientFrame::Message { id, .. }) => Some(id),
                            _ => None,
                        },
                        _ => None,
                    };
                    let text = "too many frames; slow down (this frame was ignored)";
                    send_to_this_socket(session, error_frame(ErrorCode::RateLimited, text, id.as_deref()));
                    continue;
                }
                self.refused_in_a_row = 0;
            }
            match message {
                Message::Text(text) => return Inbound::Frame(parse_client_frame(text.as_str(), self.text_limit)),
                Message::Binary(_) => send_to_this_socket(
                    session,
                    error_frame(ErrorCode::BinaryNotSupported, "binary frames are not supported; send JSON text", None),
                ),
                Message::Close(_) => return Inbound::End { client_closed: true },
                // Pings are answered by the library; any frame counts as a sign of life.
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    }
}

/// Reads until the session ends; returns true when the client closed the
/// socket itself (close frame or end of stream).
///
/// Not an `async fn`, so that its arguments are not kept twice in the
/// future (as arguments and as the locals they move into): an idle socket
/// waits in it for its whole life.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(super) fn run_reader<'a>(
    stream: &'a mut SplitStream<WebSocket>,
    app: &'a AppState,
    params: &'a SessionParams,
    key: &'a ConversationKey,
    pending: &'a mut Option<Pending>,
    session: &'a SessionHandle,
    mut replies: Replies,
    token: Option<&'a SessionToken>,
) -> impl Future<Output = bool> + Send + 'a {
    async move {
        let limits = app.tenants.limits(&params.party.tenant);
        let mut frames = FrameReader::new(app, &limits);
        loop {
            let frame = match frames.next(stream, session).await {
                Inbound::End { client_closed } => return client_closed,
                Inbound::Frame(frame) => frame,
            };
            match frame {
                Ok(ClientFrame::Ping) => send_to_this_socket(session, ServerFrame::Pong.encode()),
                Ok(frame) if frame.is_agents() => send_to_this_socket(session, forbidden(&frame)),
                // Unknown or finished replies are ignored: a cancel may cross the reply.done.
                Ok(ClientFrame::Cancel { reply }) => app.replier.cancel(key, &reply),
                // Boxed, as the handlers below that wait: the reader's future
                // lives as long as the socket, a handler's state only while it runs.
                Ok(ClientFrame::Refresh { token: fresh }) => Box::pin(refresh(app, session, token, &fresh)).await,
                // Inside the expiry grace the socket reads and streams, but stores nothing new.
                Ok(ClientFrame::Handoff) => Box::pin(on_handoff(app, key, pending, session)).await,
                Ok(ClientFrame::Message { id, .. }) if token.is_some_and(SessionToken::expired) => {
                    let text = "this socket's token has expired; send `refresh` with a new token";
                    send_to_this_socket(session, error_frame(ErrorCode::TokenExpired, text, Some(&id)));
                }
                Ok(ClientFrame::Message { id, text, .. }) => {
                    match app.tenants.admit_message(&params.party.tenant, &params.party.user, &limits).await {
                        Err(wait) => send_to_this_socket(session, over_message_rate(&id, wait)),
                        Ok(()) => {
                            let turns = limits.history_turns;
                            Box::pin(on_message(app, params, key, pending, session, &mut replies, id, text, turns))
                                .await
                        }
                    }
                }
                // A customer's `conversation` is its socket's; whatever it
                // names is ignored. A fresh one has no one else to tell yet.
                Ok(ClientFrame::Typing { .. }) if pending.as_ref().is_some_and(|pending| pending.fresh) => {}
                Ok(ClientFrame::Typing { on, .. }) => {
                    let typing = Typing { typist: Typist::Customer, on, note: false, to_customer: false };
                    app.conversations.typing(key, &typing, session.id);
                }
                Ok(ClientFrame::Watch { .. } | ClientFrame::Unwatch { .. } | ClientFrame::Take { .. }) => {}
                Ok(
                    ClientFrame::Release { .. } | ClientFrame::Note { .. } | ClientFrame::List | ClientFrame::Unlist,
                ) => {}
                Err(error) => send_to_this_socket(session, error.to_frame()),
            }
        }
    }
}

/// `refresh`: a new token for a socket opened with one.
pub(crate) async fn refresh(app: &AppState, session: &SessionHandle, token: Option<&SessionToken>, fresh: &str) {
    match token {
        Some(token) => token.refresh(&app.auth, session, fresh).await,
        None => {
            let text = "this socket was not opened with a token; there is nothing to refresh";
            send_to_this_socket(session, error_frame(ErrorCode::RefreshNotApplicable, text, None));
        }
    }
}

/// The `forbidden` error for a frame this socket's role may not send.
pub(crate) fn forbidden(frame: &ClientFrame) -> axum::extract::ws::Utf8Bytes {
    let kind = frame.kind();
    let message = match frame.is_agents() {
        true => format!("`{kind}` is an agent's frame; this is a customer's socket"),
        false => format!("`{kind}` is a customer's frame; this is an agent's socket"),
    };
    error_frame(ErrorCode::Forbidden, &message, None)
}

/// `handoff`: the customer asks for a person.
async fn on_handoff(app: &AppState, key: &ConversationKey, pending: &mut Option<Pending>, session: &SessionHandle) {
    let epoch = match app.conversations.ownership(key).await {
        Ok(Some(ownership)) if ownership.owner != crate::owner::Owner::Assistant => return,
        Ok(Some(ownership)) => ownership.epoch,
        // Not created yet: the `waiting` event creates it.
        Ok(None) => 0,
        Err(error) => {
            warn!(%error, "handoff not recorded");
            let message = "the request could not be recorded; send it again";
            return send_to_this_socket(session, error_frame(ErrorCode::Unavailable, message, None));
        }
    };
    match super::handoff::request(app, key, pending.as_ref(), epoch).await {
        Ok(_) => *pending = None,
        Err(error) => {
            warn!(%error, "handoff not recorded");
            let message = "the request could not be recorded; send it again";
            send_to_this_socket(session, error_frame(ErrorCode::Unavailable, message, None));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn on_message(
    app: &AppState,
    params: &SessionParams,
    key: &ConversationKey,
    pending: &mut Option<Pending>,
    session: &SessionHandle,
    replies: &mut Replies,
    id: String,
    text: String,
    history_turns: usize,
) {
    let received = std::time::Instant::now();
    // Reserve the replier's slot first: a message is only stored if it can be answered.
    let permit = match replies.questions().try_reserve() {
        Ok(permit) => permit,
        Err(_) => {
            let message = "too many questions waiting for an answer; wait for the replies";
            return send_to_this_socket(session, error_frame(ErrorCode::TooManyPending, message, Some(&id)));
        }
    };
    let event = NewEvent::customer(id.clone(), text.clone());
    // The user's activity, the question's history and who answers it come with the append.
    let with = AppendWith {
        create: pending.as_ref(),
        active_user: Some(&params.party.user),
        turns_before: history_turns,
        owner: OwnerOp::Any,
    };
    let appended = app.conversations.append(key, event, Some(session.id), with).await;
    if appended.is_ok() {
        // The conversation exists from its first stored message on.
        *pending = None;
    }
    match appended {
        // The ack went out through the fan-out, in seq order with other events.
        Ok(Appended::New { event, epoch: log, turns_before, mut ownership }) => {
            let seq = event.seq;
            if handoff::waited_too_long(app, &ownership) {
                ownership = match handoff::give_up_waiting(&app.conversations, key, &ownership).await {
                    Ok(ownership) => ownership,
                    Err(error) => return warn!(%error, "could not hand a waiting conversation back"),
                };
            }
            if ownership.owner != Owner::Assistant {
                // Stored and acked: a person answers (or will).
                return debug!(seq, owner = ownership.owner.kind(), "not for the assistant");
            }
            if handoff::asks_for_person(&text) {
                if let Err(error) = handoff::request(app, key, None, ownership.epoch).await {
                    warn!(%error, "handoff not recorded");
                }
                return;
            }
            let question = Question {
                seq,
                text,
                history: turns_before,
                received,
                timing: params.timing,
                tenant_label: app.tenants.limits(&params.party.tenant).label.clone(),
                asked: OwnerEpoch { log, epoch: ownership.epoch },
            };
            permit.send(Box::new(question));
        }
        Ok(Appended::Duplicate(seq)) => {
            debug!(seq, "duplicate message acked again");
            send_to_this_socket(session, ServerFrame::Ack { conversation: None, id: &id, seq }.encode());
        }
        Err(StoreError::ConversationNotFound) => {
            // The log vanished under a live session (expiry, flush, failover):
            // the client must reconnect to learn the new epoch.
            warn!("conversation log lost; closing the session");
            let message = "this conversation no longer exists; reconnect";
            send_to_this_socket(session, error_frame(ErrorCode::ConversationNotFound, message, Some(&id)));
            session.closer.close(close::CONVERSATION_NOT_FOUND);
        }
        Err(error @ StoreError::TooManyConversations { .. }) => {
            warn!(%error, "conversation not created: the user's creation cap is reached");
            let (code, reason) = crate::session::refusal(&error);
            let message = error.to_string();
            send_to_this_socket(
                session,
                ServerFrame::Error { code, message: &message, id: Some(&id), retry_after_ms: None }.encode(),
            );
            session.closer.close(reason);
        }
        Err(error) => {
            warn!(%error, "message not stored");
            let message = "the message could not be stored; send it again with the same id";
            send_to_this_socket(session, error_frame(ErrorCode::Unavailable, message, Some(&id)));
        }
    }
}

/// Queues a frame for this socket only (not a durable event).
pub(crate) fn send_to_this_socket(session: &SessionHandle, frame: axum::extract::ws::Utf8Bytes) {
    session.push(Outbound::ephemeral(frame));
}

/// A message over its user's rate (`tenants.*.max_messages_per_user`).
fn over_message_rate(id: &str, wait: Duration) -> axum::extract::ws::Utf8Bytes {
    let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let message = format!("too many messages; send this one again in {retry_after_ms} ms (it was not stored)");
    let code = ErrorCode::RateLimited.as_str();
    ServerFrame::Error { code, message: &message, id: Some(id), retry_after_ms: Some(retry_after_ms) }.encode()
}

pub(crate) fn error_frame(code: ErrorCode, message: &str, id: Option<&str>) -> axum::extract::ws::Utf8Bytes {
    ServerFrame::Error { code: code.as_str(), message, id, retry_after_ms: None }.encode()
}
