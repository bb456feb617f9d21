//! A full NLP bridge is backpressure, not failure: questions wait in the
//! hub's admission queue (with `queued` frames) while the hub learns the
//! bridge's capacity, the circuit breaker stays closed, nobody gets the
//! fallback. A broken bridge still opens the breaker, and a planned restart
//! of the only bridge costs fallbacks only while no bridge is serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fengda_tests::{Client, Hub, NlpProcess, RecordingAnswerer, Script, metric_value};
use futures::future::join_all;
use tokio_util::sync::CancellationToken;

const CUSTOMERS: usize = 100;
const QUESTIONS: usize = 2;

/// What a crowd of customers saw.
#[derive(Debug, Default)]
struct Outcome {
    replies: usize,
    fallbacks: usize,
    /// Replies that waited in line (at least one `queued` frame).
    queued: usize,
}

/// `CUSTOMERS` customers of `hub`, each on its own socket, ask `QUESTIONS`
/// questions one after the other, all at once: every socket is open before
/// the first question, so the questions arrive together however slowly a
/// loaded machine opens sockets.
async fn crowd(hub: &Hub, tag: &str) -> Outcome {
    let urls: Vec<String> = (0..CUSTOMERS).map(|i| hub.ws_url(&format!("tenant=demo&user={tag}-{i}"))).collect();
    let clients = join_all(urls.iter().map(|url| Client::connect(url))).await;
    let customers = clients.into_iter().map(|mut client| async move {
        let mut outcome = Outcome::default();
        for q in 0..QUESTIONS {
            let (_, reply) = client.ask(&format!("m{q}"), "Tell me about the Gold Card").await;
            outcome.replies += 1;
            outcome.fallbacks += usize::from(reply.done["fallback"] == true);
            outcome.queued += usize::from(!reply.queued.is_empty());
        }
        outcome
    });
    join_all(customers).await.into_iter().fold(Outcome::default(), |mut all, one| {
        all.replies += one.replies;
        all.fallbacks += one.fallbacks;
        all.queued += one.queued;
        all
    })
}

/// The breaker of every endpoint never left closed, nothing fell back.
fn assert_no_breaker_and_no_fallback(metrics: &str) {
    assert!(
        !metrics.lines().any(|line| line.starts_with("fengda_hub_nlp_breaker_state") && !line.ends_with(" 0")),
        "the breaker opened:\n{metrics}"
    );
    let fallbacks = metrics.lines().filter(|line| line.starts_with("fengda_hub_nlp_fallbacks_total")).count();
    assert_eq!(fallbacks, 0, "fallbacks were counted:\n{metrics}");
}

/// The learned limit of the (only) endpoint.
fn endpoint_limit(metrics: &str) -> f64 {
    let line = metrics.lines().find(|line| line.starts_with("fengda_hub_nlp_endpoint_limit{"));
    metric_value(line.unwrap_or_else(|| panic!("no endpoint limit:\n{metrics}")), "fengda_hub_nlp_endpoint_limit")
}

#[tokio::test]
async fn a_small_bridge_makes_questions_wait_in_line_not_fall_back() {
    // 8 streams behind a hub allowing 64: the bridge says its limit, the hub starts there.
    let bridge =
        NlpProcess::start_with_max_streams(8, &["--first-token-delay-ms", "20", "--tokens-per-second", "0"]).await;
    let hub = Hub::start(&["--nlp-url", &bridge.url, "--nlp-max-concurrent", "64"]).await;
    let outcome = crowd(&hub, "small").await;
    assert_eq!(outcome.replies, CUSTOMERS * QUESTIONS);
    assert_eq!(outcome.fallbacks, 0, "{outcome:?}");
    assert!(outcome.queued > 0, "questions waited in line and were told so: {outcome:?}");
    let metrics = hub.metrics().await;
    assert_no_breaker_and_no_fallback(&metrics);
    assert_eq!(endpoint_limit(&metrics), 8.0, "learned from the bridge's advertised limit");
}

