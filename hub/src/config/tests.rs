use super::*;

/// The default of every config key, by its dotted name, from the one
/// place defaults are written: the `Default` impls.
fn defaults() -> std::collections::BTreeMap<String, serde_json::Value> {
    fn flatten(
        prefix: &str,
        value: serde_json::Value,
        out: &mut std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (key, value) in map {
                    let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                    flatten(&name, value, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    flatten("", serde_json::to_value(Config::default()).unwrap(), &mut out);
    out
}

/// How a default is written in the README and in `--help`.
fn shown(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "unset".to_owned(),
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Array(items) if items.is_empty() => "[]".to_owned(),
        // 25.0 tokens per second reads as 25.
        serde_json::Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) && n.is_f64() => {
            format!("{}", n.as_f64().unwrap_or_default() as i64)
        }
        other => other.to_string(),
    }
}

#[test]
fn the_readme_configuration_table_lists_every_key_with_its_real_default() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let table = readme.split("\n## Configuration").nth(1).expect("a Configuration section");
    let table = table.split("\n## ").next().unwrap();
    let defaults = defaults();
    let mut documented = std::collections::BTreeSet::new();
    for row in table.lines().filter(|line| line.starts_with("| `")) {
        let cells: Vec<_> = row.split('|').map(str::trim).collect();
        let (key, default) = (cells[1], cells[4]);
        // Rows naming a family of keys (`nlp.fallback.en`, `.zh`; `tenants.<tenant>.*`) are prose.
        let Some(key) =
            key.strip_prefix('`').and_then(|k| k.strip_suffix('`')).filter(|k| !k.contains('`') && !k.contains('<'))
        else {
            continue;
        };
        documented.insert(key.to_owned());
        let Some(value) = defaults.get(key) else { panic!("README documents `{key}`, which is no config key") };
        // Defaults that are rules, not values ("open-file limit − 128",
        // "¾ of `max_concurrent`", "embedded `faq.json`") are not checked.
        let literal = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).filter(|d| !d.contains('`'));
        match (literal, value) {
            (Some(literal), _) => assert_eq!(literal, shown(value), "README default of `{key}`"),
            (None, serde_json::Value::Null) => {}
            (None, _) if default == "unset" => panic!("README says `{key}` is unset by default; it is {value}"),
            (None, _) => {}
        }
    }
    let prose = ["nlp.fallback", "nlp.tenant_fallback"];
    for key in defaults.keys().filter(|key| !prose.iter().any(|p| key.starts_with(p))) {
        assert!(documented.contains(key), "README's configuration table has no row for `{key}`");
    }
}

#[test]
fn every_flag_says_its_key_and_its_real_default() {
    use clap::CommandFactory;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let defaults = defaults();
    for arg in Cli::command().get_arguments() {
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let Some(key) = help.split("(key `").nth(1).and_then(|rest| rest.split('`').next()) else { continue };
        let Some(default) = help.split("[default: ").nth(1).and_then(|rest| rest.split(']').next()) else {
            continue;
        };
        let value =
            defaults.get(key).unwrap_or_else(|| panic!("--{} names `{key}`, which is no config key", arg.get_id()));
        if default.contains(' ') && default != "unset" {
            continue; // a rule ("3/4 of nlp.max_concurrent"), not a value
        }
        assert_eq!(default, shown(value), "--{} help", arg.get_id());
    }
}

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn file_then_flags() {
    let dir = std::env::temp_dir().join(format!("fengda-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fengda.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:9000\"\n[conversation]\nhistory_turns = 4\n").unwrap();
    let args = ServeArgs { config: Some(path.clone()), history_turns: Some(6), ..Default::default() };
    let config = args.into_config().unwrap();
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.conversation.history_turns, 6);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_keys_are_refused() {
    assert!(toml::from_str::<Config>("listne = \"x\"").is_err());
}

#[test]
fn bad_values_are_refused() {
    let mut config = Config::default();
    config.websocket.idle_timeout_ms = 10;
    assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "websocket.idle_timeout_ms", .. })));
    // A conversation must outlive the window in which a returning user resumes it.
    let mut config = Config::default();
    config.conversation.idle_window_ms = 60_000;
    config.conversation.retention_secs = 59;
    assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "conversation.retention_secs", .. })));
    config.conversation.retention_secs = 60;
    config.validate().unwrap();
    config.redis.retention_secs = Some(0);
    assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "redis.retention_secs", .. })));
}

