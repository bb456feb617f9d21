//! The endpoints' health: each bridge's standard gRPC health service, asked
//! every few seconds (more often while one is not serving), so calls prefer
//! endpoints that say they serve, a bridge back from a restart gets a breaker
//! probe at once, and its advertised stream limit reaches its learned limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::NlpPool;
use super::limit::advertised_streams;

/// How often endpoints' gRPC health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often while some endpoint is not serving: a bridge that comes back
/// gets its calls (and its breaker probe) this soon.
const HEALTH_INTERVAL_RECOVERING: Duration = Duration::from_millis(500);
/// How long one endpoint's check may take, connecting included.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks each endpoint's standard gRPC health service every few seconds,
/// so calls prefer endpoints that say they are serving.
pub async fn run_health_checks(pool: Arc<NlpPool>, stop: CancellationToken) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // One per endpoint; none for an in-process answerer (it is always there).
    let mut clients: Vec<_> = pool
        .endpoints
        .iter()
        .map(|e| match e.client.is_remote() {
            true => tonic::transport::Endpoint::from_shared(e.url.clone()).ok(),
            false => None,
        })
        .map(|endpoint| endpoint.map(|endpoint| HealthClient::new(endpoint.connect_lazy())))
        .collect();
    if clients.iter().all(Option::is_none) {
        return;
    }
    let mut next = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(next) => {}
            () = pool.recheck.notified() => {}
        }
        let mut all_serving = true;
        for (endpoint, client) in pool.endpoints.iter().zip(clients.iter_mut()) {
            let Some(client) = client else { continue };
            // The answer service's own status: a draining bridge marks it NOT_SERVING.
            let checked_at = tokio::time::Instant::now();
            let mut request = tonic::Request::new(HealthCheckRequest { service: "fengda.nlp.v1.Nlp".into() });
            request.set_timeout(CHECK_TIMEOUT);
            // The outer timeout also bounds connecting, which `grpc-timeout`
            // does not: a host that drops SYNs must not stall the other checks.
            let response = tokio::time::timeout(CHECK_TIMEOUT, client.check(request)).await.ok();
            let response = response.and_then(Result::ok);
            let serving = matches!(&response, Some(r) if r.get_ref().status == 1);
            all_serving &= serving;
            let advertised = response.and_then(|r| advertised_streams(r.metadata()));
            if let Some(limit) = advertised.and_then(|streams| endpoint.limit.advertised(streams)) {
                endpoint.set_limit_gauge(limit);
            }
            let now = tokio::time::Instant::now();
            if endpoint.healthy.swap(serving, Ordering::AcqRel) != serving {
                info!(endpoint = %endpoint.name, serving, "NLP endpoint health changed");
                // Back after a restart: its breaker, opened while it was
                // gone, lets a probe through now instead of after `breaker_open_ms`.
                if serving && endpoint.breaker.probe_now(now) {
                    info!(endpoint = %endpoint.name, "NLP endpoint serving again; probing its breaker at once");
                }
            } else if serving && endpoint.breaker.serving_since(checked_at, now) {
                // A restart quicker than the checks: serving before and
                // after, its breaker opened in between.
                info!(endpoint = %endpoint.name, "NLP endpoint serves, its breaker opened before; probing it at once");
            }
            // Every round, not only on a change: cheap, and heals any drift.
            pool.update_capacity();
        }
        next = if all_serving { HEALTH_INTERVAL } else { HEALTH_INTERVAL_RECOVERING };
    }
}
