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

/// An agent's socket; `presence` frames (who comes and goes) are skipped
/// unless a test clears [`Client::ignored`].
async fn agent(hub: &Hub, tenant: &str, agent: &str) -> Client {
    let token = agent_token(hub, tenant, agent).await;
    let mut client = Client::connect(&hub.ws_url(&format!("token={token}"))).await;
    client.ignored = &["presence"];
    client
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
        json!({"type": "list"}),
        json!({"type": "unlist"}),
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
    // A take implies the watch: refused with it, nothing taken.
    anna.send_json(json!({"type": "take", "conversation": ids[2]})).await;
    let refused = anna.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["conversation"].as_str()),
        (Some("too_many_watched"), Some(ids[2].as_str()))
    );
    // Watching one again re-sends its snapshot; it is not a third watch.
    anna.send_json(json!({"type": "watch", "conversation": ids[0], "after": 1})).await;
    assert_eq!(anna.expect("watching").await["conversation"], ids[0].as_str());
    assert_eq!(anna.expect("message").await["seq"], 2);
    // Unwatching frees a place.
    anna.send_json(json!({"type": "unwatch", "conversation": ids[1]})).await;
    anna.send_json(json!({"type": "watch", "conversation": ids[2], "after": 2})).await;
    let watching = anna.expect("watching").await;
    assert_eq!(
        (watching["conversation"].as_str(), watching["owner"].as_str()),
        (Some(ids[2].as_str()), Some("assistant"))
    );
    anna.assert_alive().await;
}

#[tokio::test]
async fn agents_who_leave_while_their_watch_is_set_up_leave_nothing_behind() {
    let nodes = Nodes::start(&[]).await;
    let hub = nodes.node(0);
    let customer = customer_with_history(hub, "bank", "carl").await;
    let conversation = customer.conversation();
    let mut ghosts = Vec::new();
    for i in 0..4 {
        ghosts.push(agent(hub, "bank", &format!("ghost{i}")).await);
    }
    // In cluster mode Redis stops answering for a while: each watch is
    // stuck in its set-up, joined and its round trips in flight, when its
    // session ends (the pause only widens that window; on one node the
    // session ends while the watch is written, or before it starts).
    if let Some(redis) = &nodes._redis {
        redis.cli(&["CLIENT", "PAUSE", "600", "ALL"]).await;
    }
    for ghost in &mut ghosts {
        ghost.send_json(json!({"type": "watch", "conversation": conversation})).await;
    }
    // Time for the hub to take the watches up (not a bound: were it slower,
    // the sessions would end before the watches, which must hold as well).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for ghost in &mut ghosts {
        ghost.ws.close(None).await.unwrap();
    }
    for ghost in &mut ghosts {
        // The hub's close frame comes after the session has left its watches.
        ghost.expect_close().await;
    }
    let mut anna = agent(hub, "bank", "anna").await;
    anna.ignored = &[];
    anna.send_json(json!({"type": "watch", "conversation": conversation})).await;
    let (watching, _) = until(&mut anna, "watching", |_| true).await;
    assert!(shows(&watching, true, &["anna"]), "no one else watches: {watching}");
    drop(customer);
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

/// Reads a customer's frames until both the `agent_joined` event and the
/// stored reply came; returns the deltas before the event, the event and
/// the reply (its `reply.done`, or its `message` when another node's event
/// overtook it and the socket filled the gap from the log). Fails on a
/// delta after the event.
async fn customer_through_takeover(customer: &mut Client) -> (Vec<Value>, Value, Value) {
    let (mut deltas, mut joined, mut done) = (Vec::new(), None, None);
    while joined.is_none() || done.is_none() {
        let frame = customer.next().await;
        match frame["type"].as_str() {
            Some("reply.delta") => {
                assert!(joined.is_none(), "a delta after agent_joined: {frame}");
                deltas.push(frame);
            }
            Some("reply.done") => done = Some(frame),
            Some("message") if frame["from"] == "assistant" => done = Some(frame),
            Some("message") if frame["event"] == "agent_joined" => joined = Some(frame),
            Some("queued") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    (deltas, joined.unwrap(), done.unwrap())
}

/// Reads an agent's frames until it learns of owner epoch `owner_epoch`
/// (an `owner` frame, or the `watching` of a watch set up after the
/// change), then up to a pong; returns the `error` frames seen and that frame.
async fn agent_through_take(agent: &mut Client, owner_epoch: u64) -> (Vec<Value>, Value) {
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    let owner = loop {
        let frame = match agent.try_next().await {
            Ok(frame) => frame,
            Err(error) => panic!("{error}: no owner epoch {owner_epoch} after {seen:#?}"),
        };
        seen.push(frame.clone());
        match frame["type"].as_str() {
            Some("owner" | "watching") if frame["owner_epoch"] == owner_epoch => break frame,
            Some("error") => errors.push(frame),
            _ => {}
        }
    };
    agent.send_json(json!({"type": "ping"})).await;
    loop {
        let frame = agent.next().await;
        match frame["type"].as_str() {
            Some("pong") => return (errors, owner),
            Some("error") => errors.push(frame),
            _ => {}
        }
    }
}

#[tokio::test]
async fn taking_over_mid_reply_stops_it_at_once_and_stores_what_the_customer_got() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 60, token_delay: Duration::from_millis(15), ..Script::default() })
            .await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    let mut rng = fastrand::Rng::new();
    for trial in 0..6 {
        let mut customer = Client::connect(&nodes.node(1).ws_url(&format!("tenant=bank&user=c{trial}"))).await;
        customer.send_message("q1", "Tell me about the Gold Card").await;
        customer.expect("ack").await;
        let conversation = customer.conversation();
        // After k tokens on the customer's socket, the agent (on another node) takes it.
        let k = rng.usize(1..12);
        let mut before = Vec::new();
        while before.len() < k {
            before.push(customer.expect("reply.delta").await);
        }
        anna.send_json(json!({"type": "take", "conversation": conversation})).await;
        let (mut deltas, joined, done) = customer_through_takeover(&mut customer).await;
        before.append(&mut deltas);
        assert_eq!(
            (&joined["from"], &joined["agent"], &joined["name"]),
            (&json!("system"), &json!("anna"), &json!("anna"))
        );
        assert!(joined["seq"].as_u64() < done["seq"].as_u64(), "the reply is stored after the takeover");
        assert_eq!(done["interrupted"], true, "trial {trial}: {done}");
        let streamed: String = before.iter().map(|d| d["text"].as_str().unwrap()).collect();
        assert_eq!(done["text"], streamed.as_str(), "trial {trial}: stored = what the customer got");
        assert!(before.len() < 60, "stopped, not finished");
        answerer.wait_cancelled(trial + 1).await;
        let (errors, owner) = agent_through_take(&mut anna, 1).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((&owner["owner"], &owner["agent"]), (&json!("agent"), &json!("anna")));
        anna.send_json(json!({"type": "unwatch", "conversation": conversation})).await;
    }
}

