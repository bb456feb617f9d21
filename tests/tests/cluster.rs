//! Cluster mode: several real hub processes sharing one real Redis.

use std::collections::BTreeSet;
use std::time::Duration;

use fengda_proto::nlp::v1::Role;
use fengda_tests::{Client, Hub, RecordingAnswerer, RedisServer, Script, isolation, resume};
use serde_json::Value;

async fn cluster(redis: &RedisServer, nodes: usize, extra: &[&str]) -> Vec<Hub> {
    let mut hubs = Vec::new();
    for _ in 0..nodes {
        hubs.push(Hub::start_node(redis, extra).await);
    }
    hubs
}

/// Durable seqs a client saw, in order (acks, messages, reply.done).
fn durable_seq(frame: &Value) -> Option<u64> {
    match frame["type"].as_str() {
        Some("ack" | "message" | "reply.done") => frame["seq"].as_u64(),
        _ => None,
    }
}

#[tokio::test]
async fn sockets_on_two_nodes_see_the_same_gap_free_events_and_streamed_tokens() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 3, &[]).await;
    let mut on_a = Client::connect(&nodes[0].ws_url("tenant=demo&user=two-nodes")).await;
    // A conversation exists, and can be joined by id, from its first message on.
    on_a.ask("q-first", "Hello").await;
    let conversation = on_a.conversation();
    let mut on_b =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=two-nodes&conversation={conversation}"))).await;
    assert_eq!(on_b.ready["epoch"], on_a.ready["epoch"]);

    let mut a_seqs = Vec::new();
    let mut b_seqs = Vec::new();
    for (i, question) in ["Tell me about the Gold Card", "How much does it cost?", "I lost my card"].iter().enumerate()
    {
        let a_asks = i % 2 == 0;
        let id = format!("q{i}");
        let (asker, watcher) = if a_asks { (&mut on_a, &mut on_b) } else { (&mut on_b, &mut on_a) };
        let (ack, reply) = asker.ask(&id, question).await;
        let message = watcher.expect("message").await;
        assert_eq!((message["id"].as_str(), message["seq"].as_u64()), (Some(id.as_str()), ack["seq"].as_u64()));
        let watched = watcher.read_reply().await;
        assert!(watched.deltas.len() >= 3, "the reply streams token by token on the other node too");
        assert_eq!(watched.deltas, reply.deltas);
        assert_eq!(watched.done, reply.done);
        let (asker_seqs, watcher_seqs) = if a_asks { (&mut a_seqs, &mut b_seqs) } else { (&mut b_seqs, &mut a_seqs) };
        asker_seqs.extend([ack["seq"].as_u64().unwrap(), reply.done["seq"].as_u64().unwrap()]);
        watcher_seqs.extend([message["seq"].as_u64().unwrap(), watched.done["seq"].as_u64().unwrap()]);
    }
    assert_eq!(a_seqs, b_seqs);
    assert_eq!(a_seqs, (3..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_customer_moving_to_another_node_misses_nothing_and_keeps_context() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 3, &[]).await;
    let user = "mover";
    let mut phone = Client::connect(&nodes[0].ws_url(&format!("tenant=demo&user={user}"))).await;
    let conversation = phone.conversation();
    let epoch = phone.ready["epoch"].as_str().unwrap().to_owned();
    phone.ask("p1", "Tell me about the Gold Card").await;
    let mut laptop =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user={user}&conversation={conversation}"))).await;
    assert_eq!(laptop.ready["epoch"], epoch.as_str(), "the epoch given before the first message is the log's");
    drop(phone);

    // While the phone is away, the laptop asks something.
    let (_, missed_reply) = laptop.ask("l1", "What are your opening hours?").await;

    // The phone comes back on node C, without naming the conversation.
    let mut phone = Client::connect(&nodes[2].ws_url(&format!("tenant=demo&user={user}&after=2&epoch={epoch}"))).await;
    assert_eq!(phone.conversation(), conversation, "the most recent conversation is found from any node");
    assert_eq!(phone.ready["seq"], 4);
    let first = phone.expect("message").await;
    let second = phone.expect("message").await;
    assert_eq!((first["seq"].as_u64(), first["id"].as_str()), (Some(3), Some("l1")));
    assert_eq!((second["seq"].as_u64(), second["text"].as_str()), (Some(4), Some(missed_reply.text())));

    // The follow-up is answered from the earlier turns, stored in Redis.
    let (ack, follow_up) = phone.ask("p2", "And how much does the Gold Card cost?").await;
    assert_eq!(ack["seq"], 5, "nothing duplicated, nothing skipped");
    assert!(follow_up.text().contains("Gold Card"), "{}", follow_up.text());
    let (_, pronoun) = phone.ask("p3", "Tell me about the Gold Card").await;
    assert!(pronoun.text().contains("Gold Card"));

    // A resend of an id stored through node A is recognised on node C.
    phone.send_message("p1", "Tell me about the Gold Card").await;
    assert_eq!(phone.expect("ack").await["seq"], 1);
    phone.assert_alive().await;
}

#[tokio::test]
async fn questions_asked_on_alternate_nodes_each_get_the_last_turns_of_the_log() {
    // Each node keeps the turns it knows; the other node's appends move the
    // log past them, and every question must still get exactly the log's.
    let redis = RedisServer::start().await;
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let nodes = cluster(&redis, 2, &["--nlp-url", &answerer.url, "--history-turns", "3"]).await;
    let mut on_a = Client::connect(&nodes[0].ws_url("tenant=demo&user=alternate")).await;
    on_a.ask("a0", "question 0").await;
    let conversation = on_a.conversation();
    let mut on_b =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=alternate&conversation={conversation}"))).await;
    // Who asks each question: A twice in a row, then back and forth.
    for (i, a_asks) in [true, false, false, true, false, true, true].into_iter().enumerate() {
        let i = i + 1;
        let (asker, watcher) = if a_asks { (&mut on_a, &mut on_b) } else { (&mut on_b, &mut on_a) };
        asker.ask(&format!("q{i}"), &format!("question {i}")).await;
        watcher.expect("message").await;
        watcher.read_reply().await;
    }
    let requests = answerer.requests();
    assert_eq!(requests.len(), 8);
    let answer = "tok0 tok1 tok2 tok3 tok4 ";
    for (i, request) in requests.iter().enumerate() {
        // The log: question 0, answer, question 1, answer, … ; the last 3 before question i.
        let log: Vec<String> =
            (0..i).flat_map(|j| [format!("customer: question {j}"), format!("assistant: {answer}")]).collect();
        let expected = &log[log.len().saturating_sub(3)..];
        let history: Vec<String> = request
            .history
            .iter()
            .map(|t| format!("{}: {}", if t.role == Role::Customer as i32 { "customer" } else { "assistant" }, t.text))
            .collect();
        assert_eq!((request.question.as_str(), &history[..]), (format!("question {i}").as_str(), expected));
    }
}

#[tokio::test]
async fn a_tenant_cannot_reach_another_tenants_conversation_through_colliding_ids_on_another_node() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    isolation::colliding_ids_stay_apart(&nodes[0], &nodes[1], Some(&redis)).await;
}

