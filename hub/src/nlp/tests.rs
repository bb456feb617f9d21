//! The pool end to end on paused time, over in-process answerers whose
//! timing each test scripts.

use std::sync::Arc;
use std::time::Duration;

use fengda_nlp::NlpService;
use fengda_nlp::backend::{AnswerBackend, BackendError, BackendRequest, Finish, Token, TokenStream};
use futures::StreamExt;

use super::breaker::BreakerState;
use super::*;

/// Waits `delay`, then fails (as timed out upstream: `DEADLINE_EXCEEDED`,
/// retried) or answers.
struct Scripted {
    delay: Duration,
    fails: bool,
}

impl AnswerBackend for Scripted {
    fn answer(&self, _: BackendRequest) -> TokenStream {
        let (delay, fails) = (self.delay, self.fails);
        let first = futures::stream::once(async move {
            tokio::time::sleep(delay).await;
            if fails { Err(BackendError::Timeout) } else { Ok(Token::Text("hello".into())) }
        });
        first.chain(futures::stream::iter([Ok(Token::End(Finish::Stop))])).boxed()
    }
}

const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_millis(1000);

/// A pool over one in-process endpoint per script; one failure opens a breaker.
fn pool(scripts: Vec<Scripted>) -> Arc<NlpPool> {
    let config = NlpConfig {
        first_chunk_timeout_ms: FIRST_CHUNK_TIMEOUT.as_millis() as u64,
        retry_initial_backoff_ms: 1,
        breaker_consecutive_failures: 1,
        ..NlpConfig::default()
    };
    let endpoints = scripts
        .into_iter()
        .enumerate()
        .map(|(i, script)| (format!("endpoint-{i}"), NlpClient::in_process(NlpService::new(Arc::new(script)), &config)))
        .collect();
    Arc::new(NlpPool::new(endpoints, &config))
}

async fn ask(pool: &Arc<NlpPool>) -> Result<ActiveCall, StartError> {
    let request = AnswerRequest {
        tenant_id: "t".into(),
        conversation_id: "c".into(),
        question: "hello?".into(),
        ..AnswerRequest::default()
    };
    pool.start(&TenantId::parse("t").unwrap(), &request, &mut |_| {}).await
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_hangs_through_the_whole_deadline_is_charged_to_its_endpoint() {
    let pool = pool(vec![Scripted { delay: FIRST_CHUNK_TIMEOUT * 2, fails: false }]);
    assert!(matches!(ask(&pool).await, Err(StartError::Deadline)));
    assert_eq!(pool.endpoints[0].breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_retry_left_with_a_sliver_of_the_deadline_is_not_charged_to_its_endpoint() {
    // The first endpoint uses up 99% of the deadline and fails; the retry
    // goes to the second, healthy one (it answers in 100 ms) with ~10 ms left.
    let pool = pool(vec![
        Scripted { delay: FIRST_CHUNK_TIMEOUT * 99 / 100, fails: true },
        Scripted { delay: Duration::from_millis(100), fails: false },
    ]);
    assert!(matches!(ask(&pool).await, Err(StartError::Deadline)));
    assert_eq!(pool.endpoints[0].breaker.state(), BreakerState::Open, "the failing endpoint is charged");
    assert_eq!(
        pool.endpoints[1].breaker.state(),
        BreakerState::Closed,
        "the deadline ran out because of the first attempt, not the second endpoint"
    );
    // And the healthy endpoint takes the next question.
    let mut call = ask(&pool).await.expect("the second endpoint answers");
    assert_eq!(call.next().await.expect("a chunk").expect("not the end").text, "hello");
}
