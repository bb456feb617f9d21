//! Keys from a tenant's JWKS (`jwks_url`), against a running hub in jwt
//! mode and a real HTTP server in the test that serves the key set, can
//! change it, hang or fail, and counts every request it gets: a key of the
//! set verifies; the cache is per (tenant, kid), so one tenant's set never
//! verifies another's tokens even under the same kid; a new kid verifies
//! after exactly one refetch; made-up kids refetch at most once per
//! `auth.jwks_min_refresh_secs`; a hanging set holds up no other tenant; a
//! set that cannot be fetched is `503 keys_unavailable`; and each JWK is
//! used only for the one algorithm the config (or the JWK) pins, for
//! signatures only, with unusable JWKs skipped rather than spoiling the set.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::sync::watch;

use fengda_tests::tokens::{KeyDir, Signer, claims, ed25519_jwk, toml_path};
use fengda_tests::{Client, Hub, STEP_TIMEOUT};

const JWKS_PATH: &str = "/.well-known/jwks.json";

/// What the JWKS server does with a request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Serve,
    /// Never answers (the hub's `jwks_timeout_ms` ends the wait).
    Hang,
    /// 500.
    Fail,
    /// 200 with a body that is not a JWKS.
    Garbage,
    /// 200 with a 300 KiB body sent in chunks, without a length.
    Huge,
}

struct Served {
    keys: Mutex<Vec<Value>>,
    mode: Mutex<Mode>,
    /// Requests received, of any path (sent before the answer).
    requests: watch::Sender<usize>,
    /// Paths of those requests.
    paths: Mutex<Vec<String>>,
}

/// An identity provider's JWKS endpoint on 127.0.0.1, stopped on drop.
struct JwksServer {
    url: String,
    served: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let served = Arc::new(Served {
            keys: Mutex::new(keys),
            mode: Mutex::new(Mode::Serve),
            requests: watch::Sender::new(0),
            paths: Mutex::default(),
        });
        let app = axum::Router::new().fallback(answer).with_state(served.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the JWKS server");
        let url = format!("http://{}{JWKS_PATH}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.expect("JWKS server") });
        JwksServer { url, served, task }
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.served.keys.lock().unwrap() = keys;
    }

    fn set_mode(&self, mode: Mode) {
        *self.served.mode.lock().unwrap() = mode;
    }

    fn requests(&self) -> usize {
        *self.served.requests.borrow()
    }

    /// Waits until the server has received `n` requests.
    async fn wait_requests(&self, n: usize) {
        let mut requests = self.served.requests.subscribe();
        tokio::time::timeout(STEP_TIMEOUT, requests.wait_for(|seen| *seen >= n))
            .await
            .unwrap_or_else(|_| panic!("the JWKS server did not get {n} requests"))
            .expect("server state");
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(served): State<Arc<Served>>, uri: Uri) -> Response {
    served.paths.lock().unwrap().push(uri.to_string());
    served.requests.send_modify(|n| *n += 1);
    if uri.path() != JWKS_PATH {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mode = *served.mode.lock().unwrap();
    match mode {
        Mode::Serve => axum::Json(json!({ "keys": *served.keys.lock().unwrap() })).into_response(),
        Mode::Hang => std::future::pending().await,
        Mode::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "down for maintenance").into_response(),
        Mode::Garbage => "<html>Sign in</html>".into_response(),
        Mode::Huge => {
            let chunks = (0..300).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024]));
            axum::body::Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
    }
}

/// A refused upgrade: status, JSON body, `Retry-After`.
#[derive(Debug)]
struct Refused {
    status: u16,
    code: String,
    retry_after: Option<String>,
}

async fn upgrade(url: &str) -> Result<Client, Refused> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => {
            let mut client = Client::on(ws);
            client.ready = client.expect("ready").await;
            Ok(client)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON body");
            Err(Refused {
                status: response.status().as_u16(),
                code: body["code"].as_str().expect("a code").to_owned(),
                retry_after: response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()),
            })
        }
        Err(error) => panic!("{url}: {error}"),
    }
}

