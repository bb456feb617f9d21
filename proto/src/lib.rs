//! The NLP service contract shared by the hub (client) and the bridge (server).
//!
//! Only this crate runs code generation; everyone else imports
//! [`nlp::v1`]. The `.proto` source is in `proto/proto/fengda/nlp/v1/nlp.proto`.

pub mod nlp {
    pub mod v1 {
        tonic::include_proto!("fengda.nlp.v1");
    }
}
