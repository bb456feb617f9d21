//! One hub, real sockets: the conversation contract end to end.

use std::time::Duration;

use fengda_tests::{Client, Hub, RecordingAnswerer, Script, isolation, resume};
use serde_json::Value;

fn user() -> String {
    format!("u{}", std::process::id() as u64 * 1000 + rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn a_question_is_acked_and_answered_token_by_token() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={}", user()))).await;
    assert_eq!(client.ready["seq"], 0, "a new conversation starts at seq 0");
    assert!(!client.conversation().is_empty());

    let (ack, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(ack["seq"], 1);
    assert!(reply.deltas.len() >= 3, "the answer streams in several tokens: {:?}", reply.deltas);
    assert_eq!(reply.done["seq"], 2);
    assert_eq!(reply.done["fallback"], false);
    assert_eq!(reply.done["conversation"], client.conversation().as_str());
    assert!(reply.text().contains("Gold Card"), "answer about the Gold Card: {}", reply.text());
}

#[tokio::test]
async fn a_follow_up_is_answered_from_context() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={}", user()))).await;
    client.ask("m1", "Tell me about the Gold Card").await;
    let (_, follow_up) = client.ask("m2", "And how much does it cost?").await;
    assert!(
        follow_up.text().contains("Gold Card"),
        "the follow-up must be answered about the Gold Card: {}",
        follow_up.text()
    );
    let (_, chinese) = client.ask("m3", "介绍一下金卡").await;
    assert!(chinese.text().contains("金卡"), "{}", chinese.text());
}

#[tokio::test]
async fn a_resent_message_is_acked_again_and_never_answered_twice() {
    let hub = Hub::start(&[]).await;
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={}", user()))).await;
    let (first_ack, _) = client.ask("same-id", "I lost my card").await;
    client.send_message("same-id", "I lost my card").await;
    let again = client.expect("ack").await;
    assert_eq!(again["seq"], first_ack["seq"], "a resend gets its original seq");
    // The very next frames must belong to the next question, not a second answer.
    let (ack, reply) = client.ask("other-id", "What are your opening hours?").await;
    assert_eq!(ack["seq"], 3, "seq 1 question, 2 reply, 3 the new question");
    assert_eq!(reply.done["seq"], 4);
}

#[tokio::test]
async fn reconnecting_with_after_replays_what_was_missed() {
    let hub = Hub::start(&[]).await;
    let user = user();
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
    let conversation = client.conversation();
    let (_, reply1) = client.ask("m1", "Tell me about the Gold Card").await;
    client.ask("m2", "How much does it cost?").await;
    drop(client);

    // Without `conversation`, the user's most recent conversation is resumed.
    let mut back = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}&after=1"))).await;
    assert_eq!(back.conversation(), conversation);
    assert_eq!(back.ready["seq"], 4);
    let mut replayed = Vec::new();
    for _ in 0..3 {
        let frame = back.expect("message").await;
        replayed.push(frame);
    }
    let seqs: Vec<_> = replayed.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4]);
    assert_eq!(replayed[0]["from"], "assistant");
    assert_eq!(replayed[0]["id"], reply1.reply_id.as_str());
    assert_eq!(replayed[0]["text"], reply1.text());
    assert_eq!(replayed[1]["from"], "customer");
    assert_eq!(replayed[1]["id"], "m2");
    back.assert_alive().await;

    // A resend of an id stored before the reconnect is recognised on the new socket.
    back.send_message("m2", "How much does it cost?").await;
    assert_eq!(back.expect("ack").await["seq"], 3);
    back.assert_alive().await;

    // Explicit conversation id, nothing missed.
    let mut explicit =
        Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}&conversation={conversation}&after=4"))).await;
    assert_eq!(explicit.ready["seq"], 4);
    explicit.assert_alive().await;
}

