//! The socket's sink as a session's writer uses it: a write that has to
//! wait for the client gives up once the session is cancelled, so a client
//! that stops reading cannot pin the writer; everything else a writer does
//! runs to its end. No writer's future is dropped halfway, so the store
//! work between its writes (an agent's watch joining the fan-out and
//! subscribing, a gap read) is never abandoned in the middle, with a
//! session joined to a conversation but not recorded as watching it.
//!
//! A write that does not wait (the frame fits the socket's buffer) goes
//! through even after the cancellation: the last items a writer took from
//! its queue still reach a client that reads, such as the `error` queued
//! just before the close it explains.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws::{Message, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::WriteError;

pub(crate) struct Sink<'c> {
    socket: SplitSink<WebSocket, Message>,
    /// The session's cancellation, one waiter for the session's life.
    cancelled: Pin<&'c mut WaitForCancellationFutureOwned>,
    /// Whether a waiting write gives up on the cancellation; not once the
    /// session is closing ([`Sink::closing`]).
    racing: bool,
}

impl<'c> Sink<'c> {
    pub(crate) fn new(
        socket: SplitSink<WebSocket, Message>,
        cancelled: Pin<&'c mut WaitForCancellationFutureOwned>,
    ) -> Self {
        Self { socket, cancelled, racing: true }
    }

    /// Resolves when the session is cancelled.
    pub(crate) async fn cancelled(&mut self) {
        self.cancelled.as_mut().await
    }

    /// From now on a write waits for the client whatever happens: the
    /// close's own frames, which the caller bounds in time.
    pub(crate) fn closing(&mut self) {
        self.racing = false;
    }

    /// A socket's poll, or [`WriteError::Cancelled`] instead of waiting.
    fn or_give_up(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<Result<(), axum::Error>>,
    ) -> Poll<Result<(), WriteError>> {
        match poll {
            Poll::Ready(result) => Poll::Ready(result.map_err(WriteError::Socket)),
            Poll::Pending if self.racing && self.cancelled.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(WriteError::Cancelled))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures::Sink<Message> for Sink<'_> {
    type Error = WriteError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let poll = self.socket.poll_ready_unpin(cx);
        self.or_give_up(cx, poll)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), WriteError> {
        self.socket.start_send_unpin(item).map_err(WriteError::Socket)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let poll = self.socket.poll_flush_unpin(cx);
        self.or_give_up(cx, poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let poll = self.socket.poll_close_unpin(cx);
        self.or_give_up(cx, poll)
    }
}