/// Connects with `token`; the socket must be `user` of `tenant`'s (a query
/// naming another tenant or user than the token's is refused).
async fn accepted(hub: &Hub, token: &str, tenant: &str, user: &str) -> Client {
    let mut client = upgrade(&hub.ws_url(&format!("token={token}&tenant={tenant}&user={user}")))
        .await
        .unwrap_or_else(|refused| panic!("{tenant}/{user} refused: {refused:?}"));
    client.assert_alive().await;
    client
}

/// Connects with `token`, which must be refused with `status` and `code`.
async fn refused(hub: &Hub, token: &str, status: u16, code: &str) -> Refused {
    match upgrade(&hub.ws_url(&format!("token={token}"))).await {
        Ok(client) => panic!("expected {status} {code}, upgraded: {}", client.ready),
        Err(refused) => {
            assert_eq!((refused.status, refused.code.as_str()), (status, code), "{refused:?}");
            refused
        }
    }
}

/// `[auth]` in jwt mode with these settings and `[[auth.keys]]` entries, written to the dir.
fn config(dir: &KeyDir, settings: &str, entries: &[String]) -> String {
    let text = format!("[auth]\nmode = \"jwt\"\n{settings}\n{}", entries.join("\n"));
    dir.write("fengda.toml", text.as_bytes()).display().to_string()
}

fn jwks_entry(tenant: &str, url: &str, alg: Option<&str>) -> String {
    let alg = alg.map(|alg| format!("alg = \"{alg}\"\n")).unwrap_or_default();
    format!("[[auth.keys]]\ntenant = \"{tenant}\"\njwks_url = \"{url}\"\n{alg}")
}

fn file_entry(tenant: &str, alg: &str, signer: &Signer) -> String {
    format!("[[auth.keys]]\ntenant = \"{tenant}\"\nalg = \"{alg}\"\npublic_key_file = {}\n", toml_path(&signer.path))
}

/// An EdDSA token of `user` at `tenant`, naming `kid`.
fn ed_token(signer: &Signer, kid: &str, tenant: &str, user: &str) -> String {
    signer.sign(Algorithm::EdDSA, Some(kid), &claims(tenant, user))
}

/// A JWK of an ES256 key pair (P-256), with `kid` and the JWK's own `alg` (`None` drops it).
fn ec_jwk(signer: &Signer, kid: &str, alg: Option<&str>) -> Value {
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&signer.key, Algorithm::ES256).expect("a JWK");
    let mut jwk = serde_json::to_value(jwk).unwrap();
    jwk["kid"] = json!(kid);
    match alg {
        Some(alg) => jwk["alg"] = json!(alg),
        None => drop(jwk.as_object_mut().unwrap().remove("alg")),
    }
    jwk
}

/// `jwk` with `changes` merged in (a `null` removes the member).
fn jwk_with(mut jwk: Value, changes: Value) -> Value {
    for (key, value) in changes.as_object().unwrap() {
        match value {
            Value::Null => drop(jwk.as_object_mut().unwrap().remove(key)),
            value => jwk[key] = value.clone(),
        }
    }
    jwk
}

