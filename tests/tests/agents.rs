//! Agents' sockets (protocol §14): `ready` as an agent, the query rules,
//! `watch`/`unwatch` across nodes, and the errors of agent frames.
//!
//! On the `redis` backend the "nodes" are three hub processes sharing one
//! Redis; on `memory` they are one hub (every node index is it), so each
//! test runs on both.

use std::time::Duration;

use fengda_tests::{Client, Hub, RecordingAnswerer, RedisServer, Script, test_backend};
use serde_json::{Value, json};

/// Hub nodes for one test (see the module doc).
struct Nodes {
    hubs: Vec<Hub>,
    _redis: Option<RedisServer>,
}

impl Nodes {
    async fn start(extra: &[&str]) -> Nodes {
        if test_backend() == "redis" {
            let redis = RedisServer::start().await;
            let mut hubs = Vec::new();
            for _ in 0..3 {
                hubs.push(Hub::start_node(&redis, extra).await);
            }
            Nodes { hubs, _redis: Some(redis) }
        } else {
            Nodes { hubs: vec![Hub::start(extra).await], _redis: None }
        }
    }

    fn node(&self, i: usize) -> &Hub {
        &self.hubs[i % self.hubs.len()]
    }
}

/// A demo token for an agent of `tenant`.
async fn agent_token(hub: &Hub, tenant: &str, agent: &str) -> String {
    let url = format!("{}/demo/token?tenant={tenant}&user={agent}&role=agent", hub.url);
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["token"].as_str().expect("a token").to_owned()
}

async fn agent(hub: &Hub, tenant: &str, agent: &str) -> Client {
    let token = agent_token(hub, tenant, agent).await;
    Client::connect(&hub.ws_url(&format!("token={token}"))).await
}

/// A customer on `hub` with one question asked and answered.
async fn customer_with_history(hub: &Hub, tenant: &str, user: &str) -> Client {
    let mut customer = Client::connect(&hub.ws_url(&format!("tenant={tenant}&user={user}"))).await;
    customer.ask("q1", "Tell me about the Gold Card").await;
    customer
}

/// The `error` frame a watch of `conversation` gets.
async fn watch_error(agent: &mut Client, conversation: &str) -> Value {
    agent.send_json(json!({"type": "watch", "conversation": conversation})).await;
    let error = agent.expect("error").await;
    assert_eq!(error["conversation"], conversation, "{error}");
    error
}

fn paced() -> Script {
    Script { tokens: 8, token_delay: Duration::from_millis(15), ..Script::default() }
}