#[tokio::test]
async fn connect_only_sockets_leave_no_redis_key_behind() {
    const SOCKETS: usize = 200;
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let keys = || async { redis.cli(&["DBSIZE"]).await.parse::<u64>().expect("DBSIZE") };
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        // 50 users with 4 sockets each: new users, and users coming back.
        let client = Client::connect(&nodes[0].ws_url(&format!("tenant=demo&user=probe-{}", i % 50))).await;
        assert_eq!(client.ready["seq"], 0);
        sockets.push(client);
    }
    assert_eq!(keys().await, 0, "open sockets that sent nothing created no key");
    for socket in &mut sockets {
        socket.ws.close(None).await.expect("close");
    }
    drop(sockets);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[0].metric("fengda_hub_sessions_open").await > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "sessions did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(keys().await, 0, "closed sockets that sent nothing left no key");

    // One message creates exactly the conversation's keys, the user's two and
    // the tenant's list of active conversations (no listing key: no agent lists).
    let mut client = Client::connect(&nodes[0].ws_url("tenant=demo&user=probe-0")).await;
    client.ask("m1", "Hello").await;
    let tag = format!("fengda:conv:{{demo:{}}}", client.conversation());
    // The customer's presence entry follows the creation, written in the background.
    let presence = format!("{tag}:presence");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while redis.cli(&["EXISTS", &presence]).await != "1" {
        assert!(tokio::time::Instant::now() < deadline, "no presence entry for the open socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ttl: u64 = redis.cli(&["PTTL", &presence]).await.parse().unwrap();
    assert!((1..=15_000).contains(&ttl), "presence lasts agents.presence_ttl_secs without a refresh: {ttl} ms");
    let mut names: Vec<_> = redis.cli(&["KEYS", "*"]).await.lines().map(str::to_owned).collect();
    names.sort();
    let expected = [
        format!("{tag}:ids"),
        format!("{tag}:listeners"),
        format!("{tag}:log"),
        format!("{tag}:meta"),
        presence,
        "fengda:tenant:{demo}:active".to_owned(),
        "fengda:user:{demo:probe-0}:created".to_owned(),
        "fengda:user:{demo:probe-0}:latest".to_owned(),
    ];
    assert_eq!(names, expected);
    let ttl: u64 = redis.cli(&["PTTL", "fengda:user:{demo:probe-0}:created"]).await.parse().unwrap();
    assert!((1..=3_600_000).contains(&ttl), "the creation count lasts one window: {ttl} ms");
}

#[tokio::test]
async fn a_conversations_keys_outlive_its_last_append_by_the_retention_and_are_refreshed_at_most_once_per_interval() {
    // A 20 s retention: its keys expire 20 s + 2 s (the refresh interval, a
    // tenth of it) after a refresh, made when 2 s have passed since the last.
    let (retention_ms, refresh_ms) = (20_000_i64, 2_000_i64);
    let redis = RedisServer::start().await;
    let node = Hub::start_node(&redis, &["--retention-secs", "20", "--idle-window-ms", "20000"]).await;
    let mut client = Client::connect(&node.ws_url("tenant=demo&user=kept")).await;
    let tag = format!("fengda:conv:{{demo:{}}}", client.conversation());
    let meta = format!("{tag}:meta");
    let now_ms = || i64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap().as_millis()).unwrap();
    let refreshed = async || -> i64 { redis.cli(&["HGET", &meta, "refreshed_ms"]).await.parse().unwrap() };
    // Every key of the conversation lives at least the retention after the
    // append just answered (less the time since: 2 s on a loaded machine),
    // and never more than the retention and the interval.
    let mut names = ["meta", "log", "ids", "listeners"].map(|part| format!("{tag}:{part}")).to_vec();
    names.push("fengda:tenant:{demo}:active".to_owned());
    let check_ttls = async |after: &str| {
        for name in &names {
            let ttl: i64 = redis.cli(&["PTTL", name]).await.parse().unwrap();
            assert!(
                (retention_ms - 2_000..=retention_ms + refresh_ms).contains(&ttl),
                "{name} after {after}: {ttl} ms"
            );
        }
    };

    client.ask("m1", "Hello").await;
    let first = refreshed().await;
    check_ttls("the creating append").await;

    // Asked at once: within the interval (when it is), no refresh, and the
    // keys still live long enough.
    client.ask("m2", "And the Gold Card?").await;
    let answered = now_ms();
    check_ttls("an append within the interval").await;
    if answered - first < refresh_ms {
        assert_eq!(refreshed().await, first, "refreshed again within the interval");
    }

    // The interval is time: waiting it out is the point.
    let wait = first + refresh_ms + 100 - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }
    client.ask("m3", "Thanks").await;
    assert!(refreshed().await >= first + refresh_ms, "an append after the interval refreshes");
    check_ttls("an append after the interval").await;
}

#[tokio::test]
async fn a_user_returning_after_the_idle_window_starts_a_new_conversation() {
    let redis = RedisServer::start().await;
    // The window is the opening node's setting: node 1's is long, so that
    // "back within the window" does not race the clock; node 0's is short.
    let nodes = [
        Hub::start_node(&redis, &["--idle-window-ms", "600"]).await,
        Hub::start_node(&redis, &["--idle-window-ms", "600000"]).await,
    ];
    let mut first = Client::connect(&nodes[0].ws_url("tenant=demo&user=returning")).await;
    let conversation = first.conversation();
    first.ask("m1", "Tell me about the Gold Card").await;
    drop(first);

    let within = Client::connect(&nodes[1].ws_url("tenant=demo&user=returning")).await;
    assert_eq!(within.conversation(), conversation, "back within the window: same conversation");
    drop(within);

    // The idle window is time without activity: waiting it out is the point
    // (a sleep lasts at least its duration, so this does not race).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let later = Client::connect(&nodes[0].ws_url("tenant=demo&user=returning")).await;
    assert_ne!(later.conversation(), conversation, "after the window: a new conversation");
    assert_eq!(later.ready["seq"], 0);

    // The old conversation is still readable by id.
    let mut old =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=returning&conversation={conversation}&after=0")))
            .await;
    assert_eq!(old.expect("message").await["seq"], 1);
    assert_eq!(old.expect("message").await["seq"], 2);
}

#[tokio::test]
async fn two_nodes_appending_concurrently_keep_seq_gap_free() {
    const PER_SOCKET: usize = 40;
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &["--max-pending-questions", "64", "--outbound-queue-frames", "4096"]).await;
    let mut a = Client::connect(&nodes[0].ws_url("tenant=demo&user=racer")).await;
    a.ask("a-first", "Hello").await;
    let conversation = a.conversation();
    let mut b = Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=racer&conversation={conversation}"))).await;
    for i in 0..PER_SOCKET {
        a.send_message(&format!("a{i}"), "Tell me about the Gold Card").await;
        b.send_message(&format!("b{i}"), "What are your opening hours?").await;
    }
    // Every message is stored and answered: 2 durable events per message.
    let total = (PER_SOCKET * 2 * 2) as u64;
    for client in [&mut a, &mut b] {
        let mut seen = Vec::new();
        while seen.len() < total as usize {
            let frame = client.next().await;
            assert_ne!(frame["type"], "error", "{frame}");
            if let Some(seq) = durable_seq(&frame) {
                seen.push(seq);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "durable events arrive in strictly increasing seq order");
        let unique: BTreeSet<_> = seen.iter().copied().collect();
        assert_eq!(unique, (3..=total + 2).collect(), "every seq exactly once, no gaps");
    }
}