#[tokio::test]
async fn while_an_agent_owns_it_the_customer_talks_to_the_agent_and_hand_back_gives_the_assistant_the_agents_turns() {
    let answerer = RecordingAnswerer::start(Script { tokens: 3, ..Script::default() }).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url]).await;
    let mut customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    let conversation = customer.conversation();
    let token = agent_token(nodes.node(0), "bank", "anna").await;
    let mut anna = Client::connect(&nodes.node(0).ws_url(&format!("token={token}"))).await;

    // Not the owner: refused, nothing stored.
    anna.send_json(json!({"type": "message", "conversation": conversation, "id": "a0", "text": "Hi"})).await;
    let refused = anna.expect("error").await;
    assert_eq!(
        (&refused["code"], &refused["id"], &refused["conversation"]),
        (&json!("not_owner"), &json!("a0"), &json!(conversation))
    );
    anna.send_json(json!({"type": "release", "conversation": conversation})).await;
    assert_eq!(anna.expect("error").await["code"], "not_owner");

    anna.send_json(json!({"type": "take", "conversation": conversation})).await;
    let watching = anna.expect("watching").await;
    assert_eq!(
        (&watching["owner"], &watching["owner_epoch"]),
        (&json!("assistant"), &json!(0)),
        "watched before taken"
    );
    agent_through_take(&mut anna, 1).await;
    let joined = customer.expect("message").await;
    assert_eq!(
        (&joined["event"], &joined["text"]),
        (&json!("agent_joined"), &json!("anna from Support has joined the conversation."))
    );

    // The customer's message is stored and acked, and reaches the agent, not the NLP service.
    customer.send_message("q2", "Can I get a refund?").await;
    customer.expect("ack").await;
    let heard = loop {
        let frame = anna.next().await;
        if frame["type"] == "message" && frame["id"] == "q2" {
            break frame;
        }
    };
    assert_eq!(heard["from"], "customer");
    anna.send_json(
        json!({"type": "message", "conversation": conversation, "id": "a1", "text": "Yes, within 30 days."}),
    )
    .await;
    let ack = anna.expect("ack").await;
    assert_eq!((&ack["id"], &ack["conversation"]), (&json!("a1"), &json!(conversation)));
    let answer = customer.expect("message").await;
    assert_eq!(
        (&answer["from"], &answer["name"], &answer["text"]),
        (&json!("agent"), &json!("anna"), &json!("Yes, within 30 days."))
    );
    assert_eq!(answer["seq"], ack["seq"]);
    // A resend (a console reconnecting with its unacknowledged message) is acked again, stored once;
    // an agent's id equal to the customer's is the agent's own.
    anna.send_json(
        json!({"type": "message", "conversation": conversation, "id": "a1", "text": "Yes, within 30 days."}),
    )
    .await;
    let again = anna.expect("ack").await;
    assert_eq!((&again["id"], &again["seq"]), (&json!("a1"), &ack["seq"]), "{again}");
    anna.send_json(json!({"type": "message", "conversation": conversation, "id": "q2", "text": "Anything else?"}))
        .await;
    let own = anna.expect("ack").await;
    assert_eq!(own["seq"], ack["seq"].as_u64().unwrap() + 1, "{own}");
    let next = customer.expect("message").await;
    assert_eq!((&next["from"], &next["id"], &next["seq"]), (&json!("agent"), &json!("q2"), &own["seq"]), "{next}");
    assert_eq!(answerer.requests().len(), 1, "only the first question reached the NLP service");

    // Hand back: the customer is told, and the next question is the assistant's, with the agent's turn.
    anna.send_json(json!({"type": "release", "conversation": conversation})).await;
    let left = customer.expect("message").await;
    assert_eq!((&left["event"], &left["agent"]), (&json!("agent_left"), &json!("anna")));
    customer.ask("q3", "And how long does it take?").await;
    let requests = answerer.requests();
    assert_eq!(requests.len(), 2);
    let history: Vec<_> = requests[1].history.iter().map(|turn| (turn.role, turn.text.as_str())).collect();
    use fengda_proto::nlp::v1::Role;
    assert!(history.contains(&(Role::Agent as i32, "Yes, within 30 days.")), "{history:?}");
    assert!(history.contains(&(Role::Customer as i32, "Can I get a refund?")), "{history:?}");
    assert!(!requests.iter().any(|r| format!("{r:?}").contains("Refund approved")), "no note reaches the NLP service");
    // After handing back, a resend of a stored message is still acked; a new one is refused.
    anna.send_json(
        json!({"type": "message", "conversation": conversation, "id": "a1", "text": "Yes, within 30 days."}),
    )
    .await;
    let (again, _) = until(&mut anna, "ack", |_| true).await;
    assert_eq!(again["seq"], ack["seq"], "{again}");
    anna.send_json(json!({"type": "message", "conversation": conversation, "id": "a2", "text": "One more thing"}))
        .await;
    loop {
        let frame = anna.next().await;
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "not_owner", "{frame}");
            break;
        }
    }
}

