//! A hub inside the test's own runtime ([`fengda::App`]), for tests where a
//! duration is the thing under test: under `#[tokio::test(start_paused =
//! true)]` the hub's timers (deadlines, breaker open time, queue waits)
//! run on the test's clock, which moves only when every task waits, so
//! "took at least the deadline" and "came at once" are exact, whatever the
//! machine's load. Sockets are real (loopback), as everywhere else.
//!
//! Always on the memory backend, whatever `FENGDA_TEST_BACKEND` says: a
//! paused clock cannot wait for another process (Redis's replies would
//! lose the race against every timer), and what these tests time (NLP
//! deadlines, breakers, admission) does not involve the store.

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process hub on the memory backend; stopped on
/// [`InProcessHub::stop`] or when dropped.
pub struct InProcessHub {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener (`/metrics`).
    pub admin_url: String,
    stop: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<Result<(), fengda::AppError>>>,
}

impl InProcessHub {
    /// Builds and runs a hub from `config`, on ephemeral loopback ports and
    /// the memory backend.
    pub async fn start(mut config: fengda::Config) -> InProcessHub {
        config.listen = ([127, 0, 0, 1], 0).into();
        config.admin_listen = ([127, 0, 0, 1], 0).into();
        config.backend = fengda::config::StoreKind::Memory;
        let app = fengda::App::build(config).await.expect("build the hub");
        let url = format!("http://{}", app.local_addr());
        let admin_url = format!("http://{}", app.admin_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        InProcessHub { url, admin_url, stop: Some(stop), run: Some(run) }
    }

    /// `ws://127.0.0.1:PORT/ws?<query>`
    pub fn ws_url(&self, query: &str) -> String {
        format!("{}/ws?{query}", self.url.replacen("http://", "ws://", 1))
    }

    /// GET /metrics on the admin listener (Prometheus text).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url)).await.unwrap().text().await.unwrap()
    }

    /// Shuts it down as SIGTERM would and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        let run = self.run.take().expect("running");
        run.await.expect("the hub's task").expect("the hub ran");
    }
}

impl Drop for InProcessHub {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.abort();
        }
    }
}