#[tokio::test]
async fn a_key_of_the_set_verifies_and_the_set_is_fetched_once_for_it() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "shop-1")]).await;
    let path = config(&dir, "jwks_min_refresh_secs = 3600", &[jwks_entry("shop", &server.url, None)]);
    let hub = Hub::start(&["--config", &path]).await;
    assert_eq!(server.requests(), 0, "a JWKS is fetched on first use, not at start");

    let mut alice = accepted(&hub, &ed_token(&shop, "shop-1", "shop", "alice"), "shop", "alice").await;
    let (ack, reply) = alice.ask("m1", "hello").await;
    assert_eq!(ack["seq"], 1);
    assert!(!reply.text().is_empty());
    accepted(&hub, &ed_token(&shop, "shop-1", "shop", "bob"), "shop", "bob").await;
    assert_eq!(server.requests(), 1, "cached after the first fetch");
    assert_eq!(*server.served.paths.lock().unwrap(), vec![JWKS_PATH.to_owned()]);

    // A token of the set's kid with another signature, or without a kid: refused.
    let other = dir.key_pair("other", "ed25519");
    refused(&hub, &ed_token(&other, "shop-1", "shop", "alice"), 401, "token_invalid").await;
    let no_kid = shop.sign(Algorithm::EdDSA, None, &claims("shop", "alice"));
    refused(&hub, &no_kid, 401, "token_invalid").await;
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn the_cache_is_per_tenant_and_kid_so_one_tenants_set_never_verifies_anothers_tokens() {
    let dir = KeyDir::new();
    let acme = dir.key_pair("acme", "ed25519");
    let bank = dir.key_pair("bank", "ed25519");
    // Both identity providers publish kid `k1` (and bank a kid of its own).
    let acme_idp = JwksServer::start(vec![ed25519_jwk(&acme.public, "k1")]).await;
    let bank_idp =
        JwksServer::start(vec![ed25519_jwk(&bank.public, "k1"), ed25519_jwk(&bank.public, "bank-only")]).await;
    let path = config(
        &dir,
        "jwks_min_refresh_secs = 3600",
        &[jwks_entry("acme", &acme_idp.url, Some("EdDSA")), jwks_entry("bank", &bank_idp.url, None)],
    );
    let hub = Hub::start(&["--config", &path]).await;

    // Each tenant's own token verifies, so both sets are cached under `k1`.
    let acme_alice = accepted(&hub, &ed_token(&acme, "k1", "acme", "alice"), "acme", "alice").await;
    let bank_alice = accepted(&hub, &ed_token(&bank, "k1", "bank", "alice"), "bank", "alice").await;
    assert_ne!(acme_alice.conversation(), bank_alice.conversation());
    assert_eq!((acme_idp.requests(), bank_idp.requests()), (1, 1));

    // A token claiming one tenant, signed with the other's `k1`: refused both ways.
    refused(&hub, &ed_token(&bank, "k1", "acme", "alice"), 401, "token_invalid").await;
    refused(&hub, &ed_token(&acme, "k1", "bank", "alice"), 401, "token_invalid").await;
    // A kid only bank's set has names no key of acme's, signed by either key.
    refused(&hub, &ed_token(&bank, "bank-only", "acme", "alice"), 401, "unknown_kid").await;
    refused(&hub, &ed_token(&acme, "bank-only", "acme", "alice"), 401, "unknown_kid").await;
    accepted(&hub, &ed_token(&bank, "bank-only", "bank", "bob"), "bank", "bob").await;
    // Only the token's own tenant's set was consulted (acme's once, within its interval).
    assert_eq!((acme_idp.requests(), bank_idp.requests()), (1, 1));
}