#[tokio::test]
async fn two_agents_taking_one_conversation_at_once_on_two_nodes_make_exactly_one_owner() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 6, token_delay: Duration::from_millis(3), ..Script::default() })
            .await;
    // Each agent sends three frames a trial: more than the default frame rate.
    let nodes = Nodes::start(&["--nlp-url", &answerer.url, "--max-frames-per-second", "1000"]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    let mut bob = agent(nodes.node(1), "bank", "bob").await;
    let mut winners = std::collections::BTreeMap::<String, usize>::new();
    for trial in 0..50 {
        let mut customer = Client::connect(&nodes.node(2).ws_url(&format!("tenant=bank&user=race{trial}"))).await;
        customer.send_message("q1", "Tell me about the Gold Card").await;
        customer.expect("ack").await;
        let conversation = customer.conversation();
        let take = json!({"type": "take", "conversation": conversation});
        tokio::join!(anna.send_json(take.clone()), bob.send_json(take));
        let ((anna_errors, anna_owner), (bob_errors, bob_owner)) =
            tokio::join!(agent_through_take(&mut anna, 1), agent_through_take(&mut bob, 1));
        assert_eq!(anna_owner["agent"], bob_owner["agent"], "both see one owner");
        let winner = anna_owner["agent"].as_str().unwrap().to_owned();
        let (loser_errors, winner_errors) =
            if winner == "anna" { (&bob_errors, &anna_errors) } else { (&anna_errors, &bob_errors) };
        assert!(winner_errors.is_empty(), "trial {trial}: {winner_errors:?}");
        assert_eq!(loser_errors.len(), 1, "trial {trial}: {loser_errors:?}");
        let refusal = &loser_errors[0];
        assert_eq!(
            (&refusal["code"], &refusal["agent"], &refusal["agent_name"], &refusal["conversation"]),
            (&json!("already_owned"), &json!(winner), &json!(winner), &json!(conversation))
        );
        let (_, joined, _) = customer_through_takeover(&mut customer).await;
        assert_eq!(joined["agent"], winner.as_str());
        *winners.entry(winner).or_default() += 1;
        for agent in [&mut anna, &mut bob] {
            agent.send_json(json!({"type": "unwatch", "conversation": conversation})).await;
        }
    }
    assert_eq!(winners.values().sum::<usize>(), 50);
}

#[tokio::test]
async fn a_steal_needs_steal_rights_and_fences_the_old_owners_messages() {
    for allow_steal in [false, true] {
        let answerer = RecordingAnswerer::start(Script::default()).await;
        let mut flags = vec!["--nlp-url", answerer.url.as_str()];
        if allow_steal {
            flags.push("--agents-allow-steal");
        }
        let nodes = Nodes::start(&flags).await;
        let mut customer = customer_with_history(nodes.node(2), "bank", "carl").await;
        let conversation = customer.conversation();
        let mut anna = agent(nodes.node(0), "bank", "anna").await;
        let mut bob = agent(nodes.node(1), "bank", "bob").await;
        anna.send_json(json!({"type": "take", "conversation": conversation})).await;
        agent_through_take(&mut anna, 1).await;
        // Without `steal`: already owned, naming the owner.
        bob.send_json(json!({"type": "take", "conversation": conversation})).await;
        let (errors, _) = agent_through_take(&mut bob, 1).await;
        assert_eq!((&errors[0]["code"], &errors[0]["agent"]), (&json!("already_owned"), &json!("anna")));
        bob.send_json(json!({"type": "take", "conversation": conversation, "steal": true})).await;
        if !allow_steal {
            let refused = bob.expect("error").await;
            assert_eq!((&refused["code"], &refused["conversation"]), (&json!("forbidden"), &json!(conversation)));
            bob.assert_alive().await;
            continue;
        }
        let (errors, owner) = agent_through_take(&mut bob, 2).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(owner["agent"], "bob");
        let stolen = nodes.node(1).metric("fengda_hub_agent_steals_total").await;
        assert_eq!(stolen, 1.0);
        // Anna's message under her stale epoch is refused; nothing reaches the customer.
        anna.send_json(json!({"type": "message", "conversation": conversation, "id": "a1", "text": "Hello?"})).await;
        loop {
            let frame = anna.next().await;
            if frame["type"] == "error" {
                assert_eq!((&frame["code"], &frame["id"]), (&json!("not_owner"), &json!("a1")));
                break;
            }
        }
        let joined = [customer.expect("message").await, customer.expect("message").await];
        assert_eq!(joined.map(|m| m["agent"].clone()), [json!("anna"), json!("bob")]);
        customer.assert_alive().await;
    }
}

