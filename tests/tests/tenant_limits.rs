//! Per-tenant limits against running hubs: a tenant's connection cap and
//! its users' message rate hold across two nodes (on Redis; on the memory
//! backend both "nodes" are the one hub), its longest message, its history
//! turns as the NLP service receives them, its NLP calls in flight and its
//! browser origins (in jwt mode, the verified token's tenant's); and a
//! tenant at its limits leaves another tenant's customers untouched. Also:
//! a dead node's sockets stop counting when their leases expire, and
//! SIGHUP reloads the limits.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use fengda_tests::tokens::{KeyDir, claims, toml_path};
use fengda_tests::{Client, Hub, RecordingAnswerer, RedisServer, STEP_TIMEOUT, Script, test_backend};
use jsonwebtoken::Algorithm;

/// Two nodes of one cluster: two hubs sharing a fresh Redis on the redis
/// backend, one hub standing for both on the memory backend.
struct Nodes {
    hubs: Vec<Hub>,
    _redis: Option<RedisServer>,
}

impl Nodes {
    async fn start(config: &std::path::Path, extra: &[&str]) -> Nodes {
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        match test_backend().as_str() {
            "redis" => {
                let redis = RedisServer::start().await;
                let hubs = vec![Hub::start_node(&redis, &args).await, Hub::start_node(&redis, &args).await];
                Nodes { hubs, _redis: Some(redis) }
            }
            _ => Nodes { hubs: vec![Hub::start(&args).await], _redis: None },
        }
    }

    /// Node `i` (0 or 1).
    fn node(&self, i: usize) -> &Hub {
        &self.hubs[i % self.hubs.len()]
    }
}

/// A config file with `toml` in a fresh directory (kept alive by the returned dir).
fn config(toml: &str) -> (KeyDir, std::path::PathBuf) {
    let dir = KeyDir::new();
    let path = dir.write("fengda.toml", toml.as_bytes());
    (dir, path)
}