#[tokio::test]
async fn a_new_kid_in_the_set_verifies_after_one_refetch_and_a_removed_one_stops() {
    let dir = KeyDir::new();
    let old = dir.key_pair("old", "ed25519");
    let new = dir.key_pair("new", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&old.public, "2026-01")]).await;
    let path = config(&dir, "jwks_min_refresh_secs = 1", &[jwks_entry("shop", &server.url, Some("EdDSA"))]);
    let hub = Hub::start(&["--config", &path]).await;
    accepted(&hub, &ed_token(&old, "2026-01", "shop", "alice"), "shop", "alice").await;
    assert_eq!(server.requests(), 1);

    // The identity provider rotates: both keys published, tokens with the new kid.
    server.set_keys(vec![ed25519_jwk(&old.public, "2026-01"), ed25519_jwk(&new.public, "2026-02")]);
    let rotated = ed_token(&new, "2026-02", "shop", "alice");
    // Within a second of the last fetch the kid is unknown and nothing is
    // fetched; after it, one fetch and it verifies.
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut client = loop {
        match upgrade(&hub.ws_url(&format!("token={rotated}"))).await {
            Ok(client) => break client,
            Err(refusal) => {
                assert_eq!((refusal.status, refusal.code.as_str()), (401, "unknown_kid"), "{refusal:?}");
                assert_eq!(server.requests(), 1, "no refetch within jwks_min_refresh_secs");
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the new kid never verified");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    client.assert_alive().await;
    assert_eq!(server.requests(), 2, "exactly one refetch");
    // During the rotation both kids verify, from the cache.
    accepted(&hub, &ed_token(&old, "2026-01", "shop", "bob"), "shop", "bob").await;
    accepted(&hub, &ed_token(&new, "2026-02", "shop", "bob"), "shop", "bob").await;
    assert_eq!(server.requests(), 2);

    // The old key leaves the set: once a kid the cache lacks has made the
    // hub fetch again, the old kid no longer verifies.
    server.set_keys(vec![ed25519_jwk(&new.public, "2026-02")]);
    let made_up = ed_token(&new, "2026-03", "shop", "alice");
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while server.requests() < 3 {
        refused(&hub, &made_up, 401, "unknown_kid").await;
        assert!(tokio::time::Instant::now() < deadline, "the made-up kid never caused a fetch");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    refused(&hub, &ed_token(&old, "2026-01", "shop", "carol"), 401, "unknown_kid").await;
    accepted(&hub, &ed_token(&new, "2026-02", "shop", "carol"), "shop", "carol").await;
}

#[tokio::test]
async fn made_up_kids_fetch_the_set_at_most_once_per_interval() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "k1")]).await;
    let path = config(&dir, "jwks_min_refresh_secs = 3600", &[jwks_entry("shop", &server.url, Some("EdDSA"))]);
    let hub = Hub::start(&["--config", &path]).await;

    // 40 made-up kids at once on a cold cache: one fetch between them.
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let url = hub.ws_url(&format!("token={}", ed_token(&shop, &format!("made-up-{i}"), "shop", "alice")));
            tokio::spawn(async move { upgrade(&url).await.err().expect("refused") })
        })
        .collect();
    for refusal in futures::future::join_all(burst).await {
        let refusal = refusal.unwrap();
        assert_eq!((refusal.status, refusal.code.as_str()), (401, "unknown_kid"), "{refusal:?}");
    }
    assert_eq!(server.requests(), 1);

    // 200 more, some of them path and SQL text: no fetch, and never another path.
    for i in 0..200 {
        let kid = match i % 4 {
            0 => "../../etc/passwd".to_owned(),
            1 => "' OR 1=1 --".to_owned(),
            2 => "https://evil.example/jwks.json".to_owned(),
            _ => format!("made-up-{i}"),
        };
        refused(&hub, &ed_token(&shop, &kid, "shop", "alice"), 401, "unknown_kid").await;
    }
    assert_eq!(server.requests(), 1);
    assert_eq!(*server.served.paths.lock().unwrap(), vec![JWKS_PATH.to_owned()]);

    // The one fetch cached the real key; a kid added since waits for the interval.
    accepted(&hub, &ed_token(&shop, "k1", "shop", "alice"), "shop", "alice").await;
    server.set_keys(vec![ed25519_jwk(&shop.public, "k1"), ed25519_jwk(&shop.public, "k2")]);
    refused(&hub, &ed_token(&shop, "k2", "shop", "alice"), 401, "unknown_kid").await;
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn a_hanging_set_holds_up_only_its_own_tenants_unknown_kids() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let bank = dir.key_pair("bank", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "k1")]).await;
    let path = config(
        &dir,
        "jwks_min_refresh_secs = 0\njwks_timeout_ms = 3000",
        &[jwks_entry("shop", &server.url, Some("EdDSA")), file_entry("bank", "EdDSA", &bank)],
    );
    let hub = Hub::start(&["--config", &path]).await;
    accepted(&hub, &ed_token(&shop, "k1", "shop", "alice"), "shop", "alice").await;

    server.set_mode(Mode::Hang);
    let url = hub.ws_url(&format!("token={}", ed_token(&shop, "k2", "shop", "alice")));
    let waiting = tokio::spawn(async move { upgrade(&url).await.err().expect("refused") });
    server.wait_requests(2).await;
    // While shop's fetch hangs: another tenant, and shop's cached kid, upgrade at once.
    let started = tokio::time::Instant::now();
    let bank_token = bank.sign(Algorithm::EdDSA, None, &claims("bank", "alice"));
    accepted(&hub, &bank_token, "bank", "alice").await;
    accepted(&hub, &ed_token(&shop, "k1", "shop", "bob"), "shop", "bob").await;
    assert!(!waiting.is_finished(), "the fetch was to hang for jwks_timeout_ms (3 s)");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());

    // The hanging fetch ends at its deadline: 503, retry later.
    let refusal = tokio::time::timeout(STEP_TIMEOUT, waiting).await.expect("the fetch has a deadline").unwrap();
    assert_eq!((refusal.status, refusal.code.as_str()), (503, "keys_unavailable"), "{refusal:?}");
    assert_eq!(refusal.retry_after.as_deref(), Some("5"));
}

