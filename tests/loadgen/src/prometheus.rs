//! Reading the hub's `GET /metrics` (Prometheus text exposition format) for
//! the gauges the soak samples: `fengda_hub_runtime_tasks_alive` (live tokio
//! tasks) and `fengda_hub_sessions_open` (open WebSocket sessions).
//!
//! Only what the load generator needs: the body of a plain HTTP/1.x
//! response, and a gauge's value by name. A hub that does not export a
//! gauge gives `None`, which the report shows as null.

use anyhow::{Context, bail};

pub const TASKS_ALIVE: &str = "fengda_hub_runtime_tasks_alive";
pub const SESSIONS_OPEN: &str = "fengda_hub_sessions_open";

/// The request the load generator sends; HTTP/1.0, so the body comes whole
/// (no chunked encoding) and ends when the server closes.
pub fn request(host: &str) -> String {
    format!("GET /metrics HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
}

/// The body of a complete HTTP/1.x response, which must have status 200.
pub fn response_body(response: &str) -> anyhow::Result<&str> {
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers in the /metrics response")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).context("no status in the /metrics response")?;
    if status != "200" {
        bail!("/metrics answered {status_line:?}");
    }
    Ok(body)
}

/// The value of the gauge `name`: the sum of its samples (one, without
/// labels, for the hub's gauges). `None` if the text has no sample of it.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else { continue };
        // The name must end here: `name 1`, `name{label="x"} 1`, not `name_total 1`.
        let rest = match rest.chars().next() {
            Some('{') => match rest.find('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            },
            Some(' ' | '\t') => rest,
            _ => continue,
        };
        // Value, then an optional timestamp.
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else { continue };
        *found.get_or_insert(0.0) += value;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP fengda_hub_runtime_tasks_alive live tasks\n\
        # TYPE fengda_hub_runtime_tasks_alive gauge\n\
        fengda_hub_runtime_tasks_alive 1234\n\
        fengda_hub_runtime_tasks_alive_extra 7\n\
        # TYPE fengda_hub_sessions_open gauge\n\
        fengda_hub_sessions_open 200 1700000000000\n\
        fengda_hub_nlp_fallbacks_total{reason=\"overloaded\"} 3\n\
        fengda_hub_nlp_fallbacks_total{reason=\"queue_timeout\"} 4\n";

    #[test]
    fn gauges_are_found_by_exact_name() {
        assert_eq!(gauge(METRICS, TASKS_ALIVE), Some(1234.0));
        assert_eq!(gauge(METRICS, SESSIONS_OPEN), Some(200.0));
        assert_eq!(gauge(METRICS, "fengda_hub_nlp_fallbacks_total"), Some(7.0));
        assert_eq!(gauge(METRICS, "fengda_hub_runtime_workers"), None);
        assert_eq!(gauge(METRICS, "fengda_hub_runtime"), None);
        assert_eq!(gauge("", TASKS_ALIVE), None);
        assert_eq!(gauge("fengda_hub_sessions_open NaN-ish", SESSIONS_OPEN), None);
    }

    #[test]
    fn the_body_follows_the_headers_of_a_200() {
        let response =
            format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\n{}", "x 1\ny 2\n\n");
        assert_eq!(response_body(&response).unwrap(), "x 1\ny 2\n\n");
        let unavailable = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert!(response_body(unavailable).unwrap_err().to_string().contains("503"));
        assert!(response_body("HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn the_request_asks_for_metrics() {
        let request = request("127.0.0.1:8080");
        assert!(request.starts_with("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(request.ends_with("\r\n\r\n"));
    }
}