#[tokio::test]
async fn two_hubs_sharing_one_small_bridge_settle_within_its_capacity() {
    let bridge =
        NlpProcess::start_with_max_streams(8, &["--first-token-delay-ms", "20", "--tokens-per-second", "0"]).await;
    let args = ["--nlp-url", &bridge.url, "--nlp-max-concurrent", "64"];
    let (a, b) = tokio::join!(Hub::start(&args), Hub::start(&args));
    let (from_a, from_b) = tokio::join!(crowd(&a, "a"), crowd(&b, "b"));
    for outcome in [&from_a, &from_b] {
        assert_eq!(outcome.replies, CUSTOMERS * QUESTIONS);
        assert_eq!(outcome.fallbacks, 0, "{outcome:?}");
    }
    let (metrics_a, metrics_b) = (a.metrics().await, b.metrics().await);
    assert_no_breaker_and_no_fallback(&metrics_a);
    assert_no_breaker_and_no_fallback(&metrics_b);
    // Each hub alone would send 8: together they overran the bridge and backed off.
    let refusals = metric_value(&metrics_a, "fengda_hub_nlp_overloaded_total")
        + metric_value(&metrics_b, "fengda_hub_nlp_overloaded_total");
    assert!(refusals > 0.0, "the bridge refused some calls as full");
    for metrics in [&metrics_a, &metrics_b] {
        assert!(endpoint_limit(metrics) <= 8.0, "never above what the bridge advertises:\n{metrics}");
    }
}

#[tokio::test]
async fn a_bridge_that_does_not_advertise_its_limit_is_learned_from_its_refusals() {
    let answerer = RecordingAnswerer::start(Script {
        first_chunk_delay: Duration::from_millis(20),
        max_streams: Some(8),
        ..Script::default()
    })
    .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "64"]).await;
    let outcome = crowd(&hub, "silent").await;
    assert_eq!(outcome.replies, CUSTOMERS * QUESTIONS);
    assert_eq!(outcome.fallbacks, 0, "{outcome:?}");
    assert!(outcome.queued > 0, "{outcome:?}");
    assert!(answerer.refused() > 0, "the hub started above the answerer's limit and was refused");
    let metrics = hub.metrics().await;
    assert_no_breaker_and_no_fallback(&metrics);
    assert!(endpoint_limit(&metrics) < 64.0, "the limit came down from where it started:\n{metrics}");
    // Refusals are not failures: the calls that went through all succeeded.
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_calls_total{outcome=\"failed\"}"), 0.0);
}