#[tokio::test]
async fn two_sockets_of_one_conversation_see_the_same_events() {
    let hub = Hub::start(&[]).await;
    let user = user();
    let mut phone = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
    // A conversation exists, and can be joined by id, from its first message on.
    phone.ask("q-first", "Hello").await;
    let conversation = phone.conversation();
    let mut laptop =
        Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}&conversation={conversation}"))).await;

    let questions = ["Tell me about the Gold Card", "How much does it cost?", "I lost my card"];
    let mut phone_seqs = Vec::new();
    let mut laptop_seqs = Vec::new();
    for (i, question) in questions.iter().enumerate() {
        let asker_is_phone = i % 2 == 0;
        let id = format!("q{i}");
        let (asker, watcher) = if asker_is_phone { (&mut phone, &mut laptop) } else { (&mut laptop, &mut phone) };
        let (ack, reply) = asker.ask(&id, question).await;
        let message = watcher.expect("message").await;
        assert_eq!(message["from"], "customer");
        assert_eq!(message["id"], id.as_str());
        assert_eq!(message["text"], *question);
        assert_eq!(message["seq"], ack["seq"]);
        let watched = watcher.read_reply().await;
        assert_eq!(watched.done, reply.done, "both sockets get the same reply.done");
        assert_eq!(watched.deltas, reply.deltas, "both sockets get the same deltas");
        let (asker_seqs, watcher_seqs) =
            if asker_is_phone { (&mut phone_seqs, &mut laptop_seqs) } else { (&mut laptop_seqs, &mut phone_seqs) };
        asker_seqs.extend([ack["seq"].as_u64().unwrap(), reply.done["seq"].as_u64().unwrap()]);
        watcher_seqs.extend([message["seq"].as_u64().unwrap(), watched.done["seq"].as_u64().unwrap()]);
    }
    assert_eq!(phone_seqs, laptop_seqs);
    assert_eq!(phone_seqs, (3..=8).collect::<Vec<_>>(), "seq is gap-free");
}

#[tokio::test]
async fn tenants_and_users_do_not_share_conversations() {
    let hub = Hub::start(&[]).await;
    let mut alice = Client::connect(&hub.ws_url("tenant=demo&user=alice")).await;
    alice.ask("m1", "Tell me about the Gold Card").await;
    let conversation = alice.conversation();

    // Same user id at another tenant: a different, empty conversation.
    let other_tenant = Client::connect(&hub.ws_url("tenant=telco&user=alice")).await;
    assert_ne!(other_tenant.conversation(), conversation);
    assert_eq!(other_tenant.ready["seq"], 0);

    // Another user, or another tenant, naming alice's conversation is refused like an unknown id.
    for query in [
        format!("tenant=demo&user=mallory&conversation={conversation}"),
        format!("tenant=telco&user=alice&conversation={conversation}"),
    ] {
        let mut intruder = Client::connect_unready(&hub.ws_url(&query)).await;
        let error = intruder.expect("error").await;
        assert_eq!(error["code"], "conversation_not_found");
        let close = intruder.expect_close().await.expect("close frame");
        assert_eq!(u16::from(close.code), 4004);
    }
}

#[tokio::test]
async fn tenant_and_user_ids_that_overlap_when_joined_stay_apart() {
    let hub = Hub::start(&[]).await;
    isolation::colliding_ids_stay_apart(&hub, &hub, hub.redis.as_ref()).await;
}

#[tokio::test]
async fn a_conversation_exists_from_its_first_message_with_the_epoch_ready_gave() {
    let hub = Hub::start(&[]).await;
    let user = user();
    let connect_only = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
    let unsent = connect_only.conversation();
    assert_eq!(connect_only.ready["seq"], 0);
    // Nothing was created: neither another socket naming it nor the user's next socket finds it.
    let mut naming =
        Client::connect_unready(&hub.ws_url(&format!("tenant=demo&user={user}&conversation={unsent}&after=0"))).await;
    assert_eq!(naming.expect("error").await["code"], "conversation_not_found");
    assert_eq!(u16::from(naming.expect_close().await.expect("close frame").code), 4004);
    drop(connect_only);
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
    assert_ne!(client.conversation(), unsent, "a conversation nobody wrote in is not the user's most recent");

    // The first message creates it, with the epoch `ready` announced.
    let epoch = client.ready["epoch"].as_str().unwrap().to_owned();
    let (ack, _) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(ack["seq"], 1);
    let conversation = client.conversation();
    for query in [format!("conversation={conversation}&after=0&epoch={epoch}"), format!("after=0&epoch={epoch}")] {
        let mut laptop = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}&{query}"))).await;
        assert_eq!(laptop.conversation(), conversation, "{query}");
        assert_eq!((laptop.ready["seq"].as_u64(), laptop.ready["epoch"].as_str()), (Some(2), Some(epoch.as_str())));
        assert_eq!(laptop.expect("message").await["id"], "m1", "replayed, not history_lost");
        assert_eq!(laptop.expect("message").await["seq"], 2);
        laptop.assert_alive().await;
    }
}

