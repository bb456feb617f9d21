//! Tenants and users whose ids overlap once joined with `:` stay apart.
//!
//! [`colliding_ids_stay_apart`] plays the cross-tenant attack of issue #15:
//! tenant `x` naming conversation `y:<id>` of tenant `x:y` (the same Redis
//! name under a plain `:` join), and users (`a:b`, `c`) and (`a`, `b:c`)
//! sharing one `latest` pointer. Every attempt must be refused or land in the
//! intruder's own conversation, on every backend and across nodes.

use serde_json::Value;

use crate::{Client, Hub, RedisServer};

/// Status and JSON body of a refused upgrade.
pub async fn refused_upgrade(url: &str) -> (u16, Value) {
    let error = tokio_tungstenite::connect_async(url).await.expect_err("the upgrade must be refused");
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
        panic!("{url}: expected an HTTP refusal, got {error:?}");
    };
    let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON body");
    (response.status().as_u16(), body)
}

/// Plays the attack with the victims on `victim_node` and the intruders on
/// `intruder_node` (the same hub, or two nodes of one Redis). With `redis`,
/// also checks the names the hub wrote there.
pub async fn colliding_ids_stay_apart(victim_node: &Hub, intruder_node: &Hub, redis: Option<&RedisServer>) {
    // The victim: tenant `x:y`, with a stored exchange.
    let mut victim = Client::connect(&victim_node.ws_url("tenant=x:y&user=v")).await;
    victim.ask("v1", "Tell me about the Gold Card").await;
    let conversation = victim.conversation();

    // Tenant `x` naming `y:<id>`, raw or percent-encoded: not a conversation id.
    for named in [format!("y:{conversation}"), format!("y%3A{conversation}")] {
        let (status, body) =
            refused_upgrade(&intruder_node.ws_url(&format!("tenant=x&user=v&conversation={named}&after=0"))).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid_conversation")), "{named}: {body}");
    }
    // Tenant `x` naming the id itself: another tenant's, so unknown.
    let mut named =
        Client::connect_unready(&intruder_node.ws_url(&format!("tenant=x&user=v&conversation={conversation}&after=0")))
            .await;
    assert_eq!(named.expect("error").await["code"], "conversation_not_found");
    assert_eq!(u16::from(named.expect_close().await.expect("close frame").code), 4004);

    // Tenant `x` without a conversation: its own, new and empty.
    let mut intruder = Client::connect(&intruder_node.ws_url("tenant=x&user=v&after=0")).await;
    assert_ne!(intruder.conversation(), conversation);
    assert_eq!(intruder.ready["seq"], 0);

    // The victim's new exchange does not reach the intruder, whose own
    // message stays in its own conversation (its ack is its next frame).
    let (_, victim_reply) = victim.ask("v2", "What are your opening hours?").await;
    let (ack, _) = intruder.ask("injected", "Transfer all my money").await;
    assert_eq!(ack["seq"], 1, "the intruder's message starts its own log");
    // Nor does it reach the victim.
    victim.assert_alive().await;

    // The victim's log holds its four events and nothing else.
    let mut back =
        Client::connect(&victim_node.ws_url(&format!("tenant=x:y&user=v&conversation={conversation}&after=0"))).await;
    assert_eq!(back.ready["seq"], 4, "{}", back.ready);
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(back.expect("message").await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(replayed[0], "v1");
    assert_eq!(replayed[2], "v2");
    assert_eq!(replayed[3], victim_reply.reply_id);
    back.assert_alive().await;

    // Users (`a:b`, `c`) and (`a`, `b:c`) do not share a most recent conversation.
    let mut first = Client::connect(&victim_node.ws_url("tenant=a:b&user=c")).await;
    first.ask("c1", "Hello").await;
    let mut second = Client::connect(&intruder_node.ws_url("tenant=a&user=b:c&after=0")).await;
    assert_ne!(second.conversation(), first.conversation());
    assert_eq!(second.ready["seq"], 0);
    second.ask("bc1", "Hello").await;
    let again = Client::connect(&victim_node.ws_url("tenant=a:b&user=c")).await;
    assert_eq!(again.conversation(), first.conversation(), "each user keeps their own most recent conversation");

    if let Some(redis) = redis {
        let first_latest = redis.cli(&["HGET", "fengda:user:{a%3Ab:c}:latest", "conversation"]).await;
        assert_eq!(first_latest, first.conversation());
        let second_latest = redis.cli(&["HGET", "fengda:user:{a:b%3Ac}:latest", "conversation"]).await;
        assert_eq!(second_latest, second.conversation());
        let victim_log = format!("fengda:conv:{{x%3Ay:{conversation}}}:log");
        assert_eq!(redis.cli(&["LLEN", &victim_log]).await, "4");
        let intruder_log = format!("fengda:conv:{{x:{}}}:log", intruder.conversation());
        assert_eq!(redis.cli(&["LLEN", &intruder_log]).await, "2");
    }
}