#[tokio::test]
async fn a_customer_who_asks_for_a_person_waits_until_an_agent_takes_it() {
    let answerer = RecordingAnswerer::start(Script { tokens: 3, ..Script::default() }).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url, "--agents-handoff-timeout-secs", "60"]).await;
    // The handoff frame.
    let mut customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    customer.send_json(json!({"type": "handoff"})).await;
    let waiting = customer.expect("message").await;
    assert_eq!((&waiting["from"], &waiting["event"]), (&json!("system"), &json!("waiting")));
    customer.send_message("q2", "Hello?").await;
    customer.expect("ack").await;
    customer.assert_alive().await;
    assert_eq!(answerer.requests().len(), 1, "nobody answers automatically while waiting");
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    anna.send_json(json!({"type": "watch", "conversation": customer.conversation()})).await;
    let watching = anna.expect("watching").await;
    assert_eq!((&watching["owner"], &watching["owner_epoch"]), (&json!("waiting"), &json!(1)), "{watching}");
    anna.send_json(json!({"type": "take", "conversation": customer.conversation()})).await;
    agent_through_take(&mut anna, 2).await;
    assert_eq!(customer.expect("message").await["event"], "agent_joined");

    // The words ask for a person too.
    let mut other = customer_with_history(nodes.node(2), "bank", "dora").await;
    other.send_message("q2", " 人工 ").await;
    other.expect("ack").await;
    assert_eq!(other.expect("message").await["event"], "waiting");
    other.send_message("q3", "Anyone?").await;
    other.expect("ack").await;
    other.assert_alive().await;
    assert_eq!(answerer.requests().len(), 2, "carl's and dora's first questions only");
}

#[tokio::test]
async fn a_note_reaches_every_watching_agent_on_every_node_and_never_a_customer() {
    let answerer = RecordingAnswerer::start(Script { tokens: 3, ..Script::default() }).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url]).await;
    let mut customer = customer_with_history(nodes.node(2), "bank", "carl").await;
    let conversation = customer.conversation();
    let mut agents = Vec::new();
    for (i, name) in ["anna", "bob", "cara"].iter().enumerate() {
        let mut agent = agent(nodes.node(i), "bank", name).await;
        agent.send_json(json!({"type": "watch", "conversation": conversation})).await;
        agent.expect("watching").await;
        agent.expect("message").await;
        agent.expect("message").await;
        agents.push(agent);
    }
    agents[0]
        .send_json(json!({"type": "note", "conversation": conversation, "id": "n1", "text": "VIP customer"}))
        .await;
    let mut notes = Vec::new();
    for agent in &mut agents {
        notes.push(agent.expect("note").await);
    }
    assert_eq!(
        (&notes[0]["seq"], &notes[0]["after"], &notes[0]["agent"], &notes[0]["name"], &notes[0]["id"]),
        (&json!(1), &json!(2), &json!("anna"), &json!("anna"), &json!("n1"))
    );
    assert_eq!(notes[0]["conversation"], conversation.as_str());
    assert!(notes.iter().all(|note| *note == notes[0]), "{notes:?}");
    // A resend (same id: its `note` did not come back before a reconnect) is
    // not stored again: its sender gets the stored note, nobody else anything
    // (the next note each agent gets is n2, seq 2).
    agents[0]
        .send_json(json!({"type": "note", "conversation": conversation, "id": "n1", "text": "VIP customer"}))
        .await;
    let again = agents[0].expect("note").await;
    assert_eq!(again, notes[0], "the stored note, as it was");
    // Another agent's note with the same id is a note of its own.
    agents[1].send_json(json!({"type": "note", "conversation": conversation, "id": "n1", "text": "Seen it"})).await;
    for agent in &mut agents {
        let note = agent.expect("note").await;
        assert_eq!((&note["seq"], &note["agent"], &note["id"]), (&json!(2), &json!("bob"), &json!("n1")), "{note}");
    }
    // Cara is on the customer's node: it had the note, the customer's socket did not.
    customer.assert_alive().await;
    // The conversation goes on; a second note follows the next events.
    customer.ask("q2", "Thanks").await;
    agents[1].send_json(json!({"type": "note", "conversation": conversation, "id": "n2", "text": "Follow up"})).await;
    for agent in &mut agents {
        loop {
            let frame = agent.next().await;
            if frame["type"] == "note" {
                assert_eq!((&frame["seq"], &frame["after"], &frame["agent"]), (&json!(3), &json!(4), &json!("bob")));
                break;
            }
        }
    }
    customer.assert_alive().await;
    // A watch replays the notes after the history; `after` keeps those written since.
    let mut dora = agent(nodes.node(1), "bank", "dora").await;
    dora.send_json(json!({"type": "watch", "conversation": conversation})).await;
    dora.expect("watching").await;
    for seq in 1..=4 {
        assert_eq!(dora.expect("message").await["seq"], seq);
    }
    for (agent, id) in [("anna", "n1"), ("bob", "n1"), ("bob", "n2")] {
        let note = dora.expect("note").await;
        assert_eq!((note["agent"].as_str(), note["id"].as_str()), (Some(agent), Some(id)), "{note}");
    }
    dora.send_json(json!({"type": "watch", "conversation": conversation, "after": 3})).await;
    dora.expect("watching").await;
    assert_eq!(dora.expect("message").await["seq"], 4);
    assert_eq!(dora.expect("note").await["id"], "n2");
    dora.assert_alive().await;
    // Not a conversation of this tenant: not found.
    let other = customer_with_history(nodes.node(0), "telco", "tom").await;
    dora.send_json(json!({"type": "note", "conversation": other.conversation(), "id": "n3", "text": "x"})).await;
    assert_eq!(dora.expect("error").await["code"], "conversation_not_found");
}