#[test]
fn trusted_proxies_are_addresses_or_cidr_blocks() {
    let config: Config = toml::from_str("[server]\ntrusted_proxies = [\"10.0.0.5\", \"192.168.0.0/16\"]").unwrap();
    let proxies = &config.server.trusted_proxies;
    assert!(proxies[0].contains(&"10.0.0.5".parse().unwrap()));
    assert!(!proxies[0].contains(&"10.0.0.6".parse().unwrap()));
    assert!(proxies[1].contains(&"192.168.7.8".parse().unwrap()));
    assert!(toml::from_str::<Config>("[server]\ntrusted_proxies = [\"proxy.example\"]").is_err());
    let mut config = Config::default();
    config.server.max_header_bytes = 4096;
    assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "server.max_header_bytes", .. })));
}

#[test]
fn allowed_origins_are_origins_or_a_lone_star() {
    let check = |origins: &[&str]| {
        let mut config = Config::default();
        config.websocket.allowed_origins = origins.iter().map(|o| o.to_string()).collect();
        config.validate().is_ok()
    };
    assert!(check(&[]));
    assert!(check(&["*"]));
    assert!(check(&["https://shop.example.com", "http://127.0.0.1:8080", "https://[::1]:8443"]));
    for bad in [&["*", "https://a.example"][..], &["shop.example.com"], &["https://a.example/"], &["https://"]] {
        assert!(!check(bad), "{bad:?}");
    }
}

#[test]
fn flags_switch_booleans_on_and_off() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let config = |args: &[&str]| Cli::parse_from([&["fengda"], args].concat()).serve.into_config().unwrap();
    let defaults = config(&[]);
    assert!(!defaults.websocket.allow_timing && !defaults.server.http2_cleartext);
    assert_eq!(defaults.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(defaults.websocket.max_text_bytes, 8192);
    let on = config(&["--allow-timing", "--http2-cleartext", "--admin-listen", "127.0.0.1:0"]);
    assert!(on.websocket.allow_timing && on.server.http2_cleartext);
    assert_eq!(on.admin_listen.port(), 0);
    assert!(!config(&["--allow-timing=false"]).websocket.allow_timing);
}

#[test]
fn redis_retention_defaults_to_the_conversation_retention() {
    let mut config = Config::default();
    config.conversation.retention_secs = 3600;
    assert_eq!(config.conversation.redis_retention_secs(&config.redis), 3600);
    config.redis.retention_secs = Some(7200);
    assert_eq!(config.conversation.redis_retention_secs(&config.redis), 7200);
}

#[test]
fn a_tenant_section_overrides_the_default_one_key_at_a_time() {
    let text = "[tenants.default]\nmax_connections = 100\nhistory_turns = 4\n[tenants.acme]\nhistory_turns = 2\n";
    let config: Config = toml::from_str(text).unwrap();
    config.validate().unwrap();
    let acme = config.tenants.default.with(&config.tenants.tenants["acme"]);
    assert_eq!((acme.max_connections, acme.history_turns), (100, Some(2)));
    assert!(toml::from_str::<Config>("[tenants.acme]\nmax_conections = 1\n").is_err(), "unknown key");
    let mut config = Config::default();
    config.tenants.tenants.insert("bad tenant".into(), Default::default());
    assert!(matches!(config.validate(), Err(ConfigError::Invalid { key: "tenants", .. })));
    let mut config = Config::default();
    config.tenants.default.max_text_bytes = Some(config.websocket.max_text_bytes + 1);
    assert!(config.validate().is_err(), "longer than the node allows");
}
