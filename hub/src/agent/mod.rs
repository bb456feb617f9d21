//! One contact-centre agent's WebSocket, from upgrade to close.
//!
//! An agent's socket is not bound to a conversation: it watches any number
//! of its tenant's conversations (up to `agents.max_watched`). Each watched
//! conversation is joined to the node's [`crate::fanout::FanOut`] like a
//! customer's socket (through [`crate::conversations::Conversations::attach`],
//! so the node subscribes to it on the bus and hears it from every node),
//! with a handle marked as an agent's ([`crate::fanout::Audience`]): what
//! the fan-out pushes to it arrives wrapped with its conversation, and the
//! [`writer`] keeps one delivery [`crate::event::Cursor`] per conversation.
//!
//! Two tasks, as for customers: the reader (this task: client frames in,
//! the same limits as customers' through [`crate::session::FrameReader`])
//! and the writer, which alone owns the sink and the watches: the reader
//! hands it `watch`/`unwatch` as [`writer::Command`]s, so a watch's
//! snapshot and the live events that follow it are written by one task in
//! order (events that arrive while the snapshot is read wait in the queue
//! and go through the watch's cursor). Everything is confined to the
//! agent's tenant: a conversation id is always made into a key with the
//! agent's [`Party`], so another tenant's id is simply not found.

mod owning;
mod writer;

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span};

use crate::AppState;
use crate::auth::Identity;
use crate::fanout::{SessionCloser, SessionHandle};
use crate::ids::{ConversationId, Party, SessionId};
use crate::protocol::{ClientFrame, ErrorCode, ServerFrame, close};
use crate::session::{self, FrameReader, Inbound, SessionParams, send_to_this_socket};

use writer::Command;

/// Commands the reader may have handed the writer and not yet seen done.
const COMMAND_QUEUE: usize = 16;

/// Runs an agent's session to completion. `params.identity` is an agent's.
pub async fn run(socket: WebSocket, params: SessionParams, app: Arc<AppState>) {
    let Some(identity) = params.identity.clone() else { return };
    let session_id = SessionId::next();
    let span =
        info_span!("agent_session", tenant_id = %identity.tenant, agent_id = %identity.user, session_id = %session_id);
    run_session(socket, params.party, identity, session_id, app).instrument(span).await
}

