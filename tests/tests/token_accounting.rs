//! Per-tenant token accounting: the model's token counts, which a bridge
//! puts on an answer's last chunk, reach `reply.done.timing` (for sockets
//! that ask) and the hub's `fengda_hub_nlp_tokens_total{tenant, kind}`.

use fengda_proto::nlp::v1::Usage;
use fengda_tests::{Client, Hub, RecordingAnswerer, Script};

#[tokio::test]
async fn a_models_token_counts_reach_timing_and_the_tenants_metrics() {
    let usage = Usage { prompt_tokens: 31, completion_tokens: 5 };
    let answerer = RecordingAnswerer::start(Script { usage: Some(usage), ..Script::default() }).await;
    let dir = std::env::temp_dir().join(format!("fengda-token-accounting-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("hub.toml");
    // `bank` has its own section, so its own label; `shop` counts under `default`.
    std::fs::write(&config, "[tenants.bank]\nmax_connections = 100\n").unwrap();
    let hub = Hub::start(&["--config", config.to_str().unwrap(), "--nlp-url", &answerer.url, "--allow-timing"]).await;

    let mut bank = Client::connect(&hub.ws_url("tenant=bank&user=a&timing=1")).await;
    for i in 0..2 {
        let (_, reply) = bank.ask(&format!("m{i}"), "What are the fees?").await;
        let timing = &reply.done["timing"];
        assert_eq!((timing["prompt_tokens"].as_u64(), timing["completion_tokens"].as_u64()), (Some(31), Some(5)));
    }
    // Without timing=1 there is no timing object, but the tokens count all the same.
    let mut shop = Client::connect(&hub.ws_url("tenant=shop&user=b")).await;
    let (_, reply) = shop.ask("m1", "Where is my order?").await;
    assert!(reply.done.get("timing").is_none(), "{}", reply.done);

    let metrics = hub.metrics().await;
    let value = |tenant: &str, kind: &str| {
        let series = format!("fengda_hub_nlp_tokens_total{{tenant=\"{tenant}\",kind=\"{kind}\"}}");
        fengda_tests::metric_value(&metrics, &series)
    };
    assert_eq!((value("bank", "prompt"), value("bank", "completion")), (62.0, 10.0), "{metrics}");
    assert_eq!((value("default", "prompt"), value("default", "completion")), (31.0, 5.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_answer_without_counts_adds_none() {
    let answerer = RecordingAnswerer::start(Script::default()).await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--allow-timing"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=c&timing=1")).await;
    let (_, reply) = client.ask("m1", "Hello").await;
    let timing = &reply.done["timing"];
    assert!(timing["total_ms"].as_f64().unwrap() > 0.0);
    assert!(timing.get("prompt_tokens").is_none() && timing.get("completion_tokens").is_none(), "{timing}");
    assert!(!hub.metrics().await.contains("fengda_hub_nlp_tokens_total{"));
}