#[tokio::test]
async fn a_set_that_cannot_be_fetched_is_keys_unavailable_and_cached_keys_keep_working() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    // Nothing listens on `down`'s port.
    let down_url = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}{JWKS_PATH}", listener.local_addr().unwrap())
    };
    let flaky = JwksServer::start(vec![ed25519_jwk(&shop.public, "k1")]).await;
    let garbage = JwksServer::start(vec![]).await;
    garbage.set_mode(Mode::Garbage);
    let path = config(
        &dir,
        "jwks_min_refresh_secs = 3600",
        &[
            jwks_entry("down", &down_url, Some("EdDSA")),
            jwks_entry("flaky", &flaky.url, Some("EdDSA")),
            jwks_entry("garbage", &garbage.url, Some("EdDSA")),
        ],
    );
    let hub = Hub::start(&["--config", &path]).await;

    // Unreachable, or not a JWKS: 503 with Retry-After, and again on the
    // next attempt (not fetched again within the interval, still unavailable).
    for tenant in ["down", "garbage"] {
        for _ in 0..3 {
            let refusal = refused(&hub, &ed_token(&shop, "k1", tenant, "alice"), 503, "keys_unavailable").await;
            assert_eq!(refusal.retry_after.as_deref(), Some("5"));
        }
    }
    assert_eq!(garbage.requests(), 1);

    // A set fetched once keeps verifying its keys while its server fails.
    accepted(&hub, &ed_token(&shop, "k1", "flaky", "alice"), "flaky", "alice").await;
    flaky.set_mode(Mode::Fail);
    accepted(&hub, &ed_token(&shop, "k1", "flaky", "bob"), "flaky", "bob").await;
    assert_eq!(flaky.requests(), 1);
}