#[tokio::test]
async fn a_supervisor_may_steal_and_the_name_claim_is_shown_to_the_customer() {
    use fengda_tests::tokens::{KeyDir, claims, with};
    use jsonwebtoken::Algorithm;
    let dir = KeyDir::new();
    let signer = dir.hmac_secret("bank.secret");
    let config = dir.write(
        "fengda.toml",
        b"[auth]\nmode = \"jwt\"\n[[auth.keys]]\ntenant = \"bank\"\nalg = \"HS256\"\nsecret_file = \"bank.secret\"\n",
    );
    let nodes = Nodes::start(&["--config", config.to_str().unwrap()]).await;
    let token = |user: &str, changes: Value| signer.sign(Algorithm::HS256, None, &with(claims("bank", user), changes));
    let connect = |node: usize, token: String| {
        let url = nodes.node(node).ws_url(&format!("token={token}"));
        async move { Client::connect(&url).await }
    };
    // A bad name is a bad token.
    for name in [json!(""), json!(" "), json!("x".repeat(65)), json!(7)] {
        let url = nodes.node(0).ws_url(&format!("token={}", token("anna", json!({"role": "agent", "name": name}))));
        let error = tokio_tungstenite::connect_async(url).await.expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("{error:?}") };
        assert_eq!(response.status(), 401, "{name}");
    }
    let mut customer = connect(2, token("carl", json!({}))).await;
    customer.ask("q1", "Tell me about the Gold Card").await;
    let conversation = customer.conversation();
    let mut anna = connect(0, token("anna", json!({"role": "agent", "name": "Anna from Cards"}))).await;
    assert_eq!((&anna.ready["name"], &anna.ready["supervisor"]), (&json!("Anna from Cards"), &json!(false)));
    let mut sue = connect(1, token("sue", json!({"role": "agent", "name": "Sue", "supervisor": true}))).await;
    assert_eq!((&sue.ready["agent"], &sue.ready["supervisor"]), (&json!("sue"), &json!(true)));
    anna.send_json(json!({"type": "take", "conversation": conversation})).await;
    agent_through_take(&mut anna, 1).await;
    let joined = customer.expect("message").await;
    assert_eq!(joined["text"], "Anna from Cards from Support has joined the conversation.");
    // Anna cannot steal back from a supervisor without rights of her own; Sue can steal.
    sue.send_json(json!({"type": "take", "conversation": conversation, "steal": true})).await;
    let (errors, owner) = agent_through_take(&mut sue, 2).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((&owner["agent"], &owner["agent_name"]), (&json!("sue"), &json!("Sue")));
    anna.send_json(json!({"type": "take", "conversation": conversation, "steal": true})).await;
    let refused = loop {
        let frame = anna.next().await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(customer.expect("message").await["name"], "Sue");
    assert_eq!(nodes.node(1).metric("fengda_hub_agent_steals_total").await, 1.0);
}

/// Reads frames until one of type `kind` satisfies `wanted`; returns it and
/// every frame read before it.
async fn until(client: &mut Client, kind: &str, wanted: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let frame = client.next().await;
        if frame["type"] == kind && wanted(&frame) {
            return (frame, before);
        }
        before.push(frame);
    }
}

/// Whether a `watching` or `presence` frame shows exactly this.
fn shows(frame: &Value, online: bool, viewers: &[&str]) -> bool {
    let names: Vec<&str> =
        frame["viewers"].as_array().map_or(Vec::new(), |v| v.iter().filter_map(|v| v["agent"].as_str()).collect());
    frame["online"] == online && names == viewers
}

#[tokio::test]
async fn typing_reaches_whom_it_may_and_stops_by_itself_when_the_typists_socket_dies() {
    let nodes = Nodes::start(&["--agents-typing-ttl-ms", "1000"]).await;
    let mut customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    let conversation = customer.conversation();
    let (mut anna, mut bob) = (agent(nodes.node(0), "bank", "anna").await, agent(nodes.node(2), "bank", "bob").await);
    for agent in [&mut anna, &mut bob] {
        agent.send_json(json!({"type": "watch", "conversation": conversation})).await;
        until(agent, "watching", |_| true).await;
    }
    // Anna owns it and types a note, then an answer: bob sees both, the customer only the answer.
    anna.send_json(json!({"type": "take", "conversation": conversation})).await;
    until(&mut anna, "owner", |frame| frame["agent"] == "anna").await;
    anna.send_json(json!({"type": "typing", "conversation": conversation, "on": true, "note": true})).await;
    let (note, _) = until(&mut bob, "typing", |_| true).await;
    assert_eq!(
        note,
        json!({"type": "typing", "conversation": conversation, "from": "agent", "agent": "anna", "name": "anna", "on": true, "note": true})
    );
    anna.send_json(json!({"type": "typing", "conversation": conversation, "on": true})).await;
    let (answer, _) = until(&mut bob, "typing", |_| true).await;
    assert_eq!((&answer["note"], &answer["on"]), (&json!(false), &json!(true)), "{answer}");
    let (seen, before) = until(&mut customer, "typing", |_| true).await;
    assert_eq!(
        seen,
        json!({"type": "typing", "conversation": conversation, "from": "agent", "name": "anna", "on": true})
    );
    assert!(before.iter().all(|frame| frame["type"] != "typing"), "a customer never sees note typing: {before:?}");
    // Nobody types again: each side stops it by itself, once.
    let (stopped, before) = until(&mut customer, "typing", |_| true).await;
    assert_eq!(stopped["on"], false, "{stopped}");
    assert!(before.iter().all(|frame| frame["type"] != "typing"), "{before:?}");

    // The customer types, then its socket dies without a word.
    customer.send_json(json!({"type": "typing", "on": true})).await;
    let (typing, _) = until(&mut anna, "typing", |frame| frame["from"] == "customer").await;
    assert_eq!(typing, json!({"type": "typing", "conversation": conversation, "from": "customer", "on": true}));
    let dropped_at = std::time::Instant::now();
    drop(customer);
    // (Bob's `on: true` is still to be read; anna's was read above.)
    for (agent, started) in [(&mut anna, 0), (&mut bob, 1)] {
        let (stopped, before) =
            until(agent, "typing", |frame| frame["from"] == "customer" && frame["on"] == false).await;
        assert_eq!(stopped["conversation"], conversation.as_str());
        let earlier = before.iter().filter(|frame| frame["type"] == "typing" && frame["from"] == "customer").count();
        assert_eq!(earlier, started, "{before:?}");
    }
    assert!(dropped_at.elapsed() < Duration::from_millis(2500), "within the TTL: {:?}", dropped_at.elapsed());
    anna.assert_alive().await;
}

