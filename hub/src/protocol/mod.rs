//! The WebSocket wire protocol: frame shapes, error codes and close codes.
//!
//! Everything a client can observe by name lives here, so the contract in
//! `docs/protocol.md` has one place in the code. Client frames are parsed
//! with precise error codes; server frames are serialized once into
//! [`Utf8Bytes`](axum::extract::ws::Utf8Bytes) and shared by every socket
//! that receives them.

pub mod close;
pub mod frames;

pub use frames::{
    ClientFrame, DeltaEncoder, ErrorCode, FrameError, ReplyTiming, Role, ServerFrame, TextLimit, parse_client_frame,
};
