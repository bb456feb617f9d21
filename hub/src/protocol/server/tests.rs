//! Tests of [`super`]: parsing and encoding the server frames.

use super::*;

#[test]
fn delta_encoder_matches_the_serde_encoding() {
    let encoder = DeltaEncoder::new("conv-1", "r-\"odd\"");
    for (index, text) in
        [(0, "Hi"), (7, " \"quoted\" \\ back"), (41, "line\nbreak\t\u{1}"), (u32::MAX, "金卡 ✓ 🎉"), (3, "")]
    {
        let expected = ServerFrame::ReplyDelta { conversation: "conv-1", reply: "r-\"odd\"", index, text }.encode();
        assert_eq!(encoder.encode(index, text), expected);
    }
    // Every ASCII byte, control characters and DEL included, escapes as serde_json does.
    let ascii: String = (0u8..=0x7f).map(char::from).collect();
    for text in [ascii.as_str(), "\u{1f}x\u{7f}\"\\é\u{2028}"] {
        let index = 1;
        let expected = ServerFrame::ReplyDelta { conversation: "conv-1", reply: "r-\"odd\"", index, text }.encode();
        assert_eq!(encoder.encode(index, text), expected);
    }
}

#[test]
fn server_frames_use_wire_names() {
    let delta = ServerFrame::ReplyDelta { conversation: "c", reply: "r", index: 0, text: "Hi" }.encode();
    assert_eq!(delta.as_str(), r#"{"type":"reply.delta","conversation":"c","reply":"r","index":0,"text":"Hi"}"#);
    let msg = ServerFrame::Message {
        conversation: "c",
        seq: 3,
        from: Role::Assistant,
        id: "r",
        text: "x",
        fallback: false,
        interrupted: false,
        cancelled: false,
        agent: None,
        name: None,
        event: None,
    }
    .encode();
    assert_eq!(msg.as_str(), r#"{"type":"message","conversation":"c","seq":3,"from":"assistant","id":"r","text":"x"}"#);
    let cancelled = ServerFrame::Message {
        conversation: "c",
        seq: 3,
        from: Role::Assistant,
        id: "r",
        text: "",
        fallback: false,
        interrupted: false,
        cancelled: true,
        agent: None,
        name: None,
        event: None,
    }
    .encode();
    assert!(cancelled.as_str().ends_with(r#""text":"","cancelled":true}"#), "{}", cancelled.as_str());
    assert_eq!(ServerFrame::Pong.encode().as_str(), r#"{"type":"pong"}"#);
}