#[tokio::test]
async fn presence_shows_who_is_there_and_a_dead_node_stops_counting_within_the_ttl() {
    let nodes = Nodes::start(&["--agents-presence-ttl-secs", "2"]).await;
    let customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    let conversation = customer.conversation();
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    anna.ignored = &[];
    anna.send_json(json!({"type": "watch", "conversation": conversation})).await;
    let (watching, _) = until(&mut anna, "watching", |_| true).await;
    if !shows(&watching, true, &["anna"]) {
        // The customer's node had not written its entry yet: it is told as it lands.
        until(&mut anna, "presence", |frame| shows(frame, true, &["anna"])).await;
    }
    // Bob watches from the customer's node: anna sees him come.
    let mut bob = agent(nodes.node(1), "bank", "bob").await;
    bob.send_json(json!({"type": "watch", "conversation": conversation})).await;
    let (watching, _) = until(&mut bob, "watching", |_| true).await;
    assert!(shows(&watching, true, &["anna", "bob"]), "{watching}");
    until(&mut anna, "presence", |frame| shows(frame, true, &["anna", "bob"])).await;

    // The node holding the customer and bob dies (killed; on one node, their sockets drop).
    let died_at = std::time::Instant::now();
    if nodes.hubs.len() > 1 {
        let mut nodes = nodes;
        nodes.hubs[1].child.start_kill().unwrap();
        nodes.hubs[1].child.wait().await.unwrap();
        let (gone, _) = until(&mut anna, "presence", |frame| shows(frame, false, &["anna"])).await;
        assert_eq!(gone["conversation"], conversation.as_str());
        assert!(died_at.elapsed() < Duration::from_millis(3500), "within the TTL: {:?}", died_at.elapsed());
        // A new look agrees.
        anna.send_json(json!({"type": "watch", "conversation": conversation})).await;
        let (watching, _) = until(&mut anna, "watching", |_| true).await;
        assert!(shows(&watching, false, &["anna"]), "{watching}");
    } else {
        drop((customer, bob));
        until(&mut anna, "presence", |frame| shows(frame, false, &["anna"])).await;
        assert!(died_at.elapsed() < Duration::from_millis(2000), "{:?}", died_at.elapsed());
    }
}

/// Reads `agent`'s list frames until a `conversation` summary of
/// `conversation` satisfies `wanted`; every list frame read goes into `seen`.
async fn until_summary(
    agent: &mut Client,
    conversation: &str,
    seen: &mut Vec<Value>,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let frame = agent.next().await;
        seen.push(frame.clone());
        if frame["type"] == "conversation" && frame["conversation"] == conversation && wanted(&frame) {
            return frame;
        }
    }
}

/// The `conversations` snapshot a fresh `list` gets.
async fn list(agent: &mut Client) -> Vec<Value> {
    agent.send_json(json!({"type": "list"})).await;
    let snapshot = agent.expect("conversations").await;
    snapshot["conversations"].as_array().expect("an array of summaries").clone()
}

