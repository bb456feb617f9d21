//! Identity at the upgrade, against a running hub in jwt mode with real
//! keys: every way a token can be wrong is refused with 401 and its code
//! (403 for a foreign Origin) and never upgrades; a valid token of each
//! algorithm upgrades and gets `ready` for its own tenant and user. Also:
//! demo mode's `/demo/token`, and demo mode refusing a public address.

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use fengda_tests::tokens::{KeyDir, Signer, claims, now, tampered, unsigned, with};
use fengda_tests::{Client, Hub, STEP_TIMEOUT, binary};

/// Upgrades with extra headers; the refusal's status and JSON body otherwise.
async fn upgrade(url: &str, headers: &[(&'static str, &str)]) -> Result<Client, (u16, Value)> {
    let mut request = url.into_client_request().expect("a request");
    for (name, value) in headers {
        request.headers_mut().append(*name, value.parse().expect("a header value"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => {
            let mut client = Client::on(ws);
            client.ready = client.next().await;
            Ok(client)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON body");
            Err((response.status().as_u16(), body))
        }
        Err(error) => panic!("{url}: {error}"),
    }
}

/// The status and body of an upgrade that must be refused.
async fn refusal(url: &str) -> (u16, Value) {
    match upgrade(url, &[]).await {
        Ok(client) => panic!("{url}: upgraded ({})", client.ready),
        Err(refusal) => refusal,
    }
}

/// One matrix row: what, URL, extra headers, expected status and code.
type Row = (&'static str, String, Vec<(&'static str, String)>, u16, &'static str);

struct Tenants {
    dir: KeyDir,
    acme: Signer,
    bank: Signer,
    shop: Signer,
    telco: Signer,
}

/// Four tenants, one key each: acme HS256 (with `aud` and `iss`), bank
/// RS256 (kid `bank-2026`), shop ES256, telco EdDSA. Key files are named
/// relative to the config file.
fn tenants() -> Tenants {
    let dir = KeyDir::new();
    let acme = dir.hmac_secret("acme.secret");
    let bank = dir.key_pair("bank", "rsa");
    let shop = dir.key_pair("shop", "ec");
    let telco = dir.key_pair("telco", "ed25519");
    dir.write(
        "fengda.toml",
        br#"
[auth]
mode = "jwt"
[[auth.keys]]
tenant = "acme"
alg = "HS256"
secret_file = "acme.secret"
aud = "fengda"
iss = "https://idp.acme.example"
[[auth.keys]]
tenant = "bank"
kid = "bank-2026"
alg = "RS256"
public_key_file = "bank.pem"
[[auth.keys]]
tenant = "shop"
alg = "ES256"
public_key_file = "shop.pem"
[[auth.keys]]
tenant = "telco"
alg = "EdDSA"
public_key_file = "telco.pem"
"#,
    );
    Tenants { dir, acme, bank, shop, telco }
}

fn acme_claims(user: &str) -> Value {
    with(claims("acme", user), json!({ "aud": "fengda", "iss": "https://idp.acme.example" }))
}

#[tokio::test]
async fn every_wrong_token_is_refused_with_its_code_and_never_upgrades() {
    let t = tenants();
    let config = t.dir.file("fengda.toml");
    let hub = Hub::start(&["--config", config.to_str().unwrap()]).await;
    let bank =
        |changes: Value| t.bank.sign(Algorithm::RS256, Some("bank-2026"), &with(claims("bank", "alice"), changes));
    let valid_bank = bank(json!({}));
    let hs256_with_rsa_public_key =
        Signer { key: jsonwebtoken::EncodingKey::from_secret(&t.bank.public).unwrap(), ..t.dir.hmac_secret("x") }.sign(
            Algorithm::HS256,
            Some("bank-2026"),
            &claims("bank", "alice"),
        );
    let truncated = &valid_bank[..valid_bank.len() - 8];
    let rows: Vec<Row> = vec![
        ("no token", hub.ws_url("tenant=bank&user=alice"), vec![], 401, "token_missing"),
        ("empty token", hub.ws_url("token="), vec![], 401, "token_missing"),
        ("not a JWT", hub.ws_url("token=abc"), vec![], 401, "token_invalid"),
        (
            "alg none",
            hub.ws_url(&format!("token={}", unsigned("none", &claims("bank", "alice")))),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "alg None",
            hub.ws_url(&format!("token={}", unsigned("None", &claims("bank", "alice")))),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "alg nOnE",
            hub.ws_url(&format!("token={}", unsigned("nOnE", &claims("bank", "alice")))),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "HS256 signed with bank's RSA public key",
            hub.ws_url(&format!("token={hs256_with_rsa_public_key}")),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "bank's claims signed with telco's key",
            hub.ws_url(&format!(
                "token={}",
                t.telco.sign(Algorithm::EdDSA, Some("bank-2026"), &claims("bank", "alice"))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "tid bank on a token of acme's key",
            hub.ws_url(&format!(
                "token={}",
                t.acme.sign(Algorithm::HS256, None, &with(acme_claims("alice"), json!({ "tid": "bank" })))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "a tenant with no key",
            hub.ws_url(&format!(
                "token={}",
                t.acme.sign(Algorithm::HS256, None, &with(acme_claims("alice"), json!({ "tid": "nobody" })))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "wrong aud",
            hub.ws_url(&format!(
                "token={}",
                t.acme.sign(Algorithm::HS256, None, &with(acme_claims("a"), json!({ "aud": "other" })))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "no aud where the key names one",
            hub.ws_url(&format!(
                "token={}",
                t.acme.sign(Algorithm::HS256, None, &with(acme_claims("a"), json!({ "aud": null })))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "wrong iss",
            hub.ws_url(&format!(
                "token={}",
                t.acme.sign(Algorithm::HS256, None, &with(acme_claims("a"), json!({ "iss": "https://evil.example" })))
            )),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "expired beyond the leeway",
            hub.ws_url(&format!("token={}", bank(json!({ "exp": now() - 120 })))),
            vec![],
            401,
            "token_expired",
        ),
        (
            "nbf in the future",
            hub.ws_url(&format!("token={}", bank(json!({ "nbf": now() + 300 })))),
            vec![],
            401,
            "token_not_yet_valid",
        ),
        (
            "iat in the future",
            hub.ws_url(&format!("token={}", bank(json!({ "iat": now() + 300 })))),
            vec![],
            401,
            "token_not_yet_valid",
        ),
        ("no exp", hub.ws_url(&format!("token={}", bank(json!({ "exp": null })))), vec![], 401, "token_invalid"),
        (
            "role admin",
            hub.ws_url(&format!("token={}", bank(json!({ "role": "admin" })))),
            vec![],
            401,
            "token_invalid",
        ),
        ("no tid", hub.ws_url(&format!("token={}", bank(json!({ "tid": null })))), vec![], 401, "token_invalid"),
        (
            "unknown kid",
            hub.ws_url(&format!(
                "token={}",
                t.bank.sign(Algorithm::RS256, Some("bank-1999"), &claims("bank", "alice"))
            )),
            vec![],
            401,
            "unknown_kid",
        ),
        (
            "kid with a path",
            hub.ws_url(&format!(
                "token={}",
                t.bank.sign(Algorithm::RS256, Some("../../etc/passwd"), &claims("bank", "alice"))
            )),
            vec![],
            401,
            "unknown_kid",
        ),
        (
            "kid with SQL",
            hub.ws_url(&format!(
                "token={}",
                t.bank.sign(Algorithm::RS256, Some("' OR 1=1 --"), &claims("bank", "alice"))
            )),
            vec![],
            401,
            "unknown_kid",
        ),
        ("truncated signature", hub.ws_url(&format!("token={truncated}")), vec![], 401, "token_invalid"),
        (
            "tampered claims",
            hub.ws_url(&format!("token={}", tampered(&valid_bank, &claims("bank", "mallory")))),
            vec![],
            401,
            "token_invalid",
        ),
        (
            "two different tokens",
            hub.ws_url(&format!("token={valid_bank}")),
            vec![("authorization", format!("Bearer {}", bank(json!({ "sub": "mallory" }))))],
            401,
            "token_conflict",
        ),
        (
            "not a bearer token",
            hub.ws_url(""),
            vec![("authorization", format!("Basic {valid_bank}"))],
            401,
            "token_invalid",
        ),
        (
            "query tenant disagrees",
            hub.ws_url(&format!("token={valid_bank}&tenant=acme")),
            vec![],
            401,
            "identity_mismatch",
        ),
        (
            "query user disagrees",
            hub.ws_url(&format!("token={valid_bank}&user=mallory")),
            vec![],
            401,
            "identity_mismatch",
        ),
        (
            "foreign Origin",
            hub.ws_url(&format!("token={valid_bank}")),
            vec![("origin", "https://evil.example".into())],
            403,
            "origin_not_allowed",
        ),
    ];
    let mut unauthorized = 0;
    for (what, url, headers, status, code) in &rows {
        let headers: Vec<_> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        match upgrade(url, &headers).await {
            Ok(client) => panic!("{what}: upgraded ({})", client.ready),
            Err((got, body)) => {
                assert_eq!((got, body["code"].as_str()), (*status, Some(*code)), "{what}: {body}");
                assert_eq!(body["error"], body["code"], "{what}: {body}");
                assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
            }
        }
        unauthorized += usize::from(*status == 401);
    }
    // Every 401 was counted, by code.
    let metrics = hub.metrics().await;
    let counted: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("fengda_hub_auth_refusals_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted as usize, unauthorized, "{metrics}");
    // And nothing got as far as a session.
    assert_eq!(hub.metric("fengda_hub_sessions_open").await, 0.0);
}

#[tokio::test]
async fn a_valid_token_of_each_algorithm_opens_its_own_tenants_conversation() {
    let t = tenants();
    let config = t.dir.file("fengda.toml");
    let hub = Hub::start(&["--config", config.to_str().unwrap()]).await;
    let tokens = [
        ("acme", t.acme.sign(Algorithm::HS256, None, &acme_claims("alice"))),
        ("bank", t.bank.sign(Algorithm::RS256, Some("bank-2026"), &claims("bank", "alice"))),
        // One key and no kid in the token: that key. Expired, but within the 30 s leeway.
        ("bank", t.bank.sign(Algorithm::RS256, None, &with(claims("bank", "alice"), json!({ "exp": now() - 5 })))),
        ("shop", t.shop.sign(Algorithm::ES256, None, &claims("shop", "alice"))),
        ("telco", t.telco.sign(Algorithm::EdDSA, None, &claims("telco", "alice"))),
    ];
    let mut conversations = std::collections::BTreeMap::new();
    for (i, (tenant, token)) in tokens.iter().enumerate() {
        // Query token, Bearer header, and a query that repeats the token's own ids.
        let mut client = match i % 3 {
            0 => upgrade(&hub.ws_url(&format!("token={token}")), &[]).await,
            1 => upgrade(&hub.ws_url(""), &[("authorization", &format!("Bearer {token}"))]).await,
            _ => upgrade(&hub.ws_url(&format!("token={token}&tenant={tenant}&user=alice")), &[]).await,
        }
        .unwrap_or_else(|refused| panic!("{tenant}: {refused:?}"));
        assert_eq!(client.ready["type"], "ready", "{tenant}");
        if i == 2 {
            // Accepted within the leeway, so already past its expiry notice.
            client.expect("token.expiring").await;
        }
        let (ack, reply) = client.ask(&format!("m{i}"), "hello").await;
        assert_eq!(ack["type"], "ack");
        assert!(!reply.text().is_empty());
        conversations.entry(*tenant).or_insert_with(Vec::new).push(client.conversation());
    }
    // alice of bank resumed her own conversation (tenant and user from the token); 4 tenants, 4 conversations.
    assert_eq!(conversations["bank"][0], conversations["bank"][1]);
    let distinct: std::collections::BTreeSet<_> = conversations.values().flatten().collect();
    assert_eq!(distinct.len(), 4, "{conversations:?}");
    // bank's alice naming acme's alice's conversation: not found, no hint it exists.
    let bank_token = t.bank.sign(Algorithm::RS256, None, &claims("bank", "alice"));
    let url = hub.ws_url(&format!("token={bank_token}&conversation={}&after=0", conversations["acme"][0]));
    let mut intruder = Client::connect_unready(&url).await;
    assert_eq!(intruder.expect("error").await["code"], "conversation_not_found");
    assert_eq!(u16::from(intruder.expect_close().await.expect("a close frame").code), 4004);
}

#[tokio::test]
async fn demo_mode_mints_tokens_that_its_sockets_accept() {
    let hub = Hub::start(&[]).await;
    let http = reqwest::Client::new();
    let minted: Value =
        http.get(format!("{}/demo/token?tenant=telco&user=bob", hub.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (minted["tenant"].as_str(), minted["user"].as_str(), minted["role"].as_str()),
        (Some("telco"), Some("bob"), Some("customer"))
    );
    let exp = minted["exp"].as_i64().unwrap();
    assert!((now() + 850..=now() + 900).contains(&exp), "{minted}");
    let token = minted["token"].as_str().unwrap();
    let mut client = upgrade(&hub.ws_url(&format!("token={token}")), &[]).await.expect("a demo token upgrades");
    client.ask("m1", "How do I top up data?").await;
    // The token's ids win: a query naming others is refused.
    let refused = refusal(&hub.ws_url(&format!("token={token}&tenant=demo"))).await;
    assert_eq!((refused.0, refused.1["error"].as_str()), (401, Some("identity_mismatch")));
    // A token of another issuer is not a demo token.
    let other = KeyDir::new().hmac_secret("x").sign(Algorithm::HS256, Some("demo"), &claims("telco", "bob"));
    let refused = refusal(&hub.ws_url(&format!("token={other}"))).await;
    assert_eq!((refused.0, refused.1["error"].as_str()), (401, Some("token_invalid")));
    // Query ids without a token still work in demo mode.
    Client::connect(&hub.ws_url("tenant=demo&user=carol")).await;
    // Bad parameters are 400s with codes.
    for (query, code) in [
        ("tenant=&user=bob", "invalid_tenant"),
        ("tenant=demo&user=a%20b", "invalid_user"),
        ("tenant=demo&user=b&role=root", "invalid_role"),
    ] {
        let response = http.get(format!("{}/demo/token?{query}", hub.url)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(response.json::<Value>().await.unwrap()["error"], code, "{query}");
    }
}

/// The claims of a token, unverified (the test only reads what was minted).
fn payload(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).expect("base64url"))
        .expect("a JSON payload")
}

#[tokio::test]
async fn demo_tokens_carry_an_agents_display_name() {
    let hub = Hub::start(&[]).await;
    let http = reqwest::Client::new();
    let mint = |query: String| {
        let http = http.clone();
        let url = format!("{}/demo/token?{query}", hub.url);
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    // A name (URL-encoded, 64 characters of three bytes each is the longest) is in the body and the token.
    let longest = "安".repeat(64);
    for (query, name) in [
        ("tenant=demo&user=anna&role=agent&name=Anna%20from%20Support".to_owned(), "Anna from Support"),
        (format!("tenant=demo&user=anna&role=agent&name={longest}"), longest.as_str()),
    ] {
        let (status, minted) = mint(query.clone()).await;
        assert_eq!(status, 200, "{query}: {minted}");
        assert_eq!((minted["role"].as_str(), minted["name"].as_str()), (Some("agent"), Some(name)), "{query}");
        let claims = payload(minted["token"].as_str().unwrap());
        assert_eq!((claims["sub"].as_str(), claims["name"].as_str()), (Some("anna"), Some(name)), "{claims}");
        // The agent's socket goes by that name.
        let agent = Client::connect(&hub.ws_url(&format!("token={}", minted["token"].as_str().unwrap()))).await;
        assert_eq!(
            (agent.ready["role"].as_str(), agent.ready["agent"].as_str(), agent.ready["name"].as_str()),
            (Some("agent"), Some("anna"), Some(name)),
            "{}",
            agent.ready
        );
    }
    // Without `name`, neither the body nor the token has one.
    let (status, minted) = mint("tenant=demo&user=anna&role=agent".to_owned()).await;
    assert_eq!(status, 200);
    assert!(minted.get("name").is_none(), "{minted}");
    assert!(payload(minted["token"].as_str().unwrap()).get("name").is_none(), "{minted}");
    // Empty, blank, too long, a control character: 400 invalid_name, no token.
    for bad in ["", "%20%20", "%E3%80%80", &"a".repeat(65), &"安".repeat(65), "Anna%0A"] {
        let (status, body) = mint(format!("tenant=demo&user=anna&role=agent&name={bad}")).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid_name")), "name={bad}: {body}");
        assert!(body.get("token").is_none(), "{body}");
    }
}

#[tokio::test]
async fn jwt_mode_has_no_demo_tokens() {
    let t = tenants();
    let hub = Hub::start(&["--config", t.dir.file("fengda.toml").to_str().unwrap()]).await;
    let response = reqwest::get(format!("{}/demo/token?tenant=bank&user=alice", hub.url)).await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn demo_mode_refuses_a_public_address_unless_told_it_is_insecure() {
    let run = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(binary("fengda"));
        command
            .args(["serve", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let refused = tokio::time::timeout(STEP_TIMEOUT, run(&[]).output()).await.expect("exits").unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--insecure-demo"), "{stderr}");

    let mut insecure = run(&["--insecure-demo"]).spawn().unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut stderr = tokio::io::BufReader::new(insecure.stderr.take().unwrap()).lines();
    let warning = tokio::time::timeout(STEP_TIMEOUT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("INSECURE") {
                return line;
            }
        }
        panic!("no INSECURE warning");
    })
    .await
    .expect("the warning comes at start");
    assert!(warning.contains("WARN"), "{warning}");
    insecure.kill().await.unwrap();
}