#[tokio::test]
async fn each_jwk_verifies_only_its_pinned_algorithm_and_only_signatures() {
    let dir = KeyDir::new();
    let ed = dir.key_pair("ed", "ed25519");
    let ec = dir.key_pair("ec", "ec");
    let ed_jwk = |kid: &str| ed25519_jwk(&ed.public, kid);
    let set = vec![
        ed_jwk("ed"),
        jwk_with(ed_jwk("ed-no-alg"), json!({ "alg": null })),
        jwk_with(ed_jwk("ed-no-use"), json!({ "use": null })),
        jwk_with(ed_jwk("ed-verify"), json!({ "use": null, "key_ops": ["verify"] })),
        // Published for encryption, or for other operations: never for signatures.
        jwk_with(ed_jwk("ed-enc"), json!({ "use": "enc" })),
        jwk_with(ed_jwk("ed-encrypt-ops"), json!({ "use": null, "key_ops": ["encrypt"] })),
        // An Ed25519 key whose JWK says ES256; an EC key, with and without its alg.
        jwk_with(ed_jwk("ed-says-es256"), json!({ "alg": "ES256" })),
        ec_jwk(&ec, "ec", Some("ES256")),
        ec_jwk(&ec, "ec-no-alg", None),
        // A symmetric key: a published secret is no secret.
        json!({ "kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA", "kid": "hs", "alg": "HS256" }),
        // Keys this hub cannot use at all (a key-agreement curve, an unknown
        // type, a curve it does not know): skipped, not spoiling the set.
        json!({ "kty": "OKP", "crv": "X25519", "x": "3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08", "kid": "x25519", "use": "enc" }),
        json!({ "kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA", "kid": "pq" }),
        json!({ "kty": "EC", "crv": "secp256k1", "x": "AAAA", "y": "AAAA", "kid": "k1", "alg": "ES256K" }),
    ];
    let pinned = JwksServer::start(set.clone()).await;
    let free = JwksServer::start(set).await;
    let path = config(
        &dir,
        "jwks_min_refresh_secs = 3600",
        &[jwks_entry("pinned", &pinned.url, Some("EdDSA")), jwks_entry("free", &free.url, None)],
    );
    let hub = Hub::start(&["--config", &path]).await;
    let es = |kid: &str, tenant: &str| ec.sign(Algorithm::ES256, Some(kid), &claims(tenant, "alice"));
    let hs = |tenant: &str| {
        let key = jsonwebtoken::EncodingKey::from_secret(b"secret-secret-secret-secret-secret").unwrap();
        let header = jsonwebtoken::Header { kid: Some("hs".into()), ..jsonwebtoken::Header::new(Algorithm::HS256) };
        jsonwebtoken::encode(&header, &claims(tenant, "alice"), &key).unwrap()
    };

    // `alg = "EdDSA"` pins every key of the set: its Ed25519 keys verify
    // (with or without their own alg, `use` or `key_ops: verify`) ...
    for kid in ["ed", "ed-no-alg", "ed-no-use", "ed-verify"] {
        accepted(&hub, &ed_token(&ed, kid, "pinned", "alice"), "pinned", "alice").await;
    }
    // ... and nothing else does: keys of another alg or family, the symmetric
    // key, keys not for signatures, keys the hub cannot read.
    for kid in ["ed-enc", "ed-encrypt-ops", "ed-says-es256", "x25519", "pq", "k1"] {
        refused(&hub, &ed_token(&ed, kid, "pinned", "alice"), 401, "unknown_kid").await;
    }
    for kid in ["ec", "ec-no-alg"] {
        refused(&hub, &es(kid, "pinned"), 401, "unknown_kid").await;
    }
    refused(&hub, &hs("pinned"), 401, "unknown_kid").await;
    // An Ed25519 key's kid on an ES256 token: the key's one algorithm only.
    refused(&hub, &ec.sign(Algorithm::ES256, Some("ed"), &claims("pinned", "alice")), 401, "token_invalid").await;

    // Without a pin, each JWK's own alg: a JWK without one is skipped.
    accepted(&hub, &ed_token(&ed, "ed", "free", "alice"), "free", "alice").await;
    accepted(&hub, &es("ec", "free"), "free", "alice").await;
    for kid in ["ed-no-alg", "ed-enc", "ed-encrypt-ops", "ed-says-es256", "x25519", "pq", "k1"] {
        refused(&hub, &ed_token(&ed, kid, "free", "alice"), 401, "unknown_kid").await;
    }
    refused(&hub, &es("ec-no-alg", "free"), 401, "unknown_kid").await;
    refused(&hub, &es("ed-says-es256", "free"), 401, "unknown_kid").await;
    refused(&hub, &hs("free"), 401, "unknown_kid").await;
    refused(&hub, &ec.sign(Algorithm::ES256, Some("ed"), &claims("free", "alice")), 401, "token_invalid").await;
    assert_eq!((pinned.requests(), free.requests()), (1, 1));
}

