//! URLs as they may be shown: in logs, metric labels and error messages.
//!
//! A configured URL may carry credentials (`http://svc:s3cr3t@nlp:50051`,
//! `redis://:pw@redis:6379`, `redis+unix:///run/redis.sock?pass=pw`). The
//! hub connects with the real URL and shows only [`display_url`]'s form
//! anywhere else, so a scrape of `/metrics` or a log line never carries a
//! secret. Written out rather than parsed with the `url` crate: that crate
//! rewrites what it shows (a trailing `/`, lower case), which would change
//! metric labels, and a URL that does not parse must be redacted too.

use std::borrow::Cow;

/// Query parameters that carry a secret (the Redis client's `pass`, and the
/// usual spellings), removed with their value.
const SECRET_PARAMS: [&str; 4] = ["pass", "password", "token", "secret"];

/// `url` without its userinfo (`user:password@`) and without any secret
/// query parameter; everything else is kept as written. Borrowed when there
/// is nothing to remove.
pub fn display_url(url: &str) -> Cow<'_, str> {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // The host follows the last `@` (a password may itself contain `@`).
    let host = authority.rfind('@').map(|at| &authority[at + 1..]);
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let secret_in_query = query.is_some_and(|q| q.split(['&', '#']).any(is_secret_param));
    if host.is_none() && !secret_in_query {
        return Cow::Borrowed(url);
    }
    let mut shown = String::with_capacity(url.len());
    shown.push_str(scheme);
    shown.push_str(host.unwrap_or(authority));
    shown.push_str(path);
    if let Some(query) = query {
        let (query, fragment) = match query.split_once('#') {
            Some((query, fragment)) => (query, Some(fragment)),
            None => (query, None),
        };
        let kept: Vec<&str> = query.split('&').filter(|param| !is_secret_param(param)).collect();
        if !kept.is_empty() {
            shown.push('?');
            shown.push_str(&kept.join("&"));
        }
        if let Some(fragment) = fragment {
            shown.push('#');
            shown.push_str(fragment);
        }
    }
    Cow::Owned(shown)
}

fn is_secret_param(param: &str) -> bool {
    let name = param.split_once('=').map_or(param, |(name, _)| name);
    SECRET_PARAMS.iter().any(|secret| name.eq_ignore_ascii_case(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_removed_and_the_rest_kept_as_written() {
        let cases = [
            ("http://svc:s3cr3t@10.0.0.5:50051", "http://10.0.0.5:50051"),
            ("https://token@nlp.example.com/base/?x=1", "https://nlp.example.com/base/?x=1"),
            ("http://a:p@ss@host:1", "http://host:1"),
            ("http://user:pw@[::1]:50051", "http://[::1]:50051"),
            ("redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("rediss://default:pw@redis:6380?protocol=resp3", "rediss://redis:6380?protocol=resp3"),
            ("redis+unix:///run/redis.sock?db=1&pass=pw", "redis+unix:///run/redis.sock?db=1"),
            ("redis+unix:///run/redis.sock?PASS=pw&user=u", "redis+unix:///run/redis.sock?user=u"),
            ("redis+unix:///run/redis.sock?password=pw", "redis+unix:///run/redis.sock"),
            ("http://host/p?token=t#frag", "http://host/p#frag"),
            ("user:pw@host", "host"),
        ];
        for (url, shown) in cases {
            assert_eq!(display_url(url), shown, "{url}");
            assert!(!display_url(url).contains("pw") && !display_url(url).contains("s3cr3t"), "{url}");
        }
    }

    #[test]
    fn a_url_without_secrets_is_borrowed_unchanged() {
        for url in ["http://127.0.0.1:50051", "redis://127.0.0.1:6379?protocol=resp3", "in-process", ""] {
            assert!(matches!(display_url(url), Cow::Borrowed(shown) if shown == url), "{url}");
        }
    }
}