/// Upgrades with extra headers; else the refusal's status, `Retry-After` and JSON body.
async fn upgrade(url: &str, headers: &[(&'static str, &str)]) -> Result<Client, (u16, Option<String>, Value)> {
    let mut request = url.into_client_request().expect("a request");
    for (name, value) in headers {
        request.headers_mut().append(*name, value.parse().expect("a header value"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => {
            let mut client = Client::on(ws);
            client.ready = client.expect("ready").await;
            Ok(client)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().expect("text").to_owned());
            let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON body");
            Err((response.status().as_u16(), retry_after, body))
        }
        Err(error) => panic!("{url}: {error}"),
    }
}

/// Reads frames until an `error` (others, such as a reply to an earlier question, are skipped).
async fn next_error(client: &mut Client) -> Value {
    loop {
        let frame = client.next().await;
        if frame["type"] == "error" {
            return frame;
        }
    }
}

#[tokio::test]
async fn a_tenants_connection_cap_holds_across_nodes_and_leaves_other_tenants_alone() {
    let (_dir, path) = config("[tenants.acme]\nmax_connections = 3\n");
    let nodes = Nodes::start(&path, &[]).await;
    let mut held = Vec::new();
    for (i, user) in ["a1", "a2", "a3"].iter().enumerate() {
        held.push(Client::connect(&nodes.node(i).ws_url(&format!("tenant=acme&user={user}"))).await);
    }
    // The fourth of acme's sockets is refused on either node, with when to retry.
    for i in 0..2 {
        let refused = upgrade(&nodes.node(i).ws_url("tenant=acme&user=a4"), &[]).await;
        let Err((status, retry_after, body)) = refused else { panic!("node {i}: a fourth acme socket upgraded") };
        assert_eq!(
            (status, retry_after.as_deref(), body["error"].as_str()),
            (429, Some("5"), Some("tenant_connections"))
        );
    }
    // Another tenant has no cap, and acme's full house does not touch it.
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(Client::connect(&nodes.node(i).ws_url(&format!("tenant=shop&user=s{i}"))).await);
    }
    others[0].ask("s-q", "Hello").await;
    // A socket that leaves frees its place (released at once, not at the lease's end).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut refusals = 3; // two above, one below
    loop {
        match upgrade(&nodes.node(1).ws_url("tenant=acme&user=a4"), &[]).await {
            Ok(client) => {
                held.push(client);
                break;
            }
            // The hub notices the close a moment after the client sent it.
            Err((429, ..)) if tokio::time::Instant::now() < deadline => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(refusal) => panic!("no place freed: {refusal:?}"),
        }
    }
    let refused = upgrade(&nodes.node(0).ws_url("tenant=acme&user=a5"), &[]).await;
    assert!(matches!(refused, Err((429, ..))), "the freed place was taken again");
    let limited: f64 = futures::future::join_all(nodes.hubs.iter().map(|hub| hub.metrics()))
        .await
        .iter()
        .map(|m| {
            fengda_tests::metric_value(m, "fengda_hub_tenant_limited_total{limit=\"connections\",tenant=\"acme\"}")
        })
        .sum();
    assert_eq!(limited, f64::from(refusals));
}

#[tokio::test]
async fn a_users_message_rate_holds_across_nodes_and_the_socket_stays_open() {
    let (_dir, path) = config("[tenants.acme]\nmax_messages_per_user = 2\nmessage_window_ms = 2000\n");
    let nodes = Nodes::start(&path, &[]).await;
    let mut on_a = Client::connect(&nodes.node(0).ws_url("tenant=acme&user=alice")).await;
    let mut on_b = Client::connect(&nodes.node(1).ws_url("tenant=acme&user=alice")).await;
    on_a.ask("m1", "Hello").await;
    on_b.ask("m2", "Hello again").await;
    // The third within the window, on either node, is refused with its id and when to retry.
    on_a.send_message("m3", "Third").await;
    let refused = next_error(&mut on_a).await;
    assert_eq!((refused["code"].as_str(), refused["id"].as_str()), (Some("rate_limited"), Some("m3")), "{refused}");
    let retry_after_ms = refused["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=2000).contains(&retry_after_ms), "{refused}");
    on_b.send_message("m3b", "Third, elsewhere").await;
    assert_eq!(next_error(&mut on_b).await["code"], "rate_limited");
    on_a.assert_alive().await;
    // Another user of the tenant, and a user of another tenant, are not limited by alice.
    let mut bob = Client::connect(&nodes.node(1).ws_url("tenant=acme&user=bob")).await;
    bob.ask("b1", "Hello").await;
    let mut other = Client::connect(&nodes.node(0).ws_url("tenant=shop&user=alice")).await;
    for i in 0..5 {
        other.ask(&format!("o{i}"), "Hello").await;
    }
    // Once the time it gave has passed, the message goes through (nothing of it was stored before).
    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
    let (ack, _) = on_a.ask("m3", "Third").await;
    assert_eq!(ack["id"], "m3");
    let limited: f64 = futures::future::join_all(nodes.hubs.iter().map(|hub| hub.metrics()))
        .await
        .iter()
        .map(|m| fengda_tests::metric_value(m, "fengda_hub_tenant_limited_total{limit=\"messages\",tenant=\"acme\"}"))
        .sum();
    assert_eq!(limited, 2.0);
}

#[tokio::test]
async fn a_tenants_longest_message_is_its_own() {
    let (_dir, path) = config("[tenants.acme]\nmax_text_bytes = 10\n");
    let hub = Hub::start(&["--config", path.to_str().unwrap()]).await;
    let mut acme = Client::connect(&hub.ws_url("tenant=acme&user=long")).await;
    acme.send_message("m1", "eleven byte").await;
    let refused = next_error(&mut acme).await;
    assert_eq!((refused["code"].as_str(), refused["id"].as_str()), (Some("text_too_long"), Some("m1")));
    acme.ask("m2", "ten bytes!").await;
    let mut shop = Client::connect(&hub.ws_url("tenant=shop&user=long")).await;
    shop.ask("m1", "eleven byte").await;
}

#[tokio::test]
async fn the_nlp_service_gets_each_tenants_history_turns() {
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let (_dir, path) = config("[conversation]\nhistory_turns = 10\n[tenants.acme]\nhistory_turns = 1\n");
    let hub = Hub::start(&["--config", path.to_str().unwrap(), "--nlp-url", &answerer.url]).await;
    for tenant in ["acme", "shop"] {
        let mut client = Client::connect(&hub.ws_url(&format!("tenant={tenant}&user=turns"))).await;
        for i in 0..3 {
            client.ask(&format!("m{i}"), &format!("question {i}")).await;
        }
    }
    let history = |tenant: &str| -> Vec<usize> {
        answerer.requests().iter().filter(|r| r.tenant_id == tenant).map(|r| r.history.len()).collect()
    };
    assert_eq!(history("acme"), [0, 1, 1]);
    assert_eq!(history("shop"), [0, 2, 4]);
}

#[tokio::test]
async fn a_tenants_nlp_calls_in_flight_are_capped_and_others_do_not_wait() {
    let slow = Script { first_chunk_delay: Duration::from_millis(300), ..Script::default() };
    let answerer = RecordingAnswerer::start(slow).await;
    let (_dir, path) = config("[tenants.acme]\nnlp_max_concurrent = 1\n");
    let hub = Hub::start(&["--config", path.to_str().unwrap(), "--nlp-url", &answerer.url]).await;
    let mut acme1 = Client::connect(&hub.ws_url("tenant=acme&user=n1")).await;
    let mut acme2 = Client::connect(&hub.ws_url("tenant=acme&user=n2")).await;
    let mut shop = Client::connect(&hub.ws_url("tenant=shop&user=n1")).await;
    acme1.send_message("q", "first").await;
    acme1.expect("ack").await;
    // The ack comes with the append, before the call starts: the second
    // question must not reach the tenant's one slot first.
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while answerer.requests().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the first question never reached the NLP service");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acme2.send_message("q", "second").await;
    shop.send_message("q", "third").await;
    let (acme2_ack, shop_ack) = (acme2.expect("ack").await, shop.expect("ack").await);
    assert_eq!((acme2_ack["id"].as_str(), shop_ack["id"].as_str()), (Some("q"), Some("q")));
    let (first, second, other) = (acme1.read_reply().await, acme2.read_reply().await, shop.read_reply().await);
    assert!(first.queued.is_empty(), "{:?}", first.queued);
    assert_eq!(second.queued.first().map(|q| q["position"].as_u64()), Some(Some(1)), "acme's second call waits");
    assert!(other.queued.is_empty(), "another tenant's call does not wait: {:?}", other.queued);
}

#[tokio::test]
async fn each_tenant_is_opened_only_from_its_own_origins() {
    let (_dir, path) = config(
        "[websocket]\nallowed_origins = [\"https://shop.example\"]\n\
         [tenants.acme]\nallowed_origins = [\"https://acme.example\"]\n",
    );
    let hub = Hub::start(&["--config", path.to_str().unwrap()]).await;
    let open = |tenant: &str, origin: &'static str| {
        let url = hub.ws_url(&format!("tenant={tenant}&user=o"));
        async move {
            upgrade(&url, &[("origin", origin)])
                .await
                .map(|_| ())
                .map_err(|(status, _, body)| (status, body["error"].clone()))
        }
    };
    let refused = Err((403, json!("origin_not_allowed")));
    assert_eq!(open("acme", "https://acme.example").await, Ok(()));
    assert_eq!(open("shop", "https://shop.example").await, Ok(()));
    // Each tenant's origin opens only that tenant's sockets.
    assert_eq!(open("acme", "https://shop.example").await, refused);
    assert_eq!(open("shop", "https://acme.example").await, refused);
    // An origin no tenant allows is refused before anything else is looked at.
    assert_eq!(open("acme", "https://evil.example").await, refused);
}

#[tokio::test]
async fn sighup_reloads_the_tenant_limits() {
    let (dir, path) = config("[tenants.acme]\nmax_connections = 1\n");
    let hub = Hub::start(&["--config", path.to_str().unwrap()]).await;
    let url = |user: &str| hub.ws_url(&format!("tenant=acme&user={user}"));
    let _first = Client::connect(&url("r1")).await;
    assert!(matches!(upgrade(&url("r2"), &[]).await, Err((429, ..))));
    dir.write("fengda.toml", b"[tenants.acme]\nmax_connections = 2\nmax_text_bytes = 10\n");
    unsafe { libc::kill(hub.child.id().unwrap() as i32, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !hub.logs().contains("configuration reloaded") {
        assert!(tokio::time::Instant::now() < deadline, "no reload: {}", hub.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut second = upgrade(&url("r2"), &[]).await.expect("a second place after the reload");
    assert!(matches!(upgrade(&url("r3"), &[]).await, Err((429, ..))));
    second.send_message("m1", "eleven byte").await;
    assert_eq!(next_error(&mut second).await["code"], "text_too_long");
}

#[tokio::test]
async fn a_dead_nodes_sockets_stop_counting_when_their_leases_expire() {
    // Cluster mode whatever the suite's backend: it is about a node dying.
    let (_dir, path) = config("[redis]\nconnection_lease_ms = 1500\n[tenants.acme]\nmax_connections = 2\n");
    let redis = RedisServer::start().await;
    let args = ["--config", path.to_str().unwrap()];
    let mut nodes =
        Nodes { hubs: vec![Hub::start_node(&redis, &args).await, Hub::start_node(&redis, &args).await], _redis: None };
    let mut held = Vec::new();
    for user in ["d1", "d2"] {
        held.push(Client::connect(&nodes.node(0).ws_url(&format!("tenant=acme&user={user}"))).await);
    }
    let on_b = nodes.node(1).ws_url("tenant=acme&user=d3");
    assert!(matches!(upgrade(&on_b, &[]).await, Err((429, ..))));
    // Node A dies without a word: its sockets are never released, only no longer renewed.
    nodes.hubs[0].child.kill().await.expect("kill node A");
    let died = tokio::time::Instant::now();
    let mut refusals = 0;
    let client = loop {
        match upgrade(&on_b, &[]).await {
            Ok(client) => break client,
            Err((429, ..)) => refusals += 1,
            Err(other) => panic!("{other:?}"),
        }
        assert!(died.elapsed() < Duration::from_secs(5), "node A's places never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refusals > 0, "the places were still counted right after the node died");
    // A lease was renewed at most a third of it before the death, so it expires within 1.5 s of it.
    assert!(died.elapsed() < Duration::from_millis(2500), "{:?}", died.elapsed());
    drop(client);
}

#[tokio::test]
async fn in_jwt_mode_the_origin_is_checked_against_the_verified_tokens_tenant() {
    let dir = KeyDir::new();
    let (acme, shop) = (dir.hmac_secret("acme.secret"), dir.hmac_secret("shop.secret"));
    let text = format!(
        "[auth]\nmode = \"jwt\"\n\
         [[auth.keys]]\ntenant = \"acme\"\nalg = \"HS256\"\nsecret_file = {}\n\
         [[auth.keys]]\ntenant = \"shop\"\nalg = \"HS256\"\nsecret_file = {}\n\
         [websocket]\nallowed_origins = [\"https://shop.example\"]\n\
         [tenants.acme]\nallowed_origins = [\"https://acme.example\"]\n",
        toml_path(&acme.path),
        toml_path(&shop.path)
    );
    let path = dir.write("fengda.toml", text.as_bytes());
    let hub = Hub::start(&["--config", path.to_str().unwrap()]).await;
    let of_acme = acme.sign(Algorithm::HS256, None, &claims("acme", "alice"));
    let of_shop = shop.sign(Algorithm::HS256, None, &claims("shop", "sam"));
    let open = |token: &str, origin: &'static str| {
        let url = hub.ws_url(&format!("token={token}"));
        async move {
            upgrade(&url, &[("origin", origin)])
                .await
                .map(|_| ())
                .map_err(|(status, _, body)| (status, body["error"].clone()))
        }
    };
    assert_eq!(open(&of_acme, "https://acme.example").await, Ok(()));
    assert_eq!(open(&of_shop, "https://shop.example").await, Ok(()));
    // The tenant is the token's: another tenant's page may not open its sockets.
    assert_eq!(open(&of_shop, "https://acme.example").await, Err((403, json!("origin_not_allowed"))));
    assert_eq!(open(&of_acme, "https://shop.example").await, Err((403, json!("origin_not_allowed"))));
    // A page no tenant allows is refused before its token is looked at.
    assert_eq!(open("not-a-token", "https://evil.example").await, Err((403, json!("origin_not_allowed"))));
    assert_eq!(open("not-a-token", "https://acme.example").await, Err((401, json!("token_invalid"))));
}