#[tokio::test]
async fn the_live_list_shows_the_tenants_conversations_from_every_node_and_their_changes() {
    let nodes = Nodes::start(&[]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    assert_eq!(list(&mut anna).await, Vec::<Value>::new(), "nothing is live yet");
    let mut seen = Vec::new();

    // Another tenant's conversation, on a third node, before and during.
    let mut other = customer_with_history(nodes.node(2), "shop", "olga").await;
    let foreign = other.conversation();

    // A new conversation on another node appears, with its customer online.
    let mut customer = customer_with_history(nodes.node(1), "bank", "carol").await;
    let conversation = customer.conversation();
    let live = |s: &Value| s["last"]["from"] == "assistant" && s["online"] == true;
    let first = until_summary(&mut anna, &conversation, &mut seen, live).await;
    assert_eq!(first["customer"], "carol", "{first}");
    assert_eq!(first["owner"], "assistant", "{first}");
    assert_eq!(first["owner_epoch"], 0, "{first}");
    assert_eq!(first["last"]["seq"], 2, "{first}");
    assert_eq!(first["typing"], false, "{first}");
    assert!(first["customer_at"].as_u64().is_some_and(|at| at > 0), "{first}");

    // A new message changes it in place.
    other.ask("o2", "and another").await;
    customer.ask("q2", "And the fees?").await;
    let changed = until_summary(&mut anna, &conversation, &mut seen, |s| s["last"]["seq"] == 4).await;
    assert_eq!(changed["last"]["from"], "assistant", "{changed}");
    assert!(changed["customer_at"].as_u64() >= first["customer_at"].as_u64(), "{changed}");

    // A take by an agent on another node shows the new owner.
    let mut bob = agent(nodes.node(2), "bank", "bob").await;
    bob.send_json(json!({"type": "take", "conversation": conversation})).await;
    let taken = until_summary(&mut anna, &conversation, &mut seen, |s| s["owner"] == "agent").await;
    assert_eq!(taken["agent"], "bob", "{taken}");
    assert_eq!(taken["owner_epoch"], 1, "{taken}");
    assert_eq!(taken["last"]["from"], "system", "{taken}");

    // The customer writes to the agent (no reply follows): the text is cut to 200 characters.
    customer.send_message("q3", &"x".repeat(300)).await;
    while customer.next().await["type"] != "ack" {}
    let asked = until_summary(&mut anna, &conversation, &mut seen, |s| s["last"]["seq"] == 6).await;
    assert_eq!(asked["last"]["from"], "customer", "{asked}");
    assert_eq!(asked["last"]["text"].as_str().map(|t| t.chars().count()), Some(200), "{asked}");
    assert_eq!(asked["customer_at"], asked["last"]["at"], "{asked}");

    // After a reconnect (to another node): the snapshot again, then changes.
    drop(anna);
    let mut anna = agent(nodes.node(1), "bank", "anna").await;
    let snapshot = list(&mut anna).await;
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    assert_eq!(snapshot[0]["conversation"], conversation.as_str());
    assert_eq!(snapshot[0]["owner"], "agent");
    assert_eq!(snapshot[0]["agent"], "bob");
    assert_eq!(snapshot[0]["online"], true);
    let viewers = &snapshot[0]["viewers"];
    assert_eq!(viewers, &json!([{"agent": "bob", "name": "bob"}]), "{viewers}");
    seen.extend(snapshot);

    // The customer leaves: still listed (recent), now offline.
    drop(customer);
    until_summary(&mut anna, &conversation, &mut seen, |s| s["online"] == false).await;

    // Another tenant's conversation never appeared, in any frame.
    assert!(!seen.iter().any(|frame| frame.to_string().contains(&foreign)), "{seen:?}");
    drop(other);
}

#[tokio::test]
async fn a_conversation_leaves_the_list_once_its_customer_is_offline_past_the_window() {
    let nodes = Nodes::start(&["--agents-list-window-secs", "1"]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    list(&mut anna).await;
    let mut seen = Vec::new();
    let customer = customer_with_history(nodes.node(1), "bank", "carol").await;
    let conversation = customer.conversation();
    until_summary(&mut anna, &conversation, &mut seen, |s| s["online"] == true).await;
    // Online: listed past the window.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    anna.send_json(json!({"type": "ping"})).await;
    loop {
        let frame = anna.next().await;
        assert_ne!(frame["type"], "conversation.removed", "an online customer's conversation stays: {frame}");
        if frame["type"] == "pong" {
            break;
        }
    }
    drop(customer);
    loop {
        let frame = anna.next().await;
        if frame["type"] == "conversation.removed" {
            assert_eq!(frame["conversation"], conversation.as_str(), "{frame}");
            break;
        }
    }
    // `unlist` stops the changes; a new list has nothing.
    anna.send_json(json!({"type": "unlist"})).await;
    let mut again = customer_with_history(nodes.node(2), "bank", "dora").await;
    again.ask("q2", "more").await;
    assert_eq!(list(&mut anna).await.len(), 1, "dora's conversation is live");
}

#[tokio::test]
async fn the_live_list_shows_the_customer_typing_and_a_dead_nodes_customers_going_offline() {
    let nodes = Nodes::start(&["--agents-presence-ttl-secs", "2", "--agents-typing-ttl-ms", "1000"]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    list(&mut anna).await;
    let mut seen = Vec::new();
    let mut customer = customer_with_history(nodes.node(1), "bank", "carol").await;
    let conversation = customer.conversation();
    until_summary(&mut anna, &conversation, &mut seen, |s| s["online"] == true && s["last"]["seq"] == 2).await;

    // Typing starts and stops in the list, from another node; refreshing it changes nothing.
    customer.send_json(json!({"type": "typing", "on": true})).await;
    let typing = until_summary(&mut anna, &conversation, &mut seen, |s| s["typing"] == true).await;
    assert_eq!(typing["online"], true, "{typing}");
    customer.send_json(json!({"type": "typing", "on": true})).await;
    customer.send_json(json!({"type": "typing", "on": false})).await;
    let stopped = seen.len();
    until_summary(&mut anna, &conversation, &mut seen, |s| s["typing"] == false).await;
    assert_eq!(seen.len(), stopped + 1, "one change for the refresh and the stop: {:?}", &seen[stopped..]);

    // Typing again, the customer's node dies: offline and not typing within the presence TTL.
    customer.send_json(json!({"type": "typing", "on": true})).await;
    until_summary(&mut anna, &conversation, &mut seen, |s| s["typing"] == true).await;
    let died_at = std::time::Instant::now();
    if nodes.hubs.len() > 1 {
        let mut nodes = nodes;
        nodes.hubs[1].child.start_kill().unwrap();
        nodes.hubs[1].child.wait().await.unwrap();
        let gone = until_summary(&mut anna, &conversation, &mut seen, |s| s["online"] == false).await;
        assert_eq!(gone["typing"], false, "{gone}");
        assert!(died_at.elapsed() < Duration::from_millis(3500), "within the TTL: {:?}", died_at.elapsed());
        // A new snapshot agrees.
        let snapshot = list(&mut anna).await;
        assert_eq!((&snapshot[0]["online"], &snapshot[0]["typing"]), (&json!(false), &json!(false)), "{snapshot:?}");
    } else {
        drop(customer);
        let gone = until_summary(&mut anna, &conversation, &mut seen, |s| s["online"] == false).await;
        if gone["typing"] == true {
            until_summary(&mut anna, &conversation, &mut seen, |s| s["typing"] == false).await;
        }
        assert!(died_at.elapsed() < Duration::from_millis(2000), "{:?}", died_at.elapsed());
    }
}

#[tokio::test]
async fn a_dead_nodes_agents_stop_watching_in_the_live_list() {
    let nodes = Nodes::start(&["--agents-presence-ttl-secs", "2"]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    list(&mut anna).await;
    let mut seen = Vec::new();
    // Bob watches from another node; the customer has left (the list shows
    // the conversation offline and not typing: watched, it is still re-read).
    let customer = customer_with_history(nodes.node(0), "bank", "erin").await;
    let conversation = customer.conversation();
    let mut bob = agent(nodes.node(1), "bank", "bob").await;
    bob.send_json(json!({"type": "watch", "conversation": conversation})).await;
    bob.expect("watching").await;
    let viewers = |summary: &Value| {
        summary["viewers"].as_array().map(|v| v.iter().map(|v| v["agent"].clone()).collect::<Vec<_>>())
    };
    drop(customer);
    let bob_only = |s: &Value| viewers(s) == Some(vec![json!("bob")]) && s["online"] == false;
    until_summary(&mut anna, &conversation, &mut seen, bob_only).await;
    if nodes.hubs.len() > 1 {
        // Bob's node dies: nobody tells Anna's node, whose list re-reads presence.
        let mut nodes = nodes;
        nodes.hubs[1].child.start_kill().unwrap();
        nodes.hubs[1].child.wait().await.unwrap();
        until_summary(&mut anna, &conversation, &mut seen, |s| viewers(s) == Some(vec![])).await;
    } else {
        // One node: Bob's socket closing is a change like any other.
        drop(bob);
        until_summary(&mut anna, &conversation, &mut seen, |s| viewers(s) == Some(vec![])).await;
    }
}

#[tokio::test]
async fn a_waiting_conversation_goes_back_to_the_assistant_at_the_timeout_without_a_message() {
    let answerer = RecordingAnswerer::start(Script { tokens: 3, ..Script::default() }).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url, "--agents-handoff-timeout-secs", "1"]).await;
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    list(&mut anna).await;
    let mut seen = Vec::new();

    // The customer is online and waits: told at the timeout, and the list shows it.
    let mut customer = customer_with_history(nodes.node(1), "bank", "carl").await;
    let conversation = customer.conversation();
    customer.send_json(json!({"type": "handoff"})).await;
    let waiting = customer.expect("message").await;
    assert_eq!(waiting["event"], "waiting", "{waiting}");
    let listed = until_summary(&mut anna, &conversation, &mut seen, |s| s["owner"] == "waiting").await;
    assert_eq!(listed["owner_epoch"], 1, "{listed}");
    assert!(listed["owner_since"].as_u64().is_some_and(|since| since > 0), "{listed}");
    let asked_at = std::time::Instant::now();
    let back = customer.expect("message").await;
    assert_eq!((&back["from"], &back["event"]), (&json!("system"), &json!("assistant_back")), "{back}");
    assert!(asked_at.elapsed() < Duration::from_millis(2500), "at the timeout: {:?}", asked_at.elapsed());
    let listed = until_summary(&mut anna, &conversation, &mut seen, |s| s["owner"] == "assistant").await;
    assert_eq!(listed["owner_epoch"], 2, "{listed}");
    customer.ask("q2", "So, the fees?").await;
    assert_eq!(answerer.requests().len(), 2, "the assistant answers again");

    // A customer who left while waiting: the lists' nodes hand it back, exactly once.
    let mut dora = customer_with_history(nodes.node(2), "bank", "dora").await;
    let theirs = dora.conversation();
    dora.send_message("q2", "human").await;
    dora.expect("ack").await;
    assert_eq!(dora.expect("message").await["event"], "waiting");
    drop(dora);
    until_summary(&mut anna, &theirs, &mut seen, |s| s["owner"] == "waiting").await;
    let back = until_summary(&mut anna, &theirs, &mut seen, |s| s["owner"] == "assistant").await;
    assert_eq!(back["owner_epoch"], 2, "{back}");
    assert_eq!(back["last"]["seq"], 5, "q1, its reply, q2, waiting, assistant_back: {back}");
    // Its history has the one hand-back, after the waiting.
    anna.send_json(json!({"type": "watch", "conversation": theirs})).await;
    until(&mut anna, "watching", |_| true).await;
    let mut events = Vec::new();
    for _ in 0..5 {
        let (message, _) = until(&mut anna, "message", |_| true).await;
        events.push(message["event"].as_str().unwrap_or(message["from"].as_str().unwrap()).to_owned());
    }
    assert_eq!(events, ["customer", "assistant", "customer", "waiting", "assistant_back"]);
}

#[tokio::test]
async fn an_agent_watching_sees_the_customers_place_in_line_for_the_nlp_service() {
    // One NLP slot per node, held a while by each question.
    let answerer =
        RecordingAnswerer::start(Script { first_chunk_delay: Duration::from_millis(500), ..Script::default() }).await;
    let nodes = Nodes::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "1"]).await;
    let mut waiter = customer_with_history(nodes.node(1), "bank", "wendy").await;
    let conversation = waiter.conversation();
    let mut anna = agent(nodes.node(0), "bank", "anna").await;
    anna.send_json(json!({"type": "watch", "conversation": conversation})).await;
    until(&mut anna, "watching", |_| true).await;
    until(&mut anna, "message", |frame| frame["seq"] == 2).await;

    // Another customer of the waiter's node holds the slot.
    let mut holder = Client::connect(&nodes.node(1).ws_url("tenant=bank&user=holly")).await;
    holder.send_message("h1", "Tell me about the Gold Card").await;
    holder.expect("ack").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while answerer.requests().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the holder's question reaches the answerer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    waiter.send_message("q2", "And the fees?").await;
    waiter.expect("ack").await;
    let reply = waiter.read_reply().await;
    assert_eq!(reply.queued.first().map(|q| &q["position"]), Some(&json!(1)), "{:?}", reply.queued);
    let (queued, _) = until(&mut anna, "queued", |_| true).await;
    assert_eq!(
        (&queued["conversation"], &queued["reply"], &queued["position"]),
        (&json!(conversation), &reply.queued[0]["reply"], &json!(1)),
        "{queued}"
    );
    let watched = anna.read_reply().await;
    assert_eq!(watched.deltas, reply.deltas);
    assert_eq!(watched.done, reply.done);
    holder.read_reply().await;
}