#[tokio::test]
async fn lost_history_is_reported_not_replayed_as_a_silent_gap() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    let mut client = Client::connect(&nodes[0].ws_url("tenant=demo&user=forgotten")).await;
    let conversation = client.conversation();
    let epoch = client.ready["epoch"].as_str().unwrap().to_owned();
    client.ask("m1", "Tell me about the Gold Card").await;

    // The log expires under a live session: its next message is refused, the
    // socket is closed with 4004 so the client reconnects.
    let tag = format!("fengda:conv:{{demo:{conversation}}}");
    let deleted = redis.cli(&["DEL", &format!("{tag}:meta"), &format!("{tag}:log"), &format!("{tag}:ids")]).await;
    assert_eq!(deleted, "3");
    client.send_message("m2", "Hello?").await;
    assert_eq!(client.expect("error").await["code"], "conversation_not_found");
    assert_eq!(u16::from(client.expect_close().await.expect("close").code), 4004);

    // Coming back: the same conversation id (the user's pointer survived), a
    // new epoch, and `history_lost` instead of a silent replay of nothing.
    let mut back =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=forgotten&after=2&epoch={epoch}"))).await;
    assert_eq!(back.conversation(), conversation);
    let new_epoch = back.ready["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, epoch, "a recreated log has a new epoch");
    assert_eq!(back.ready["seq"], 0);
    assert_eq!(back.expect("error").await["code"], "history_lost");
    let (ack, _) = back.ask("m1", "Hello").await;
    assert_eq!(ack["seq"], 1, "the new log starts at 1 and does not remember ids of the lost one");
    drop(back);

    // Everything lost (FLUSHALL, failover to an empty replica): a new
    // conversation, and the old epoch is still reported as lost.
    assert_eq!(redis.cli(&["FLUSHALL"]).await, "OK");
    let mut fresh =
        Client::connect(&nodes[0].ws_url(&format!("tenant=demo&user=forgotten&after=1&epoch={new_epoch}"))).await;
    assert_ne!(fresh.ready["epoch"].as_str().unwrap(), new_epoch);
    assert_eq!(fresh.expect("error").await["code"], "history_lost");
    fresh.assert_alive().await;
}

#[tokio::test]
async fn agents_notes_live_and_die_with_their_conversations_log() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let hub = &nodes[0];
    let mut customer = Client::connect(&hub.ws_url("tenant=bank&user=noted")).await;
    customer.ask("q1", "Tell me about the Gold Card").await;
    let conversation = customer.conversation();
    let mut anna = agent(hub, "anna").await;
    anna.send_json(serde_json::json!({"type": "note", "conversation": conversation, "id": "n1", "text": "VIP"})).await;
    assert_eq!(anna.expect("note").await["seq"], 1);
    drop(anna);

    // Kept as long as the log: an append that refreshes the keys' expiry
    // (due here: its last refresh is made to look long ago) refreshes the
    // notes' too, not only a note written.
    let tag = format!("fengda:conv:{{bank:{conversation}}}");
    let (meta, log, notes) = (format!("{tag}:meta"), format!("{tag}:log"), format!("{tag}:notes"));
    assert_eq!(redis.cli(&["HSET", &meta, "refreshed_ms", "0"]).await, "0");
    assert_eq!(redis.cli(&["EXPIRE", &notes, "100"]).await, "1");
    customer.ask("q2", "How much does it cost?").await;
    let log_ttl: i64 = redis.cli(&["TTL", &log]).await.parse().unwrap();
    let notes_ttl: i64 = redis.cli(&["TTL", &notes]).await.parse().unwrap();
    assert!(notes_ttl > 100 && notes_ttl >= log_ttl - 1, "notes expire in {notes_ttl} s, the log in {log_ttl} s");

    // Lost with it: the log is lost (its notes outlived it) and started
    // again; the new log has no notes, and its first note is seq 1 again.
    assert_eq!(redis.cli(&["DEL", &meta, &log, &format!("{tag}:ids")]).await, "3");
    customer.send_message("q3", "Hello?").await;
    assert_eq!(customer.expect("error").await["code"], "conversation_not_found");
    customer.expect_close().await;
    let mut back = Client::connect(&hub.ws_url("tenant=bank&user=noted")).await;
    assert_eq!(back.conversation(), conversation);
    back.ask("q1", "Hello").await;
    let mut bob = agent(hub, "bob").await;
    bob.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    bob.expect("watching").await;
    for seq in 1..=2 {
        assert_eq!(bob.expect("message").await["seq"], seq);
    }
    bob.send_json(serde_json::json!({"type": "note", "conversation": conversation, "id": "n2", "text": "New start"}))
        .await;
    let note = bob.expect("note").await;
    assert_eq!(
        (&note["id"], &note["seq"]),
        (&serde_json::json!("n2"), &serde_json::json!(1)),
        "the lost log's note is gone: {note}"
    );
    bob.assert_alive().await;
}

#[tokio::test]
async fn a_late_delta_of_a_taken_over_reply_never_follows_agent_joined_on_a_socket_that_joined_after() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let hub = &nodes[0];
    let mut customer = Client::connect(&hub.ws_url("tenant=bank&user=late")).await;
    customer.ask("q1", "Tell me about the Gold Card").await;
    let conversation = customer.conversation();
    let mut anna = agent(hub, "anna").await;
    anna.send_json(serde_json::json!({"type": "take", "conversation": conversation})).await;
    while anna.next().await["type"] != "owner" {}
    assert_eq!(customer.expect("message").await["event"], "agent_joined");
    drop((anna, customer));

    // A socket joins after the takeover (this node had no other socket of
    // it): its snapshot tells it `agent_joined`. Then a delta another node
    // produced under the old owner epoch arrives, and one under the new.
    let mut back =
        Client::connect(&hub.ws_url(&format!("tenant=bank&user=late&conversation={conversation}&after=0"))).await;
    let mut bob = agent(hub, "bob").await;
    bob.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    assert_eq!(bob.expect("watching").await["owner_epoch"], 1);
    let log = redis.cli(&["HGET", &format!("fengda:conv:{{bank:{conversation}}}:meta"), "epoch"]).await;
    publish_deltas_of_another_node(&redis, &conversation, [(&log, 0, "late"), (&log, 1, "current")]).await;
    for socket in [&mut back, &mut bob] {
        expect_only_the_current_delta_after_agent_joined(socket).await;
    }
}