async fn run_session(socket: WebSocket, party: Party, identity: Identity, session_id: SessionId, app: Arc<AppState>) {
    let _open = session::OpenSession::count(&app);
    let ws = &app.config.websocket;
    let closer = SessionCloser::child_of(&app.shutdown);
    let (out_tx, out_rx) = mpsc::channel(ws.outbound_queue_frames);
    let viewer = crate::protocol::Viewer { agent: identity.user.as_str().to_owned(), name: identity.name.clone() };
    let handle = SessionHandle::agent(session_id, out_tx, closer.clone(), viewer);
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let ready = ServerFrame::AgentReady {
        role: "agent",
        agent: identity.user.as_str(),
        name: &identity.name,
        supervisor: identity.supervisor,
    }
    .encode();
    let (sink, mut stream) = socket.split();
    let ping_interval = std::time::Duration::from_millis(ws.ping_interval_ms);
    let writer = app.tracker.spawn(
        crate::writer::run(
            sink,
            out_rx,
            Some(command_rx),
            writer::Watches::new(app.clone(), party.clone(), handle.clone(), ready),
            closer.clone(),
            crate::writer::Pings { first: session::first_ping(ping_interval, session_id), interval: ping_interval },
        )
        .in_current_span(),
    );
    let token =
        crate::auth::expiry::SessionToken::start(app.auth.clone(), identity.clone(), handle.clone(), &app.tracker);
    let owning =
        owning::Owning { app: &app, party: &party, identity: &identity, handle: &handle, taken: Default::default() };
    let client_closed = run_reader(&mut stream, owning, &command_tx, &token).await;
    closer.close(close::NORMAL);
    app.lists.unlist(session_id).await;
    // The writer leaves every watched conversation before it ends.
    let _ = writer.await;
    if !client_closed {
        let _ = tokio::time::timeout(session::CLOSE_HANDSHAKE_TIMEOUT, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    debug!(reason = closer.reason().reason, "agent session ended");
}

/// Reads the agent's frames until the session ends; returns true when the
/// client closed the socket itself.
async fn run_reader(
    stream: &mut futures::stream::SplitStream<WebSocket>,
    mut owning: owning::Owning<'_>,
    commands: &mpsc::Sender<Command>,
    token: &crate::auth::expiry::SessionToken,
) -> bool {
    let (app, handle) = (owning.app, owning.handle);
    let limits = app.tenants.limits(&owning.party.tenant);
    let mut frames = FrameReader::new(app, &limits);
    loop {
        let frame = match frames.next(stream, handle).await {
            Inbound::End { client_closed } => return client_closed,
            Inbound::Frame(frame) => frame,
        };
        let command = match frame {
            Ok(ClientFrame::Ping) => {
                send_to_this_socket(handle, ServerFrame::Pong.encode());
                continue;
            }
            Ok(frame) if frame.is_customers() => {
                send_to_this_socket(handle, session::forbidden(&frame));
                continue;
            }
            Ok(ClientFrame::Refresh { token: fresh }) => {
                session::refresh(app, handle, Some(token), &fresh).await;
                continue;
            }
            Ok(ClientFrame::Watch { conversation, after }) => match conversation_id(handle, &conversation) {
                Some(conversation) => Command::Watch { conversation, after, again: true, done: None },
                None => continue,
            },
            Ok(ClientFrame::Take { conversation, steal }) => {
                let Some(conversation) = conversation_id(handle, &conversation) else { continue };
                // A take implies a watch, set up first: the agent sees its
                // `agent_joined` and what follows live. A refused watch
                // (its `error` is sent) refuses the take.
                let (done, watched) = tokio::sync::oneshot::channel();
                let watch =
                    Command::Watch { conversation: conversation.clone(), after: None, again: false, done: Some(done) };
                if !send_command(handle, commands, watch).await {
                    return false;
                }
                let watching = tokio::select! {
                    _ = handle.closer.token().cancelled() => return false,
                    watching = watched => watching.unwrap_or(false),
                };
                if watching {
                    Box::pin(owning.take(conversation, steal)).await;
                }
                continue;
            }
            Ok(ClientFrame::Release { conversation }) => {
                if let Some(conversation) = conversation_id(handle, &conversation) {
                    Box::pin(owning.release(conversation)).await;
                }
                continue;
            }
            Ok(ClientFrame::Message { id, text, conversation: Some(conversation) }) => {
                if token.expired() {
                    let text = "this socket's token has expired; send `refresh` with a new token";
                    send_to_this_socket(handle, session::error_frame(ErrorCode::TokenExpired, text, Some(&id)));
                } else if let Some(conversation) = conversation_id(handle, &conversation) {
                    Box::pin(owning.message(conversation, id, text)).await;
                }
                continue;
            }
            Ok(ClientFrame::Unwatch { conversation }) => match conversation_id(handle, &conversation) {
                Some(conversation) => Command::Unwatch { conversation },
                None => continue,
            },
            Ok(ClientFrame::Note { conversation, id, text }) => {
                if let Some(conversation) = conversation_id(handle, &conversation) {
                    Box::pin(owning.note(conversation, id, text)).await;
                }
                continue;
            }
            Ok(ClientFrame::Message { id, conversation: None, .. }) => {
                let text = "an agent's `message` names its `conversation`";
                send_to_this_socket(handle, session::error_frame(ErrorCode::MissingField, text, Some(&id)));
                continue;
            }
            Ok(ClientFrame::Typing { conversation: Some(conversation), on, note }) => {
                if let Some(conversation) = conversation_id(handle, &conversation) {
                    Box::pin(owning.typing(conversation, on, note)).await;
                }
                continue;
            }
            Ok(ClientFrame::Typing { conversation: None, .. }) => {
                let text = "an agent's `typing` names its `conversation`";
                send_to_this_socket(handle, session::error_frame(ErrorCode::MissingField, text, None));
                continue;
            }
            Ok(ClientFrame::List) => {
                app.lists.list(owning.party.clone(), handle.clone()).await;
                continue;
            }
            Ok(ClientFrame::Unlist) => {
                app.lists.unlist(handle.id).await;
                continue;
            }
            Ok(ClientFrame::Cancel { .. } | ClientFrame::Handoff) => continue,
            Err(error) => {
                send_to_this_socket(handle, error.to_frame());
                continue;
            }
        };
        if !send_command(handle, commands, command).await {
            return false;
        }
    }
}

/// Hands the writer a command; false when the session is ending.
async fn send_command(handle: &SessionHandle, commands: &mpsc::Sender<Command>, command: Command) -> bool {
    tokio::select! {
        _ = handle.closer.token().cancelled() => false,
        sent = commands.send(command) => sent.is_ok(),
    }
}

/// A conversation id from an agent's frame; one that is not an id of this
/// hub is answered like an unknown one.
fn conversation_id(handle: &SessionHandle, raw: &str) -> Option<ConversationId> {
    match ConversationId::parse(raw) {
        Ok(id) => Some(id),
        Err(_) => {
            let shown: String = raw.chars().take(64).collect();
            send_to_this_socket(handle, not_found(&shown));
            None
        }
    }
}

/// `conversation_not_found` about one conversation (unknown, or another tenant's).
pub(crate) fn not_found(conversation: &str) -> axum::extract::ws::Utf8Bytes {
    ServerFrame::ConversationError {
        code: ErrorCode::ConversationNotFound.as_str(),
        message: "no such conversation",
        conversation,
        id: None,
    }
    .encode()
}