/// Waits until the hub's log holds `line`.
async fn logged(hub: &Hub, line: &str) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !hub.logs().contains(line) {
        assert!(tokio::time::Instant::now() < deadline, "no {line:?} in the log");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_keeps_the_fetched_set_and_the_sockets_it_verified() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "shop-1")]).await;
    let path = config(&dir, "jwks_min_refresh_secs = 3600", &[jwks_entry("shop", &server.url, None)]);
    let hub = Hub::start(&["--config", &path]).await;
    let mut alice = accepted(&hub, &ed_token(&shop, "shop-1", "shop", "alice"), "shop", "alice").await;
    assert_eq!(server.requests(), 1);

    unsafe { libc::kill(hub.child.id().unwrap() as i32, libc::SIGHUP) };
    logged(&hub, "auth configuration reloaded").await;
    alice.assert_alive().await;
    accepted(&hub, &ed_token(&shop, "shop-1", "shop", "bob"), "shop", "bob").await;
    assert_eq!(server.requests(), 1, "the reload kept the cached set");
}

#[tokio::test]
async fn a_withdrawn_key_stops_verifying_past_the_max_age_and_a_provider_outage_keeps_the_last_keys() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "shop-1")]).await;
    let settings = "jwks_min_refresh_secs = 1\njwks_max_age_secs = 1";
    let path = config(&dir, settings, &[jwks_entry("shop", &server.url, None)]);
    let hub = Hub::start(&["--config", &path]).await;
    let token = ed_token(&shop, "shop-1", "shop", "alice");
    accepted(&hub, &token, "shop", "alice").await;

    // The provider withdraws the key: once the set is a second old, the
    // next upgrade fetches it again and the key no longer verifies.
    server.set_keys(Vec::new());
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match upgrade(&hub.ws_url(&format!("token={token}"))).await {
            Ok(_) => assert!(tokio::time::Instant::now() < deadline, "the withdrawn key kept verifying"),
            Err(refused) => {
                assert_eq!((refused.status, refused.code.as_str()), (401, "unknown_kid"), "{refused:?}");
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // It comes back (a new fetch is due a second later); then the provider
    // fails: the set it last published keeps verifying past its age.
    server.set_keys(vec![ed25519_jwk(&shop.public, "shop-1")]);
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while upgrade(&hub.ws_url(&format!("token={token}"))).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the key never verified again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.set_mode(Mode::Fail);
    let failed_from = server.requests();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while server.requests() == failed_from {
        assert!(tokio::time::Instant::now() < deadline, "the stale set was never fetched again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        accepted(&hub, &token, "shop", "alice").await;
    }
    accepted(&hub, &token, "shop", "alice").await;
}

#[tokio::test]
async fn a_set_larger_than_the_limit_is_refused_even_without_a_length() {
    let dir = KeyDir::new();
    let shop = dir.key_pair("shop", "ed25519");
    let server = JwksServer::start(vec![ed25519_jwk(&shop.public, "shop-1")]).await;
    server.set_mode(Mode::Huge);
    let path = config(&dir, "", &[jwks_entry("shop", &server.url, None)]);
    let hub = Hub::start(&["--config", &path]).await;
    refused(&hub, &ed_token(&shop, "shop-1", "shop", "alice"), 503, "keys_unavailable").await;
    // The log says why (its lines reach the test a moment after the answer).
    logged(&hub, "the JWKS is too large").await;
}