#[tokio::test]
async fn a_late_delta_of_a_lost_logs_reply_never_follows_agent_joined_in_the_log_started_again() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let hub = &nodes[0];
    let mut customer = Client::connect(&hub.ws_url("tenant=bank&user=relost")).await;
    customer.ask("q1", "Tell me about the Gold Card").await;
    let conversation = customer.conversation();
    let meta = format!("fengda:conv:{{bank:{conversation}}}:meta");
    let lost = redis.cli(&["HGET", &meta, "epoch"]).await;
    // The log is lost, and the customer's next visit starts it again under
    // the same id: its owner epochs count from 0 again.
    lose_log(&redis, "bank", &conversation).await;
    customer.send_message("q2", "Hello?").await;
    assert_eq!(customer.expect("error").await["code"], "conversation_not_found");
    customer.expect_close().await;
    let mut back = Client::connect(&hub.ws_url("tenant=bank&user=relost")).await;
    assert_eq!(back.conversation(), conversation);
    back.ask("q1", "Hello").await;
    let log = redis.cli(&["HGET", &meta, "epoch"]).await;
    assert_ne!(log, lost);
    let mut anna = agent(hub, "anna").await;
    anna.send_json(serde_json::json!({"type": "take", "conversation": conversation})).await;
    while anna.next().await["type"] != "owner" {}
    // Another node's reply asked in the lost log, under its owner epoch 2
    // (above the new log's 1: the two do not compare), still streams. This
    // node's fan-out followed the takeover and drops it.
    let deltas = [(&lost[..], 2, "late"), (&log[..], 1, "current")];
    publish_deltas_of_another_node(&redis, &conversation, deltas).await;
    expect_only_the_current_delta_after_agent_joined(&mut back).await;
    // Sockets that join afresh (this node had none left) learn of the
    // takeover from their snapshots, and their writers drop it.
    drop((back, anna));
    let channel = format!("fengda:conv:{{bank:{conversation}}}:events");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while redis.cli(&["PUBSUB", "NUMSUB", &channel]).await != format!("{channel}\n0") {
        assert!(tokio::time::Instant::now() < deadline, "the node still follows the conversation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("tenant=bank&user=relost&conversation={conversation}&after=0");
    let mut again = Client::connect(&hub.ws_url(&url)).await;
    let mut bob = agent(hub, "bob").await;
    bob.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    assert_eq!(bob.expect("watching").await["owner_epoch"], 1);
    publish_deltas_of_another_node(&redis, &conversation, deltas).await;
    for socket in [&mut again, &mut bob] {
        expect_only_the_current_delta_after_agent_joined(socket).await;
    }
}

/// Publishes `reply.delta`s on the conversation's channel as another node
/// streaming them would: each of a reply asked under owner epoch `epoch` of
/// the log with epoch `log`.
async fn publish_deltas_of_another_node<const N: usize>(
    redis: &RedisServer,
    conversation: &str,
    deltas: [(&str, u64, &str); N],
) {
    use fengda::event::{LogEpoch, OwnerEpoch};
    use fengda::store::redis::wire::{NodeId, Payload};
    let channel = format!("fengda:conv:{{bank:{conversation}}}:events");
    let other_node = NodeId::generate();
    for (log, epoch, text) in deltas {
        let frame = serde_json::json!({"type": "reply.delta", "conversation": conversation, "reply": format!("r-{text}"), "index": 0, "text": text});
        let asked = OwnerEpoch { log: LogEpoch::of(log), epoch };
        let payload = String::from_utf8(Payload::encode_frame(&other_node, &frame.to_string(), asked)).unwrap();
        assert_eq!(redis.cli(&["PUBLISH", &channel, &payload]).await, "1", "the node listens");
    }
}

/// Reads up to the first `reply.delta`: `agent_joined` came before it, and
/// it is the current owner's ("current"), the taken-over reply's dropped.
async fn expect_only_the_current_delta_after_agent_joined(socket: &mut Client) {
    let mut before = Vec::new();
    let delta = loop {
        let frame = socket.next().await;
        match frame["type"].as_str() {
            Some("reply.delta") => break frame,
            _ => before.push(frame),
        }
    };
    assert!(before.iter().any(|frame| frame["event"] == "agent_joined"), "{before:?}");
    assert_eq!(delta["text"], "current", "the taken-over reply's delta was dropped: {delta}");
    socket.assert_alive().await;
}

#[tokio::test]
async fn nodes_survive_a_redis_restart_and_route_again_by_themselves() {
    let mut redis = RedisServer::start_persistent().await;
    let nodes = cluster(&redis, 2, &[]).await;
    let mut a = Client::connect(&nodes[0].ws_url("tenant=demo&user=outage")).await;
    let conversation = a.conversation();
    a.ask("m1", "Tell me about the Gold Card").await;
    let mut b =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=outage&conversation={conversation}"))).await;

    redis.kill().await;
    // Sockets stay open; a message that cannot be stored gets `unavailable`, never an ack.
    a.assert_alive().await;
    a.send_message("m2", "How much does it cost?").await;
    let error = a.expect("error").await;
    assert_eq!((error["code"].as_str(), error["id"].as_str()), (Some("unavailable"), Some("m2")));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while nodes[0].readyz().await == 200 {
        assert!(tokio::time::Instant::now() < deadline, "readyz stays green while Redis is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.restart().await;
    for node in &nodes {
        node.wait_ready().await;
    }
    // Same sockets, no hub restart: the resend is stored and routed to the other node.
    // The sender gets its `ack`, or, when the resync that follows the
    // restart re-reads the log after the resend was stored, the same event
    // recovered as `message` (protocol §4: recovered events arrive like a replay).
    a.send_message("m2", "How much does it cost?").await;
    let stored = a.next().await;
    assert!(matches!(stored["type"].as_str(), Some("ack" | "message")), "{stored}");
    assert_eq!((stored["id"].as_str(), &stored["seq"]), (Some("m2"), &serde_json::json!(3)), "{stored}");
    let reply = a.read_reply().await;
    assert!(reply.text().contains("Gold Card"), "context survived the restart: {}", reply.text());
    let message = b.expect("message").await;
    assert_eq!(message["seq"], 3);
    assert_eq!(b.read_reply().await.done, reply.done);
}

#[tokio::test]
async fn presence_is_written_again_after_redis_forgets_its_scripts() {
    let redis = RedisServer::start().await;
    // Heartbeats every second (a third of the TTL).
    let node = Hub::start_node(&redis, &["--agents-presence-ttl-secs", "3"]).await;
    let mut client = Client::connect(&node.ws_url("tenant=demo&user=present")).await;
    client.ask("m1", "Hello").await;
    let presence = format!("fengda:conv:{{demo:{}}}:presence", client.conversation());
    let wait_for_entry = async || {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while redis.cli(&["HLEN", &presence]).await != "1" {
            assert!(tokio::time::Instant::now() < deadline, "no presence entry for the open socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_for_entry().await;
    // As after a Redis restart: no scripts, no entry. The next heartbeat loads
    // the scripts and writes the entry again.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).await, "OK");
    redis.cli(&["DEL", &presence]).await;
    wait_for_entry().await;
}

#[tokio::test]
async fn appends_load_the_scripts_again_after_redis_forgets_them_and_point_the_user_at_their_conversation() {
    let redis = RedisServer::start().await;
    let node = Hub::start_node(&redis, &[]).await;
    let mut client = Client::connect(&node.ws_url("tenant=demo&user=forgetful")).await;
    let latest = "fengda:user:{demo:forgetful}:latest";
    assert_eq!(redis.cli(&["EXISTS", latest]).await, "0", "opening a new conversation writes nothing");
    client.ask("m1", "Hello").await;
    // The question's append made the conversation the user's most recent.
    assert_eq!(redis.cli(&["HGET", latest, "conversation"]).await, client.conversation());
    assert_ne!(redis.cli(&["TTL", latest]).await, "-1", "the pointer expires");
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).await, "OK");
    let (ack, reply) = client.ask("m2", "Tell me about the Gold Card").await;
    assert_eq!(ack["seq"], 3, "stored after the script was loaded again");
    assert_eq!(reply.done["seq"], 4);
}

#[tokio::test]
async fn a_node_subscribes_at_a_new_conversations_first_message_and_unsubscribes_after_its_last_socket() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let conversation_channels = || redis.cli(&["PUBSUB", "CHANNELS", "*:conv:*"]);
    let mut first = Client::connect(&nodes[0].ws_url("tenant=demo&user=subs")).await;
    let conversation = first.conversation();
    let channel = format!("fengda:conv:{{demo:{conversation}}}:events");
    // A new conversation: nobody else can name it before it exists.
    first.assert_alive().await;
    assert_eq!(conversation_channels().await, "", "a socket that has not asked subscribes nothing");
    first.ask("m1", "Hello").await;
    assert_eq!(conversation_channels().await, channel, "one channel, with the conversation's hash tag");
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(
            Client::connect(&nodes[0].ws_url(&format!("tenant=demo&user=subs&conversation={conversation}"))).await,
        );
    }
    assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", &channel]).await, format!("{channel}\n1"), "one subscription per node");
    first.assert_alive().await;
    drop(first);
    drop(sockets);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !conversation_channels().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the node never unsubscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PUBLISH calls Redis has executed (scripts' included).
async fn publishes(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).await;
    let line = stats.lines().find(|l| l.starts_with("cmdstat_publish:")).unwrap_or("cmdstat_publish:calls=0,");
    line.split(['=', ',']).nth(1).and_then(|n| n.parse().ok()).expect("a calls= count")
}

/// This node's presence entry of `tag`'s conversation once it differs from
/// `last` (a heartbeat rewrites it with a later expiry).
async fn next_presence_entry(redis: &RedisServer, tag: &str, last: &str) -> String {
    let presence = format!("{tag}:presence");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entry = redis.cli(&["HVALS", &presence]).await;
        if !entry.is_empty() && entry != last {
            return entry;
        }
        assert!(tokio::time::Instant::now() < deadline, "the presence entry was not written again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every command Redis runs while it lives (`MONITOR`), scripts' inner calls included.
struct Monitor {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    async fn start(redis: &RedisServer) -> Monitor {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "monitor"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli not found (package redis-tools, installed with redis-server)");
        let mut reader = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(5), reader.next_line()).await;
        assert_eq!(first.ok().and_then(Result::ok).flatten().as_deref(), Some("OK"), "MONITOR did not start");
        let lines = std::sync::Arc::<std::sync::Mutex<Vec<String>>>::default();
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Monitor { child, lines }
    }

    /// The commands seen so far that name `needle`.
    fn naming(&self, needle: &str) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|line| line.contains(needle)).cloned().collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_socket_that_has_not_asked_costs_redis_only_its_open_and_its_presence_starts_with_the_conversation() {
    let redis = RedisServer::start().await;
    // Heartbeats every ~670 ms.
    let node = Hub::start_node(&redis, &["--agents-presence-ttl-secs", "2"]).await;
    let mut asked = Client::connect(&node.ws_url("tenant=demo&user=early")).await;
    asked.ask("m1", "Hello").await;
    let asked_tag = format!("fengda:conv:{{demo:{}}}", asked.conversation());
    let entry = next_presence_entry(&redis, &asked_tag, "").await;

    let monitor = Monitor::start(&redis).await;
    let mut quiet = Client::connect(&node.ws_url("tenant=demo&user=quiet")).await;
    let conversation = quiet.conversation();
    quiet.send_json(serde_json::json!({"type": "typing", "on": true})).await;
    quiet.assert_alive().await;
    // Two heartbeats of the node after the socket opened.
    let entry = next_presence_entry(&redis, &asked_tag, &entry).await;
    next_presence_entry(&redis, &asked_tag, &entry).await;
    // No log read, no presence write or announcement, no typing: nothing
    // else can name a conversation before its first message.
    assert_eq!(monitor.naming(&conversation), Vec::<String>::new());
    assert_eq!(monitor.naming("quiet").len(), 1, "the open's one read, the user's most recent conversation");

    // Its first message creates it: from then on its presence is kept.
    quiet.ask("m1", "Hello").await;
    let quiet_tag = format!("fengda:conv:{{demo:{conversation}}}");
    let entry = next_presence_entry(&redis, &quiet_tag, "").await;
    assert!(entry.ends_with(r#"{"online":true,"viewers":[]}"#), "{entry}");
    // A heartbeat later, the entry's announcement is surely done too.
    next_presence_entry(&redis, &quiet_tag, &entry).await;
    let named = monitor.naming(&conversation);
    assert!(named[0].contains("\"SUBSCRIBE\""), "its first message subscribes first: {named:#?}");
    // The creating event and the presence announcement: no hello (no other
    // node can name it yet), and the reply is published for no one.
    let channel = format!("\"{quiet_tag}:events\"");
    let published: Vec<_> = named.iter().filter(|l| l.contains("\"PUBLISH\"") && l.contains(&channel)).collect();
    assert_eq!(published.len(), 2, "{published:#?}");
}

#[tokio::test]
async fn deltas_go_through_redis_only_while_another_node_listens() {
    let redis = RedisServer::start().await;
    // 40 tokens over ~200 ms: the node learns from its first PUBLISH that no one else listens.
    let nodes =
        cluster(&redis, 2, &["--answerer-first-token-delay-ms", "0", "--answerer-tokens-per-second", "200"]).await;
    let mut customer = Client::connect(&nodes[0].ws_url("tenant=demo&user=alone")).await;
    let before = publishes(&redis).await;
    let (_, reply) = customer.ask("q1", "Tell me about the Gold Card").await;
    let published = publishes(&redis).await - before;
    assert!(reply.deltas.len() >= 30, "{} deltas", reply.deltas.len());
    // Two durable events, a heartbeat or two, and the delta(s) before the first answer.
    assert!(published < 10, "{published} PUBLISHes for a reply of {} deltas no other node wanted", reply.deltas.len());

    // An agent opens the conversation on the other node: from the next reply
    // on, every delta reaches it too.
    let conversation = customer.conversation();
    let mut agent =
        Client::connect(&nodes[1].ws_url(&format!("tenant=demo&user=alone&conversation={conversation}"))).await;
    let (_, reply) = customer.ask("q2", "How much does it cost?").await;
    agent.expect("message").await;
    let watched = agent.read_reply().await;
    assert_eq!(watched.deltas, reply.deltas, "the other node saw every delta");
    assert_eq!(watched.done, reply.done);
}

/// Two nodes on one Redis answering from one [`RecordingAnswerer`] with
/// `script`, with the lost-reply scenario's short grace.
async fn nodes_with_answerer(redis: &RedisServer, script: Script) -> (Vec<Hub>, RecordingAnswerer) {
    let answerer = RecordingAnswerer::start(script).await;
    let flags = resume::hub_flags(&answerer);
    let nodes = cluster(redis, 2, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    (nodes, answerer)
}

/// The only socket, on node A, drops after a random number of deltas; the
/// customer is back on node B after `away`, within the grace: the rest of
/// the reply streams to node B from the first delta after the reconnect.
async fn back_on_another_node_within_the_grace(user: &str, away: Duration) {
    let redis = RedisServer::start().await;
    let (nodes, answerer) = nodes_with_answerer(&redis, resume::script()).await;
    // The time away is what is tested: back at most 1 s into a 1.5 s grace.
    let away = resume::Away::Watching(away, &answerer);
    let outcome = resume::drop_and_resume(&nodes[0], &nodes[1], user, resume::random_in(10), away).await;
    let resume::Delivery::Live { first_index, sent_at_attach: Some(sent), .. } = outcome.delivery else {
        panic!("the reply was still streaming: {outcome:?}");
    };
    // Tokens come every 100 ms: the new node gets them from about the first
    // one the answerer sends after the customer is back (one token of slack
    // for the streaming node to hear of the new listener), not after that
    // node's next check for listeners (1 s, ten tokens later).
    assert!(first_index <= sent as u64 + 1, "first delta {first_index}, {sent} tokens sent at attach: {outcome:?}");
    assert_eq!(outcome.reply["text"], resume::answer_prefix(resume::TOKENS), "{outcome:?}");
    assert!(outcome.reply.get("cancelled").is_none(), "{outcome:?}");
    assert_eq!(answerer.cancelled(), 0, "the NLP call went on: {outcome:?}");
}

#[tokio::test]
async fn a_customer_back_on_another_node_50_ms_after_their_only_socket_dropped_gets_the_rest_of_the_reply() {
    back_on_another_node_within_the_grace("back-50ms", Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_customer_back_on_another_node_1_s_after_their_only_socket_dropped_gets_the_rest_of_the_reply() {
    back_on_another_node_within_the_grace("back-1s", Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_customer_back_on_another_node_just_after_a_token_gets_the_next_one() {
    // Back just after the streaming node published a token that no node
    // took: it must not wait for that node's next check for listeners.
    back_on_another_node_within_the_grace("back-150ms", Duration::from_millis(150)).await;
}

#[tokio::test]
async fn a_reply_that_finished_while_the_customer_was_away_is_replayed_on_another_node() {
    let redis = RedisServer::start().await;
    let script = Script { tokens: 12, token_delay: Duration::from_millis(20), ..Script::default() };
    let (nodes, answerer) = nodes_with_answerer(&redis, script).await;
    let away = resume::Away::UntilStored;
    let outcome = resume::drop_and_resume(&nodes[0], &nodes[1], "back-finished", resume::random_in(5), away).await;
    assert_eq!(outcome.delivery, resume::Delivery::Replayed, "{outcome:?}");
    assert_eq!(outcome.reply["text"], resume::answer_prefix(12), "{outcome:?}");
    assert_eq!(answerer.cancelled(), 0);
}

#[tokio::test]
async fn a_customer_back_on_another_node_after_the_grace_finds_the_reply_stored_as_cancelled() {
    let redis = RedisServer::start().await;
    let (nodes, answerer) = nodes_with_answerer(&redis, resume::script()).await;
    let away = resume::Away::PastGrace(&answerer);
    let outcome = resume::drop_and_resume(&nodes[0], &nodes[1], "back-late", resume::random_in(10), away).await;
    resume::assert_cancelled_partial(&outcome);
    assert_eq!(answerer.cancelled(), 1);
}

#[tokio::test]
async fn a_node_shutting_down_mid_reply_stores_what_streamed_as_cancelled() {
    let redis = RedisServer::start().await;
    let (mut nodes, answerer) = nodes_with_answerer(&redis, resume::script()).await;
    let mut client = Client::connect(&nodes[0].ws_url("tenant=demo&user=node-gone")).await;
    let conversation = client.conversation();
    client.send_message("m1", "Tell me a story").await;
    client.expect("ack").await;
    let k = resume::random_in(10);
    for _ in 0..k {
        client.expect("reply.delta").await;
    }
    let status = nodes.remove(0).terminate().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(u16::from(client.expect_close().await.expect("close frame").code), 1001);

    let mut back =
        Client::connect(&nodes[0].ws_url(&format!("tenant=demo&user=node-gone&conversation={conversation}&after=1")))
            .await;
    assert_eq!(back.ready["seq"], 2, "the question and its cancelled reply: {}", back.ready);
    let reply = back.expect("message").await;
    assert_eq!((reply["from"].as_str(), reply["cancelled"].as_bool()), (Some("assistant"), Some(true)), "{reply}");
    let text = reply["text"].as_str().unwrap();
    let streamed = text.matches(' ').count();
    assert_eq!(text, resume::answer_prefix(streamed), "k = {k}");
    assert!((k..resume::TOKENS).contains(&streamed), "{streamed} tokens stored, k = {k}");
    resume::wait_for_cancellations(&answerer, 1).await;
}

#[tokio::test]
async fn a_reply_whose_owner_epoch_went_stale_unheard_is_stored_as_interrupted() {
    let answerer =
        RecordingAnswerer::start(Script { tokens: 6, token_delay: Duration::from_millis(40), ..Script::default() })
            .await;
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &["--nlp-url", &answerer.url]).await;
    let mut customer = Client::connect(&nodes[0].ws_url("tenant=demo&user=unheard")).await;
    customer.ask("q1", "hello").await;
    customer.send_message("q2", "and then?").await;
    customer.expect("ack").await;
    let first = customer.expect("reply.delta").await;
    assert_eq!(first["index"], 0, "{first}");
    // An agent takes it in a way the node never hears of (the owner change's
    // event lost on the way): the node streams on, the store refuses the
    // reply as the assistant's and it is stored as interrupted.
    let meta = format!("fengda:conv:{{demo:{}}}:meta", customer.conversation());
    redis.cli(&["HSET", &meta, "owner", "agent:ghost", "owner_name", "Ghost", "owner_epoch", "1"]).await;
    let mut deltas = 1;
    let done = loop {
        let frame = customer.next().await;
        match frame["type"].as_str() {
            Some("reply.delta") => deltas += 1,
            Some("reply.done") => break frame,
            _ => panic!("unexpected {frame}"),
        }
    };
    assert_eq!(deltas, 6, "the rest streamed: the node heard nothing");
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["seq"], 4, "{done}");
    // The log agrees, for a socket that reads it again.
    let url = format!("tenant=demo&user=unheard&conversation={}&after=3", customer.conversation());
    let mut again = Client::connect(&nodes[0].ws_url(&url)).await;
    let stored = again.expect("message").await;
    assert_eq!(
        (&stored["seq"], &stored["from"], &stored["interrupted"]),
        (&4.into(), &"assistant".into(), &true.into())
    );
    assert_eq!(stored["text"], done["text"]);
}

/// The durable frames a client gets until it has seen `until` (a seq), in
/// order, with `ready` and `error` frames among them (deltas skipped: they
/// are best effort across nodes). A stored event reads `event <seq>`
/// whether it came live (`message`, `reply.done`) or from the log (`message`).
async fn durable_until(client: &mut Client, until: u64) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let frame = match client.try_next().await {
            Ok(frame) => frame,
            Err(error) => panic!("waiting for seq {until} after {seen:?}: {error:#}"),
        };
        let seq = durable_seq(&frame);
        match frame["type"].as_str() {
            Some("ready") => seen.push(format!("ready {} {}", frame["seq"], frame["epoch"].as_str().unwrap())),
            Some("error") => seen.push(format!("error {}", frame["code"].as_str().unwrap())),
            Some("ack") => seen.push(format!("ack {}", frame["seq"])),
            Some(_) if let Some(seq) = seq => seen.push(format!("event {seq}")),
            _ => {}
        }
        if seq == Some(until) {
            return seen;
        }
    }
}

/// A customer of `user` (a query) on `hub` with two questions answered:
/// the socket, its conversation and its log's epoch.
async fn two_turns(hub: &Hub, user: &str) -> (Client, String, String) {
    let mut customer = Client::connect(&hub.ws_url(user)).await;
    customer.ask("m1", "Tell me about the Gold Card").await;
    customer.ask("m2", "How much does it cost?").await;
    let (conversation, epoch) = (customer.conversation(), customer.ready["epoch"].as_str().unwrap().to_owned());
    (customer, conversation, epoch)
}

/// Loses a conversation's log as expired keys or a Redis that lost them
/// would (the user's pointer to it survives).
async fn lose_log(redis: &RedisServer, tenant: &str, conversation: &str) {
    let tag = format!("fengda:conv:{{{tenant}:{conversation}}}");
    let names = ["meta", "log", "ids", "listeners"].map(|name| format!("{tag}:{name}"));
    let del: Vec<&str> = ["DEL"].into_iter().chain(names.iter().map(String::as_str)).collect();
    assert_eq!(redis.cli(&del).await, "4");
}

#[tokio::test]
async fn sockets_open_while_their_log_is_recreated_get_the_new_log_whole_on_every_node() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    let user = "tenant=demo&user=relogged";
    let (mut phone, conversation, old_epoch) = two_turns(&nodes[0], user).await;
    let joined = format!("{user}&conversation={conversation}");
    // Two more sockets of it stay open: one on the same node, one on another.
    let mut tab = Client::connect(&nodes[0].ws_url(&joined)).await;
    let mut laptop = Client::connect(&nodes[1].ws_url(&joined)).await;
    assert_eq!((tab.ready["seq"].as_u64(), laptop.ready["seq"].as_u64()), (Some(4), Some(4)));

    // The log is lost (its keys expired, or Redis lost them); the user's
    // pointer to the conversation survives.
    lose_log(&redis, "demo", &conversation).await;
    phone.send_message("m3", "Hello?").await;
    assert_eq!(phone.expect("error").await["code"], "conversation_not_found");
    assert_eq!(u16::from(phone.expect_close().await.expect("close").code), 4004);

    // The phone comes back (without `conversation`, as after 4004) and keeps
    // talking: the conversation is recreated with a new log, from seq 1.
    let mut phone = Client::connect(&nodes[0].ws_url(user)).await;
    assert_eq!((phone.conversation(), phone.ready["seq"].as_u64()), (conversation.clone(), Some(0)));
    let new_epoch = phone.ready["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, old_epoch);
    phone.send_message("m3", "Hello?").await;
    assert_eq!(durable_until(&mut phone, 2).await, ["ack 1", "event 2"]);
    // The sockets that were open on the old log, on both nodes, are told
    // as a resume with the old epoch would tell them, then get the new log
    // whole, in order.
    let told = [format!("ready 0 {new_epoch}"), "error history_lost".into(), "event 1".into(), "event 2".into()];
    assert_eq!(durable_until(&mut tab, 2).await, told);
    assert_eq!(durable_until(&mut laptop, 2).await, told);

    // Talking goes on from every socket: each gets every event, in order
    // (deltas are left out: a socket that read a reply from the log may
    // still get its late deltas, which clients drop). A node that heard the
    // new log late has its sockets re-read it when it listens again; if that
    // read races a socket's own message, the message comes back as it does
    // from any read of the log (protocol §4): as `message`, not `ack`.
    let mut sockets = [phone, tab, laptop];
    for (asker, seq) in [(2, 3), (0, 5), (1, 7)] {
        sockets[asker].send_message(&format!("then-{seq}"), "And then?").await;
        for i in [asker, (asker + 1) % 3, (asker + 2) % 3] {
            let mut got = durable_until(&mut sockets[i], seq + 1).await;
            if i == asker && got[0] == format!("ack {seq}") {
                got[0] = format!("event {seq}");
            }
            assert_eq!(got, [format!("event {seq}"), format!("event {}", seq + 1)], "socket {i}");
        }
    }
}

#[tokio::test]
async fn an_agent_watching_a_conversation_whose_log_is_recreated_watches_the_new_log() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    let user = "tenant=bank&user=relogged";
    let (mut customer, conversation, old_epoch) = two_turns(&nodes[0], user).await;
    let token: Value = reqwest::get(format!("{}/demo/token?tenant=bank&user=anna&role=agent", nodes[1].url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut anna = Client::connect(&nodes[1].ws_url(&format!("token={}", token["token"].as_str().unwrap()))).await;
    anna.ignored = &["presence"];
    anna.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    let watching = anna.expect("watching").await;
    assert_eq!((&watching["seq"], &watching["epoch"]), (&4.into(), &old_epoch.clone().into()));
    for seq in 1..=4 {
        assert_eq!(anna.expect("message").await["seq"], seq);
    }

    // The log is lost; the customer comes back and talks on a new one.
    lose_log(&redis, "bank", &conversation).await;
    customer.send_message("m3", "Hello?").await;
    assert_eq!(customer.expect("error").await["code"], "conversation_not_found");
    let mut customer = Client::connect(&nodes[0].ws_url(user)).await;
    let new_epoch = customer.ready["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, old_epoch);
    customer.ask("m3", "Hello?").await;

    // Anna is shown the new log: `watching` again, then its events in order, none of the old one.
    let rewatched = loop {
        let frame = anna.next().await;
        match frame["type"].as_str() {
            Some("watching") => break frame,
            Some("reply.delta") => {}
            _ => panic!("nothing of the old log after it was lost, nor of the new one before `watching`: {frame}"),
        }
    };
    assert_eq!(rewatched["epoch"], new_epoch.as_str(), "{rewatched}");
    let (mut seqs, mut asked) = (Vec::new(), false);
    while seqs.last() != Some(&4) {
        if seqs.len() == 2 && !asked {
            customer.ask("m4", "And then?").await;
            asked = true;
        }
        let frame = anna.next().await;
        if let ("message" | "reply.done", Some(seq)) = (frame["type"].as_str().unwrap(), frame["seq"].as_u64()) {
            seqs.push(seq);
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_wait_no_live_node_saw_is_handed_back_at_the_customers_next_message() {
    let redis = RedisServer::start().await;
    let mut nodes = cluster(&redis, 2, &["--agents-handoff-timeout-secs", "1"]).await;
    let (mut customer, conversation, _) = two_turns(&nodes[0], "tenant=bank&user=waits").await;
    customer.send_json(serde_json::json!({"type": "handoff"})).await;
    assert_eq!(customer.expect("message").await["event"], "waiting");
    // The only node that saw it wait dies before the timeout.
    nodes[0].child.start_kill().unwrap();
    nodes[0].child.wait().await.unwrap();
    let waited = tokio::time::Instant::now() + Duration::from_millis(1100);
    let url = format!("tenant=bank&user=waits&conversation={conversation}");
    let mut back = Client::connect(&nodes[1].ws_url(&url)).await;
    back.assert_alive().await;
    tokio::time::sleep_until(waited).await;
    back.send_message("m3", "Hello?").await;
    back.expect("ack").await;
    let handed = back.expect("message").await;
    assert_eq!((&handed["from"], &handed["event"]), (&"system".into(), &"assistant_back".into()), "{handed}");
    back.read_reply().await;
}

#[tokio::test]
async fn a_note_written_while_a_node_could_not_hear_reaches_its_watchers_once_it_can() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    let (_customer, conversation, _) = two_turns(&nodes[0], "tenant=bank&user=noted").await;
    let mut watchers = Vec::new();
    for (node, name) in [(0, "anna"), (1, "bob")] {
        let mut watcher = agent(&nodes[node], name).await;
        watcher.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
        watcher.expect("watching").await;
        watchers.push(watcher);
    }
    // Every node's subscriber link drops, and Redis refuses to subscribe again for a while.
    redis.cli(&["ACL", "SETUSER", "default", "-subscribe", "-psubscribe", "-ssubscribe"]).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while nodes[0].readyz().await == 200 {
        assert!(tokio::time::Instant::now() < deadline, "readyz stays green while the node cannot hear");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bob writes a note meanwhile: stored, unheard on Anna's node.
    let note = serde_json::json!({"type": "note", "conversation": conversation, "id": "n1", "text": "VIP"});
    watchers[1].send_json(note).await;
    loop {
        let frame = watchers[1].next().await;
        if frame["type"] == "note" {
            break;
        }
    }
    redis.cli(&["ACL", "SETUSER", "default", "+subscribe", "+psubscribe", "+ssubscribe"]).await;
    nodes[0].wait_ready().await;
    // Anna's node resyncs its sessions: her watch gets the note it missed.
    loop {
        let frame = watchers[0].next().await;
        if frame["type"] == "note" {
            assert_eq!((&frame["id"], &frame["seq"]), (&"n1".into(), &1.into()), "{frame}");
            break;
        }
    }
}

#[tokio::test]
async fn a_hand_back_that_redis_refused_when_the_wait_ran_out_is_tried_again() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &["--agents-handoff-timeout-secs", "1"]).await;
    let (mut customer, _, _) = two_turns(&nodes[0], "tenant=bank&user=waits-on").await;
    customer.send_json(serde_json::json!({"type": "handoff"})).await;
    assert_eq!(customer.expect("message").await["event"], "waiting");
    let ran_out = tokio::time::Instant::now() + Duration::from_millis(1000 + 2 * 250);
    // Redis refuses every script (NOPERM) when the wait runs out, then accepts them again.
    redis.cli(&["ACL", "SETUSER", "default", "-evalsha", "-eval"]).await;
    tokio::time::sleep_until(ran_out).await;
    redis.cli(&["ACL", "SETUSER", "default", "+evalsha", "+eval"]).await;
    let handed = customer.expect("message").await;
    assert_eq!((&handed["from"], &handed["event"]), (&"system".into(), &"assistant_back".into()), "{handed}");
}

#[tokio::test]
async fn a_list_that_cannot_hear_the_other_nodes_at_first_gets_their_conversations_once_it_can() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 2, &[]).await;
    // Redis refuses every tenant's changes channel (NOPERM) for a while;
    // conversations' and nodes' channels stay open.
    redis.cli(&["ACL", "SETUSER", "default", "resetchannels", "&fengda:conv:*", "&fengda:node:*"]).await;
    let mut anna = agent(&nodes[0], "anna").await;
    anna.send_json(serde_json::json!({"type": "list"})).await;
    assert_eq!(anna.expect("conversations").await["conversations"], serde_json::json!([]));
    // A conversation starts on the other node: unheard here.
    let mut carol = Client::connect(&nodes[1].ws_url("tenant=bank&user=carol")).await;
    carol.ask("q1", "Tell me about the Gold Card").await;
    let conversation = carol.conversation();
    redis.cli(&["ACL", "SETUSER", "default", "allchannels"]).await;
    // Heard now: the whole list again, with it, then its changes as they come.
    let list = anna.expect("conversations").await;
    let listed: Vec<&str> = list["conversations"]
        .as_array()
        .expect("summaries")
        .iter()
        .filter_map(|summary| summary["conversation"].as_str())
        .collect();
    assert_eq!(listed, [conversation.as_str()], "{list}");
    carol.ask("q2", "And the fees?").await;
    loop {
        let change = anna.expect("conversation").await;
        assert_eq!(change["conversation"], conversation.as_str(), "{change}");
        if change["last"]["seq"] == 4 {
            break;
        }
    }
}

#[tokio::test]
async fn a_list_whose_reads_redis_refused_is_read_again_once_it_can() {
    let redis = RedisServer::start().await;
    // Typing holds, and presence is re-read (which re-reads changed
    // summaries too) less often than a step: only the sweep can re-read.
    let flags = ["--agents-typing-ttl-ms", "60000", "--agents-presence-ttl-secs", "60"];
    let nodes = cluster(&redis, 1, &flags).await;
    let (mut carol, conversation, _) = two_turns(&nodes[0], "tenant=bank&user=carol").await;
    let (mut anna, mut bob) = (agent(&nodes[0], "anna").await, agent(&nodes[0], "bob").await);
    let listed = |list: &Value| -> Vec<String> {
        let summaries = list["conversations"].as_array().expect("summaries");
        summaries.iter().map(|summary| summary["conversation"].as_str().unwrap().to_owned()).collect()
    };
    let none = Vec::<String>::new();
    // Redis refuses the tenant's conversations (NOPERM on the read only the
    // list makes): an empty list; once it can be read, every lister gets
    // it, whoever asked.
    redis.cli(&["ACL", "SETUSER", "default", "-zrevrangebyscore"]).await;
    anna.send_json(serde_json::json!({"type": "list"})).await;
    assert_eq!(listed(&anna.expect("conversations").await), none);
    redis.cli(&["ACL", "SETUSER", "default", "+zrevrangebyscore"]).await;
    bob.send_json(serde_json::json!({"type": "list"})).await;
    assert_eq!(listed(&bob.expect("conversations").await), [conversation.as_str()]);
    assert_eq!(listed(&anna.expect("conversations").await), [conversation.as_str()]);
    // Redis refuses the conversation's summary (its last event, read by
    // summaries only): the same, the list being read whole or not at all.
    redis.cli(&["ACL", "SETUSER", "default", "-lindex"]).await;
    anna.send_json(serde_json::json!({"type": "list"})).await;
    assert_eq!(listed(&anna.expect("conversations").await), none);
    redis.cli(&["ACL", "SETUSER", "default", "+lindex"]).await;
    assert_eq!(listed(&anna.expect("conversations").await), [conversation.as_str()]);
    assert_eq!(listed(&bob.expect("conversations").await), [conversation.as_str()]);
    // A change whose summary Redis refuses (the customer starts typing) is
    // read again, and sent, once it can be.
    redis.cli(&["ACL", "LOG", "RESET"]).await;
    redis.cli(&["ACL", "SETUSER", "default", "-lindex"]).await;
    carol.send_json(serde_json::json!({"type": "typing", "on": true})).await;
    let refused = tokio::time::Instant::now() + fengda_tests::STEP_TIMEOUT;
    while !redis.cli(&["ACL", "LOG"]).await.contains("lindex") {
        assert!(tokio::time::Instant::now() < refused, "the list never read the change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.cli(&["ACL", "SETUSER", "default", "+lindex"]).await;
    let summary = anna.expect("conversation").await;
    assert_eq!((summary["conversation"].as_str(), &summary["typing"]), (Some(conversation.as_str()), &true.into()));
}

/// An agent of tenant `bank` on `hub`; `presence` frames are skipped.
async fn agent(hub: &Hub, name: &str) -> Client {
    let token: Value = reqwest::get(format!("{}/demo/token?tenant=bank&user={name}&role=agent", hub.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut agent = Client::connect(&hub.ws_url(&format!("token={}", token["token"].as_str().unwrap()))).await;
    agent.ignored = &["presence"];
    agent
}

#[tokio::test]
async fn a_watch_refused_by_a_read_that_failed_after_joining_leaves_nothing_behind() {
    let redis = RedisServer::start().await;
    let nodes = cluster(&redis, 1, &[]).await;
    let (customer, conversation, _) = two_turns(&nodes[0], "tenant=bank&user=carl").await;
    // Redis refuses the presence read a watch makes once it has joined
    // the conversation (and subscribed it).
    redis.cli(&["ACL", "SETUSER", "default", "-hgetall"]).await;
    let mut ghost = agent(&nodes[0], "ghost").await;
    ghost.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    let refused = ghost.expect("error").await;
    assert_eq!(
        (refused["conversation"].as_str(), refused["code"].as_str()),
        (Some(conversation.as_str()), Some("unavailable")),
        "{refused}"
    );
    redis.cli(&["ACL", "SETUSER", "default", "+hgetall"]).await;
    // The refused watch is no viewer, and gets nothing of the conversation.
    let mut anna = agent(&nodes[0], "anna").await;
    anna.send_json(serde_json::json!({"type": "watch", "conversation": conversation})).await;
    let watching = anna.expect("watching").await;
    assert_eq!(watching["viewers"], serde_json::json!([{"agent": "anna", "name": "anna"}]), "{watching}");
    ghost.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(ghost.next().await["type"], "pong", "nothing before the pong");
    drop(customer);
}

#[tokio::test]
async fn a_channel_left_while_redis_was_down_is_unsubscribed_once_it_is_back() {
    // Persistent: the conversation's listeners hash outlives the restart.
    let mut redis = RedisServer::start_persistent().await;
    // Calls give up fast while Redis is down.
    let dir = fengda_tests::tokens::KeyDir::new();
    let config = dir.write("fengda.toml", b"[redis]\ncommand_timeout_ms = 300\n");
    let nodes = cluster(&redis, 1, &["--config", config.to_str().unwrap()]).await;
    let (customer, conversation, _) = two_turns(&nodes[0], "tenant=bank&user=carl").await;
    let channel = format!("fengda:conv:{{bank:{conversation}}}:events");
    let listeners = format!("fengda:conv:{{bank:{conversation}}}:listeners");
    assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", &channel]).await, format!("{channel}\n1"));
    assert_eq!(redis.cli(&["HLEN", &listeners]).await, "1", "the node listens");

    // Redis goes away; the customer leaves meanwhile: the node cannot
    // unsubscribe, nor leave the listeners hash (counted once it tried both).
    redis.kill().await;
    drop(customer);
    let pending = "fengda_hub_redis_unsubscribes_pending";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[0].metric(pending).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the failed unsubscribe is not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back: the Redis client subscribes every channel it remembers again,
    // then the node unsubscribes the one nobody here listens to, and
    // leaves its listeners hash.
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[0].metric(pending).await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the left channel is not unsubscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes[0].wait_ready().await;
    assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", &channel]).await, format!("{channel}\n0"));
    assert_eq!(redis.cli(&["HLEN", &listeners]).await, "0", "the node left the listeners");
}
