//! Tests of [`super`]: parsing and encoding the client frames.

use super::*;

/// Limits of 10 characters, 20 bytes.
const LIMIT: TextLimit = TextLimit { chars: 10, bytes: 20 };

fn code(text: &str) -> ErrorCode {
    parse_client_frame(text, LIMIT).unwrap_err().code
}

#[test]
fn parses_message_and_ping() {
    assert_eq!(
        parse_client_frame(r#"{"type":"message","id":"m1","text":"hi"}"#, LIMIT),
        Ok(ClientFrame::Message { id: "m1".into(), text: "hi".into(), conversation: None })
    );
    assert_eq!(parse_client_frame(r#"{"type":"ping"}"#, LIMIT), Ok(ClientFrame::Ping));
    assert_eq!(
        parse_client_frame(r#"{"type":"cancel","reply":"r-1"}"#, LIMIT),
        Ok(ClientFrame::Cancel { reply: "r-1".into() })
    );
    assert_eq!(parse_client_frame(r#"{"type":"cancel"}"#, LIMIT).unwrap_err().code, ErrorCode::MissingField);
}

#[test]
fn parses_agent_frames() {
    let id = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"watch","conversation":"{id}","after":3}}"#), LIMIT),
        Ok(ClientFrame::Watch { conversation: id.into(), after: Some(3) })
    );
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"watch","conversation":"{id}","after":null}}"#), LIMIT),
        Ok(ClientFrame::Watch { conversation: id.into(), after: None })
    );
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"unwatch","conversation":"{id}"}}"#), LIMIT),
        Ok(ClientFrame::Unwatch { conversation: id.into() })
    );
    assert_eq!(code(r#"{"type":"watch"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"watch","conversation":7}"#), ErrorCode::InvalidFrame);
    for after in ["-1", "1.5", "\"3\"", "true"] {
        let frame = format!(r#"{{"type":"watch","conversation":"c","after":{after}}}"#);
        assert_eq!(code(&frame), ErrorCode::InvalidFrame, "{frame}");
    }
    assert!(ClientFrame::Watch { conversation: id.into(), after: None }.is_agents());
    assert!(ClientFrame::Cancel { reply: "r".into() }.is_customers());
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"take","conversation":"{id}","steal":true}}"#), LIMIT),
        Ok(ClientFrame::Take { conversation: id.into(), steal: true })
    );
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"take","conversation":"{id}"}}"#), LIMIT),
        Ok(ClientFrame::Take { conversation: id.into(), steal: false })
    );
    assert_eq!(code(r#"{"type":"take","conversation":"c","steal":"yes"}"#), ErrorCode::InvalidFrame);
    assert_eq!(parse_client_frame(r#"{"type":"handoff"}"#, LIMIT), Ok(ClientFrame::Handoff));
    assert_eq!(
        parse_client_frame(r#"{"type":"typing","on":true}"#, LIMIT),
        Ok(ClientFrame::Typing { conversation: None, on: true, note: false })
    );
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"typing","conversation":"{id}","on":false,"note":true}}"#), LIMIT),
        Ok(ClientFrame::Typing { conversation: Some(id.into()), on: false, note: true })
    );
    assert_eq!(code(r#"{"type":"typing"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"typing","on":1}"#), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"type":"typing","on":true,"note":"no"}"#), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"type":"typing","on":true,"conversation":3}"#), ErrorCode::InvalidFrame);
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"note","id":"n1","text":"VIP","conversation":"{id}"}}"#), LIMIT),
        Ok(ClientFrame::Note { conversation: id.into(), id: "n1".into(), text: "VIP".into() })
    );
    assert_eq!(code(r#"{"type":"note","id":"n1","text":"VIP"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"note","id":"n1","text":" ","conversation":"c"}"#), ErrorCode::EmptyText);
    assert_eq!(
        parse_client_frame(&format!(r#"{{"type":"message","id":"m1","text":"hi","conversation":"{id}"}}"#), LIMIT),
        Ok(ClientFrame::Message { id: "m1".into(), text: "hi".into(), conversation: Some(id.into()) })
    );
    let error = parse_client_frame(r#"{"type":"message","id":"m1","text":"hi","conversation":5}"#, LIMIT);
    assert_eq!(error.unwrap_err().id.as_deref(), Some("m1"));
    assert!(!ClientFrame::Ping.is_agents() && !ClientFrame::Ping.is_customers());
}

#[test]
fn rejects_each_bad_input_with_its_code() {
    assert_eq!(code("{not json"), ErrorCode::InvalidJson);
    assert_eq!(code("[1,2]"), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"id":"m1"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
    assert_eq!(code(r#"{"type":"message","text":"hi"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"message","id":"m1"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"message","id":"","text":"hi"}"#), ErrorCode::InvalidId);
    assert_eq!(code(r#"{"type":"message","id":"m\u0001","text":"hi"}"#), ErrorCode::InvalidId);
    assert_eq!(code(r#"{"type":"message","id":"m\n1","text":"hi"}"#), ErrorCode::InvalidId);
    assert_eq!(code(r#"{"type":"message","id":"m1","text":7}"#), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"type":"message","id":"m1","text":"  "}"#), ErrorCode::EmptyText);
    assert_eq!(code(r#"{"type":"message","id":"m1","text":"01234567890"}"#), ErrorCode::TextTooLong);
}

#[test]
fn reads_escaped_strings_and_keys_and_skips_other_fields() {
    let frame = r#"{"extra":{"a":[1,{"b":null}]},"\u0074ype":"message","id":"m\"1","text":"line\nbreak","n":[]}"#;
    assert_eq!(
        parse_client_frame(frame, TextLimit { chars: 20, bytes: 40 }),
        Ok(ClientFrame::Message { id: "m\"1".into(), text: "line\nbreak".into(), conversation: None })
    );
    // A repeated key is refused, whichever key and however it is spelled.
    for repeated in [
        r#"{"type":"dance","type":"ping"}"#,
        r#"{"type":"ping","\u0074ype":"ping"}"#,
        r#"{"type":"message","id":"m1","text":"hi","text":"bye"}"#,
        r#"{"type":"ping","x":1,"x":1}"#,
        r#"{"type":"ping","x":{"y":[{"z":1,"z":2}]}}"#,
    ] {
        let error = parse_client_frame(repeated, LIMIT).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidFrame, "{repeated}");
        assert!(error.message.starts_with("a key appears twice"), "{}", error.message);
    }
    assert!(parse_client_frame(r#"{"type":"ping","x":{"type":1},"y":{"type":2}}"#, LIMIT).is_ok());
    for not_an_object in ["7", "\"ping\"", "null", "true", "[]", "-1.5"] {
        assert_eq!(code(not_an_object), ErrorCode::InvalidFrame, "{not_an_object}");
    }
    assert_eq!(code(r#"{"type":null}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"message","id":null,"text":"hi"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":"message","id":["m1"],"text":"hi"}"#), ErrorCode::InvalidFrame);
    assert_eq!(code(r#"{"type":"ping"} trailing"#), ErrorCode::InvalidJson);
    // What serde_json rejects as a value is rejected in a skipped field too.
    assert_eq!(code(r#"{"type":"ping","x":1e400}"#), ErrorCode::InvalidJson);
    assert_eq!(code(r#"{"type":"ping","x":"\ud800"}"#), ErrorCode::InvalidJson);
    assert_eq!(code(r#"{"type":"ping","x":{"y":[1e400]}}"#), ErrorCode::InvalidJson);
    assert_eq!(code("[1e400]"), ErrorCode::InvalidJson);
    let deep = format!(r#"{{"type":"ping","x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    assert_eq!(code(&deep), ErrorCode::InvalidJson, "nesting deeper than serde_json's limit");
}

#[test]
fn blank_is_white_space_and_zero_width_characters_only() {
    for blank in [
        "",
        " \t\r\n",
        "\u{a0}",
        "\u{3000}",
        "\u{2003}\u{85}",
        "\u{200b}",
        "\u{feff}",
        "\u{200c}\u{200d}\u{2060}\u{180e}",
    ] {
        assert!(is_blank(blank), "{blank:?}");
    }
    for shown in ["a", " .", "\u{200b}x", "金", "👩\u{200d}💻"] {
        assert!(!is_blank(shown), "{shown:?}");
    }
}

#[test]
fn text_limit_counts_characters_and_bytes() {
    // Ten CJK characters are 30 bytes: within a 10-character limit, not a 20-byte one.
    let frame = r#"{"type":"message","id":"m1","text":"金卡金卡金卡金卡金卡"}"#;
    assert!(parse_client_frame(frame, TextLimit { chars: 10, bytes: 30 }).is_ok());
    let error = parse_client_frame(frame, LIMIT).unwrap_err();
    assert_eq!((error.code, error.id.as_deref()), (ErrorCode::TextTooLong, Some("m1")));
    assert_eq!(error.message, "`text` must be at most 20 bytes of UTF-8");
    // Exactly at both limits passes.
    let frame = r#"{"type":"message","id":"m1","text":"金卡金卡金卡xy"}"#;
    assert!(parse_client_frame(frame, TextLimit { chars: 8, bytes: 20 }).is_ok());
}

#[test]
fn json_errors_are_described_in_our_words() {
    let error = parse_client_frame("{\"type\":", LIMIT).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidJson);
    assert_eq!(error.message, "frame is not valid JSON (line 1, column 8)");
}

#[test]
fn errors_about_a_message_carry_its_id() {
    let err = parse_client_frame(r#"{"type":"message","id":"m9","text":""}"#, LIMIT).unwrap_err();
    assert_eq!(err.id.as_deref(), Some("m9"));
    let json: serde_json::Value = serde_json::from_str(err.to_frame().as_str()).unwrap();
    assert_eq!(json["type"], "error");
    assert_eq!(json["code"], "empty_text");
    assert_eq!(json["id"], "m9");
}
