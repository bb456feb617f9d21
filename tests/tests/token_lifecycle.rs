//! A socket's token over its life: `token.expiring`, `refresh` in place,
//! expiry with a grace period that does not cut a reply short, close 4001;
//! and the keys reloaded on SIGHUP (a tenant added, a key rotated with old
//! and new kid valid together, a key removed closing its sockets with 4001,
//! a broken config kept out), and `fengda check-config`.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::json;

use fengda_tests::tokens::{KeyDir, claims, now, toml_path, with};
use fengda_tests::{Client, Hub, RecordingAnswerer, STEP_TIMEOUT, Script, binary};

fn jwt_config(
    dir: &KeyDir,
    settings: &str,
    keys: &[(&str, Option<&str>, &str, &std::path::Path)],
) -> std::path::PathBuf {
    let mut text = format!("[auth]\nmode = \"jwt\"\n{settings}\n");
    for (tenant, kid, alg, path) in keys {
        let file = if alg.starts_with("HS") { "secret_file" } else { "public_key_file" };
        text.push_str(&format!(
            "[[auth.keys]]\ntenant = \"{tenant}\"\nalg = \"{alg}\"\n{file} = {}\n",
            toml_path(path)
        ));
        if let Some(kid) = kid {
            text.push_str(&format!("kid = \"{kid}\"\n"));
        }
    }
    dir.write("fengda.toml", text.as_bytes())
}

#[tokio::test]
async fn a_refresh_in_place_moves_the_expiry_and_only_for_the_same_party() {
    let dir = KeyDir::new();
    let acme = dir.hmac_secret("acme.secret");
    let config = jwt_config(
        &dir,
        "leeway_secs = 0\nexpiring_notice_secs = 2\nexpiry_grace_secs = 1",
        &[("acme", None, "HS256", &acme.path)],
    );
    let hub = Hub::start(&["--config", config.to_str().unwrap()]).await;
    let started = tokio::time::Instant::now();
    let exp = now() + 3;
    let token = acme.sign(Algorithm::HS256, None, &with(claims("acme", "alice"), json!({ "exp": exp })));
    let mut client = Client::connect(&hub.ws_url(&format!("token={token}"))).await;
    assert_eq!(client.expect("token.expiring").await["exp"], exp);

    // Another user, role or tenant (even a valid token) is refused; so is garbage.
    let bob = acme.sign(Algorithm::HS256, None, &claims("acme", "bob"));
    let agent = acme.sign(Algorithm::HS256, None, &with(claims("acme", "alice"), json!({ "role": "agent" })));
    for (token, code) in
        [(bob.as_str(), "identity_mismatch"), (agent.as_str(), "identity_mismatch"), ("x.y.z", "token_invalid")]
    {
        client.send_json(json!({ "type": "refresh", "token": token })).await;
        assert_eq!(client.expect("error").await["code"], code);
    }
    let fresh_exp = now() + 600;
    let fresh = acme.sign(Algorithm::HS256, None, &with(claims("acme", "alice"), json!({ "exp": fresh_exp })));
    client.send_json(json!({ "type": "refresh", "token": fresh })).await;
    assert_eq!(client.expect("refreshed").await["exp"], fresh_exp);

    // Past the old token's expiry and grace, the socket still works.
    tokio::time::sleep_until(started + Duration::from_millis(5200)).await;
    let (ack, reply) = client.ask("m1", "hello").await;
    assert_eq!(ack["seq"], 1);
    assert!(!reply.text().is_empty());
}

#[tokio::test]
async fn an_expired_token_gets_its_grace_then_4001_and_a_reply_in_progress_finishes() {
    let dir = KeyDir::new();
    let acme = dir.hmac_secret("acme.secret");
    let config = jwt_config(
        &dir,
        "leeway_secs = 0\nexpiring_notice_secs = 5\nexpiry_grace_secs = 4",
        &[("acme", None, "HS256", &acme.path)],
    );
    // A reply that streams for about 3.6 s (9 gaps of 400 ms): longer than
    // the 2 s to `exp` plus the second `exp` is truncated to.
    let answerer =
        RecordingAnswerer::start(Script { tokens: 10, token_delay: Duration::from_millis(400), ..Script::default() })
            .await;
    let hub = Hub::start(&["--config", config.to_str().unwrap(), "--nlp-url", &answerer.url]).await;
    let exp = now() + 2;
    let token = acme.sign(Algorithm::HS256, None, &with(claims("acme", "alice"), json!({ "exp": exp })));
    let mut client = Client::connect(&hub.ws_url(&format!("token={token}"))).await;
    assert_eq!(client.expect("token.expiring").await["exp"], exp, "inside the notice window at once");
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.deltas.len(), 10, "the whole reply, across the expiry");
    assert!(now() >= exp, "the reply outlived the token");
    // Inside the grace: nothing new is stored.
    client.send_message("m2", "one more thing").await;
    let refused = client.expect("error").await;
    assert_eq!((refused["code"].as_str(), refused["id"].as_str()), (Some("token_expired"), Some("m2")));
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4001, "token expired"));
    assert!(now() >= exp + 4, "not before the grace was over");
}