#[tokio::test]
async fn a_user_creating_too_many_conversations_is_refused_and_other_users_are_not() {
    // Three per hour at most. Four sockets connect before anything is stored:
    // each gets a new conversation of its own, created by its first message.
    let hub = Hub::start(&["--max-created-per-user", "3"]).await;
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(Client::connect(&hub.ws_url("tenant=demo&user=greedy")).await);
    }
    let mut fourth = sockets.pop().unwrap();
    let mut created = std::collections::BTreeSet::new();
    for (i, client) in sockets.iter_mut().enumerate() {
        let (ack, _) = client.ask(&format!("m{i}"), "Hello").await;
        assert_eq!(ack["seq"], 1);
        created.insert(client.conversation());
    }
    assert_eq!(created.len(), 3, "three new conversations");

    // The fourth: the socket is open (nothing was created for it), its first message is refused.
    assert!(!created.contains(&fourth.conversation()));
    fourth.send_message("m3", "Hello").await;
    let error = fourth.expect("error").await;
    assert_eq!((error["code"].as_str(), error["id"].as_str()), (Some("too_many_conversations"), Some("m3")), "{error}");
    let close = fourth.expect_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 4430);
    // The refused conversation did not become the user's most recent one.
    let again = Client::connect(&hub.ws_url("tenant=demo&user=greedy")).await;
    assert!(created.contains(&again.conversation()), "{} is not one of {created:?}", again.conversation());

    // Writing in a conversation that exists is no creation.
    let existing = created.first().unwrap();
    let mut back = Client::connect(&hub.ws_url(&format!("tenant=demo&user=greedy&conversation={existing}"))).await;
    assert_eq!(back.ask("m4", "Hello again").await.0["seq"], 3);
    // Another user of the tenant, and the same user id at another tenant, are unaffected.
    for query in ["tenant=demo&user=modest", "tenant=telco&user=greedy"] {
        let mut other = Client::connect(&hub.ws_url(query)).await;
        assert_eq!(other.ask("m1", "Hello").await.0["seq"], 1, "{query}");
    }
}