#[tokio::test]
async fn a_bridge_that_really_fails_still_opens_the_breaker() {
    let answerer = RecordingAnswerer::start(Script { fail_first: 1000, ..Script::default() }).await;
    let hub = Hub::start(&[
        "--nlp-url",
        &answerer.url,
        "--nlp-breaker-consecutive-failures",
        "3",
        "--nlp-retry-max-attempts",
        "1",
    ])
    .await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=broken")).await;
    for i in 0..4 {
        let (_, reply) = client.ask(&format!("m{i}"), "Tell me about the Gold Card").await;
        assert_eq!(reply.done["fallback"], true);
    }
    assert_eq!(answerer.requests().len(), 3, "the fourth question met the open breaker");
    let metrics = hub.metrics().await;
    assert!(metrics.contains(r#"reason="breaker_open""#), "{metrics}");
    let open = metrics.lines().any(|line| line.starts_with("fengda_hub_nlp_breaker_state{") && line.ends_with(" 1"));
    assert!(open, "{metrics}");
}

#[tokio::test]
async fn an_upstreams_rate_limit_for_one_tenant_is_retried_without_lowering_the_bridges_limit() {
    let answerer = RecordingAnswerer::start(Script {
        fail_first: 2,
        fail_code: tonic::Code::ResourceExhausted,
        fail_upstream_limited: true,
        ..Script::default()
    })
    .await;
    let hub = Hub::start(&["--nlp-url", &answerer.url, "--nlp-max-concurrent", "64"]).await;
    let mut client = Client::connect(&hub.ws_url("tenant=demo&user=throttled")).await;
    let (_, reply) = client.ask("m1", "Tell me about the Gold Card").await;
    assert_eq!(reply.done["fallback"], false, "retried into an answer: {}", reply.done);
    assert_eq!(answerer.requests().len(), 3, "two refusals, then the answer");
    let metrics = hub.metrics().await;
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_overloaded_total"), 0.0, "not taken for a full bridge");
    assert_eq!(endpoint_limit(&metrics), 64.0, "the limit every tenant shares is untouched");
    assert_eq!(metric_value(&metrics, "fengda_hub_nlp_retries_total"), 2.0);
}

/// Each client asks `n` questions, one after the other, all clients at
/// once; returns how many replies were the fallback.
async fn ask_each(clients: &mut [Client], tag: &str, n: usize) -> usize {
    let asks = clients.iter_mut().map(|client| async move {
        let mut fallbacks = 0;
        for i in 0..n {
            let (_, reply) = client.ask(&format!("{tag}-{i}"), "Tell me about the Gold Card").await;
            fallbacks += usize::from(reply.done["fallback"] == true);
        }
        fallbacks
    });
    join_all(asks).await.into_iter().sum()
}

/// One customer asking again and again until `settled`; it settles it
/// itself when it gets an answer to a question asked after `restarted`.
async fn ask_until_settled(client: &mut Client, tag: &str, restarted: &AtomicBool, settled: &CancellationToken) {
    let mut n = 0;
    while !settled.is_cancelled() {
        let after_restart = restarted.load(Ordering::Acquire);
        let (_, reply) = client.ask(&format!("{tag}-{n}"), "Tell me about the Gold Card").await;
        if after_restart && reply.done["fallback"] == false {
            settled.cancel();
        }
        n += 1;
        // Pacing: fallbacks come at once while no bridge serves.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_planned_restart_of_the_only_bridge_costs_fallbacks_only_while_no_bridge_serves() {
    let pacing = ["--first-token-delay-ms", "10", "--tokens-per-second", "0"];
    let mut bridge = NlpProcess::start(&pacing).await;
    // While no bridge serves, fallbacks come at once and each customer asks
    // again every 20 ms: more than a socket's default frame rate (20/s,
    // bursts of 60), which is not what this test is about.
    let hub = Hub::start(&["--nlp-url", &bridge.url, "--max-frames-per-second", "1000"]).await;
    let addr = bridge.addr().to_owned();
    let urls: Vec<_> = (0..5).map(|i| hub.ws_url(&format!("tenant=demo&user=restart-{i}"))).collect();
    let mut clients = join_all(urls.iter().map(|url| Client::connect(url))).await;
    assert_eq!(ask_each(&mut clients, "before", 3).await, 0, "no fallback while the bridge serves");

    // The bridge is stopped (it drains) and started again on its address, as a
    // supervisor does, while the customers keep asking: fallbacks are allowed
    // until an answer to a question asked after the restart shows it serves.
    let (restarted, settled) = (AtomicBool::new(false), CancellationToken::new());
    let during = join_all(clients.iter_mut().enumerate().map(|(i, client)| {
        let (restarted, settled) = (&restarted, &settled);
        async move { ask_until_settled(client, &format!("during-{i}"), restarted, settled).await }
    }));
    let restart = async {
        assert!(bridge.terminate().await.success());
        let again = NlpProcess::start_on(&addr, None, &pacing).await;
        restarted.store(true, Ordering::Release);
        again
    };
    let settle =
        async { tokio::time::timeout(Duration::from_secs(20), during).await.expect("no answer after the restart") };
    let (_, _again) = tokio::join!(settle, restart);

    // Serving again (after one answer, the breaker's probe if it had opened): no fallback.
    assert_eq!(ask_each(&mut clients, "after", 3).await, 0, "fallbacks after the new bridge answered");
}