#[tokio::test]
async fn an_agent_gets_ready_as_an_agent_and_may_not_name_a_conversation_in_the_query() {
    let hub = Hub::start(&[]).await;
    let mut anna = agent(&hub, "bank", "anna").await;
    assert_eq!(
        anna.ready,
        json!({"type": "ready", "role": "agent", "agent": "anna", "name": "anna", "supervisor": false})
    );
    anna.assert_alive().await;

    let token = agent_token(&hub, "bank", "anna").await;
    for extra in ["conversation=0123456789abcdef0123456789abcdef", "after=3", "epoch=abc"] {
        let url = hub.ws_url(&format!("token={token}&{extra}"));
        let error = tokio_tungstenite::connect_async(url).await.expect_err("must be refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("{extra}: {error:?}") };
        assert_eq!(response.status(), 400, "{extra}");
        let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
        assert_eq!(body["error"], "invalid_query", "{extra}: {body}");
    }
    // Empty values are absent values, as for customers.
    Client::connect(&hub.ws_url(&format!("token={token}&conversation=&after="))).await;
}

#[tokio::test]
async fn customer_frames_on_agent_sockets_and_agent_frames_on_customer_sockets_are_forbidden() {
    let hub = Hub::start(&[]).await;
    let mut anna = agent(&hub, "bank", "anna").await;
    anna.send_json(json!({"type": "cancel", "reply": "r-1"})).await;
    let error = anna.expect("error").await;
    assert_eq!(error["code"], "forbidden", "{error}");
    anna.assert_alive().await;

    let mut customer = customer_with_history(&hub, "bank", "carl").await;
    let conversation = customer.conversation();
    for frame in [
        json!({"type": "watch", "conversation": conversation}),
        json!({"type": "unwatch", "conversation": conversation}),
    ] {
        customer.send_json(frame.clone()).await;
        let error = customer.expect("error").await;
        assert_eq!(error["code"], "forbidden", "{frame}: {error}");
    }
    customer.assert_alive().await;
    // And nothing was watched: the agent frames did nothing.
    customer.ask("q2", "How much does it cost?").await;
}

#[tokio::test]
async fn another_tenants_conversation_is_not_found_exactly_like_an_unknown_one() {
    let hub = Hub::start(&[]).await;
    let other = customer_with_history(&hub, "telco", "tom").await;
    let mut anna = agent(&hub, "bank", "anna").await;
    let foreign = watch_error(&mut anna, &other.conversation()).await;
    let unknown = watch_error(&mut anna, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(foreign["code"], "conversation_not_found");
    let without_id = |mut frame: Value| {
        frame.as_object_mut().unwrap().remove("conversation");
        frame
    };
    assert_eq!(without_id(foreign), without_id(unknown));
    // Not an id of this hub at all: the same answer.
    let malformed = watch_error(&mut anna, "../x").await;
    assert_eq!(malformed["code"], "conversation_not_found");
    anna.assert_alive().await;
}

#[tokio::test]
async fn a_watch_beyond_max_watched_is_refused_but_watching_again_is_not() {
    let hub = Hub::start(&["--agents-max-watched", "2"]).await;
    let mut ids = Vec::new();
    for user in ["c1", "c2", "c3"] {
        ids.push(customer_with_history(&hub, "bank", user).await.conversation());
    }
    let mut anna = agent(&hub, "bank", "anna").await;
    for id in &ids[..2] {
        anna.send_json(json!({"type": "watch", "conversation": id})).await;
        assert_eq!(anna.expect("watching").await["conversation"], id.as_str());
        assert_eq!(anna.expect("message").await["seq"], 1);
        assert_eq!(anna.expect("message").await["seq"], 2);
    }
    let refused = watch_error(&mut anna, &ids[2]).await;
    assert_eq!(refused["code"], "too_many_watched", "{refused}");
    // Watching one again re-sends its snapshot; it is not a third watch.
    anna.send_json(json!({"type": "watch", "conversation": ids[0], "after": 1})).await;
    assert_eq!(anna.expect("watching").await["conversation"], ids[0].as_str());
    assert_eq!(anna.expect("message").await["seq"], 2);
    // Unwatching frees a place.
    anna.send_json(json!({"type": "unwatch", "conversation": ids[1]})).await;
    anna.send_json(json!({"type": "watch", "conversation": ids[2], "after": 2})).await;
    assert_eq!(anna.expect("watching").await["conversation"], ids[2].as_str());
    anna.assert_alive().await;
}

#[tokio::test]
async fn an_agent_watching_from_another_node_gets_the_history_then_the_reply_token_by_token() {
    let answerer = RecordingAnswerer::start(paced()).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url]).await;
    let mut customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    let conversation = customer.conversation();
    let mut anna = agent(nodes.node(0), "bank", "anna").await;

    anna.send_json(json!({"type": "watch", "conversation": conversation})).await;
    let watching = anna.expect("watching").await;
    assert_eq!(
        (&watching["conversation"], &watching["customer"], &watching["seq"], &watching["epoch"]),
        (&json!(conversation), &json!("carl"), &json!(2), &customer.ready["epoch"]),
        "{watching}"
    );
    assert_eq!((&watching["owner"], &watching["owner_epoch"]), (&json!("assistant"), &json!(0)));
    let (question, answer) = (anna.expect("message").await, anna.expect("message").await);
    assert_eq!((&question["from"], &question["seq"], &question["id"]), (&json!("customer"), &json!(1), &json!("q1")));
    assert_eq!((&answer["from"], &answer["seq"]), (&json!("assistant"), &json!(2)));
    assert_eq!(answer["conversation"], conversation.as_str());

    for (round, question) in ["How much does it cost?", "I lost my card"].iter().enumerate() {
        let id = format!("q{}", round + 2);
        let (ack, reply) = customer.ask(&id, question).await;
        let message = anna.expect("message").await;
        assert_eq!((&message["id"], &message["seq"], &message["text"]), (&json!(id), &ack["seq"], &json!(question)));
        assert_eq!(message["conversation"], conversation.as_str());
        let watched = anna.read_reply().await;
        assert_eq!(watched.deltas.len(), 8, "token by token");
        assert_eq!(watched.deltas, reply.deltas, "the same deltas, in the same order, as the customer's");
        assert_eq!(watched.done, reply.done);
    }

    // `after` replays from there; unwatch stops the conversation's frames.
    anna.send_json(json!({"type": "watch", "conversation": conversation, "after": 5})).await;
    assert_eq!(anna.expect("watching").await["seq"], 6);
    assert_eq!(anna.expect("message").await["seq"], 6);
    anna.send_json(json!({"type": "unwatch", "conversation": conversation})).await;
    anna.assert_alive().await;
    customer.ask("q4", "Thanks").await;
    anna.assert_alive().await;
}

#[tokio::test]
async fn an_agent_watching_many_conversations_gets_each_in_order_with_its_id() {
    let answerer = RecordingAnswerer::start(paced()).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url]).await;
    let mut customers = Vec::new();
    for (i, user) in ["c1", "c2", "c3"].iter().enumerate() {
        customers.push(customer_with_history(nodes.node(i), "bank", user).await);
    }
    let mut anna = agent(nodes.node(1), "bank", "anna").await;
    for customer in &customers {
        anna.send_json(json!({"type": "watch", "conversation": customer.conversation(), "after": 2})).await;
        anna.expect("watching").await;
    }
    // All three ask at once; the agent's frames interleave, each conversation's in order.
    for customer in &mut customers {
        customer.send_message("q2", "How much does it cost?").await;
    }
    let mut replies = Vec::new();
    for customer in &mut customers {
        customer.expect("ack").await;
        replies.push(customer.read_reply().await);
    }
    let mut seen: std::collections::HashMap<String, Vec<Value>> = Default::default();
    let mut done = 0;
    while done < customers.len() {
        let frame = anna.next().await;
        let conversation = frame["conversation"].as_str().unwrap_or_else(|| panic!("no conversation: {frame}"));
        done += usize::from(frame["type"] == "reply.done");
        seen.entry(conversation.to_owned()).or_default().push(frame);
    }
    for (customer, reply) in customers.iter().zip(&replies) {
        let frames = &seen[&customer.conversation()];
        assert_eq!(frames[0]["type"], "message");
        assert_eq!(frames[0]["seq"], 3);
        assert_eq!(frames[1..frames.len() - 1], reply.deltas[..], "deltas in order, none lost");
        assert_eq!(frames[frames.len() - 1], reply.done);
    }
}