#[tokio::test]
async fn health_probes_and_web_demo_are_served() {
    let hub = Hub::start(&[]).await;
    let http = reqwest::Client::new();
    let healthz = http.get(format!("{}/healthz", hub.url)).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = http.get(format!("{}/readyz", hub.url)).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    let page = http.get(format!("{}/", hub.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let body = page.text().await.unwrap();
    assert!(body.contains("chat.js"), "index.html loads the widget");
    let console = http.get(format!("{}/console", hub.url)).send().await.unwrap();
    assert_eq!(console.status(), 200);
    assert!(console.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(console.text().await.unwrap().contains("console.js"), "console.html loads the console");
    for asset in ["client.js", "chat.js", "style.css", "console.js"] {
        let response = http.get(format!("{}/{asset}", hub.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
    }
    let missing = http.get(format!("{}/nope", hub.url)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

/// A hub answering from a [`RecordingAnswerer`] with `script`, with the
/// lost-reply scenario's short grace.
async fn hub_with_answerer(script: fengda_tests::Script) -> (Hub, RecordingAnswerer) {
    let answerer = RecordingAnswerer::start(script).await;
    let flags = resume::hub_flags(&answerer);
    let hub = Hub::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    (hub, answerer)
}

/// The only socket drops after a random number of deltas and the customer
/// is back after `away`, within the grace: the whole reply, once, live.
/// The time away is what is tested; the margins are generous: back at most
/// 1 s into a 1.5 s grace, while the answer streams for 4 s.
async fn back_within_the_grace(away: Duration) {
    let (hub, answerer) = hub_with_answerer(resume::script()).await;
    let outcome = resume::drop_and_resume(&hub, &hub, &user(), resume::random_in(10), resume::Away::For(away)).await;
    assert_eq!(outcome.reply["type"], "reply.done", "the reply was still streaming: {outcome:?}");
    assert_eq!(outcome.reply["text"], resume::answer_prefix(resume::TOKENS), "{outcome:?}");
    assert_eq!(outcome.reply["fallback"], false);
    assert!(outcome.reply.get("cancelled").is_none(), "{outcome:?}");
    assert_eq!(answerer.cancelled(), 0, "the NLP call went on: {outcome:?}");
    assert_eq!(answerer.requests().len(), 1);
}

#[tokio::test]
async fn a_customer_back_50_ms_after_their_only_socket_dropped_gets_the_rest_of_the_reply() {
    back_within_the_grace(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_customer_back_1_s_after_their_only_socket_dropped_gets_the_rest_of_the_reply() {
    back_within_the_grace(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_reply_that_finished_while_the_customer_was_away_is_replayed() {
    // 12 tokens in about 250 ms; the customer is back once it is stored.
    let script = Script { tokens: 12, token_delay: Duration::from_millis(20), ..Script::default() };
    let (hub, answerer) = hub_with_answerer(script).await;
    let away = resume::Away::UntilStored;
    let outcome = resume::drop_and_resume(&hub, &hub, &user(), resume::random_in(5), away).await;
    assert_eq!(outcome.delivery, resume::Delivery::Replayed, "{outcome:?}");
    assert_eq!(outcome.reply["text"], resume::answer_prefix(12), "{outcome:?}");
    assert!(outcome.reply.get("cancelled").is_none(), "{outcome:?}");
    assert_eq!(answerer.cancelled(), 0);
}

#[tokio::test]
async fn a_customer_back_after_the_grace_finds_the_reply_stored_as_cancelled_with_what_streamed() {
    let (hub, answerer) = hub_with_answerer(resume::script()).await;
    let away = resume::Away::PastGrace(&answerer);
    let outcome = resume::drop_and_resume(&hub, &hub, &user(), resume::random_in(10), away).await;
    resume::assert_cancelled_partial(&outcome);
    assert_eq!(answerer.cancelled(), 1);
    assert_eq!(answerer.requests().len(), 1);
}

#[tokio::test]
async fn questions_still_queued_when_the_grace_ends_get_empty_cancelled_replies_without_an_nlp_call() {
    let (hub, answerer) = hub_with_answerer(resume::script()).await;
    let user = user();
    let mut client = Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}"))).await;
    let conversation = client.conversation();
    for id in ["m1", "m2", "m3"] {
        client.send_message(id, "Tell me a story").await;
    }
    // The acks, and the first reply's first delta (they may interleave).
    let (mut acks, mut deltas) = (Vec::new(), 0);
    while acks.len() < 3 || deltas == 0 {
        let frame = client.next().await;
        match frame["type"].as_str() {
            Some("ack") => acks.push(frame["seq"].as_u64().unwrap()),
            Some("reply.delta") => deltas += 1,
            _ => panic!("{frame}"),
        }
    }
    assert_eq!(acks, [1, 2, 3]);
    drop(client);
    // The grace ends: the NLP call is cancelled, then every reply is stored.
    answerer.wait_cancelled(1).await;
    resume::wait_until_stored(&hub, &user, &conversation, 6).await;

    let mut back =
        Client::connect(&hub.ws_url(&format!("tenant=demo&user={user}&conversation={conversation}&after=3"))).await;
    assert_eq!(back.ready["seq"], 6, "three questions, three answers: {}", back.ready);
    let first = back.expect("message").await;
    assert_eq!((first["from"].as_str(), first["cancelled"].as_bool()), (Some("assistant"), Some(true)), "{first}");
    assert!(first["text"].as_str().unwrap().starts_with("tok0 "), "{first}");
    for seq in [5, 6] {
        let queued = back.expect("message").await;
        assert_eq!(queued["seq"], seq);
        assert_eq!((queued["from"].as_str(), queued["text"].as_str()), (Some("assistant"), Some("")), "{queued}");
        assert_eq!(queued["cancelled"], true, "{queued}");
    }
    back.assert_alive().await;
    resume::wait_for_cancellations(&answerer, 1).await;
    assert_eq!(answerer.requests().len(), 1, "the queued questions never reached the NLP service");
}