#[tokio::test]
async fn sighup_adds_a_tenant_rotates_and_removes_keys_and_keeps_a_broken_config_out() {
    let dir = KeyDir::new();
    let (a1, a2) = (dir.hmac_secret("a1.secret"), dir.hmac_secret("a2.secret"));
    let telco = dir.key_pair("telco", "ed25519");
    let config = jwt_config(&dir, "", &[("acme", Some("a1"), "HS256", &a1.path)]);
    let hub = Hub::start(&["--config", config.to_str().unwrap()]).await;
    let pid = hub.child.id().unwrap() as i32;
    let hangup = || unsafe { libc::kill(pid, libc::SIGHUP) };
    let url = |token: &str| hub.ws_url(&format!("token={token}"));
    let with_a1 = a1.sign(Algorithm::HS256, Some("a1"), &claims("acme", "alice"));
    let with_a2 = a2.sign(Algorithm::HS256, Some("a2"), &claims("acme", "alice"));
    let of_telco = telco.sign(Algorithm::EdDSA, None, &claims("telco", "tom"));
    let mut on_a1 = Client::connect(&url(&with_a1)).await;
    assert_eq!(fengda_tests::isolation::refused_upgrade(&url(&of_telco)).await.0, 401);

    // Rotation: a2 joins a1, and tenant telco arrives.
    jwt_config(
        &dir,
        "",
        &[
            ("acme", Some("a1"), "HS256", &a1.path),
            ("acme", Some("a2"), "HS256", &a2.path),
            ("telco", None, "EdDSA", &telco.path),
        ],
    );
    hangup();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while tokio_tungstenite::connect_async(url(&of_telco)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the new tenant never verified");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Client::connect(&url(&with_a2)).await;
    Client::connect(&url(&with_a1)).await;
    on_a1.assert_alive().await;

    // A broken config is refused whole: the keys in force stay.
    dir.write("fengda.toml", b"[auth]\nmode = \"jwt\"\n[[auth.keys]]\ntenant = \"acme\"\nsecret_file = \"missing.secret\"\nalg = \"HS256\"\n");
    hangup();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !hub.logs().contains("configuration NOT reloaded") {
        assert!(tokio::time::Instant::now() < deadline, "no log of the refused reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hub.logs().contains("missing.secret"), "the log says why");
    Client::connect(&url(&with_a1)).await;

    // a1 removed: it stops verifying, and its socket closes with 4001 at once.
    jwt_config(&dir, "", &[("acme", Some("a2"), "HS256", &a2.path), ("telco", None, "EdDSA", &telco.path)]);
    hangup();
    let close = on_a1.expect_close().await.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4001, "token key removed"));
    let (status, body) = fengda_tests::isolation::refused_upgrade(&url(&with_a1)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unknown_kid")));
    Client::connect(&url(&with_a2)).await;
}

#[tokio::test]
async fn check_config_validates_key_files_without_starting() {
    let dir = KeyDir::new();
    let acme = dir.hmac_secret("acme.secret");
    let check = |path: &std::path::Path| {
        std::process::Command::new(binary("fengda")).arg("check-config").arg(path).output().unwrap()
    };
    let good = jwt_config(&dir, "", &[("acme", None, "HS256", &acme.path)]);
    let output = check(&good);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // A public key named as an HMAC secret, a missing file, an unknown alg, two keys without kids.
    let telco = dir.key_pair("telco", "rsa");
    for (keys, says) in [
        (vec![("acme", None, "HS256", telco.path.as_path())], "PEM"),
        (vec![("acme", None, "HS256", dir.file("nope.secret").as_path())], "nope.secret"),
        (vec![("acme", None, "HS257", acme.path.as_path())], "HS257"),
        (vec![("acme", None, "HS256", acme.path.as_path()), ("acme", None, "HS256", acme.path.as_path())], "kid"),
    ] {
        let bad = jwt_config(&dir, "", &keys);
        let output = check(&bad);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "{says}: {stderr}");
    }
}
