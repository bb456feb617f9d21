//! The fan-out's tests: delivery order, the cursor that drops what
//! sessions have, slow consumers, and the incoming-event handler.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::protocol::close;

fn key() -> ConversationKey {
    ConversationKey::for_test("t", "c")
}

fn session(capacity: usize) -> (SessionHandle, mpsc::Receiver<Box<Outbound>>) {
    let (tx, rx) = mpsc::channel(capacity);
    let handle = SessionHandle::customer(SessionId::next(), tx, SessionCloser::child_of(&CancellationToken::new()));
    (handle, rx)
}

fn epoch() -> LogEpoch {
    LogEpoch::of("5e1b7c9d2a4f")
}

/// Owner epoch `owner` of the log [`epoch`].
fn asked(owner: u64) -> OwnerEpoch {
    OwnerEpoch { log: epoch(), epoch: owner }
}

fn customer_event(seq: u64) -> StoredEvent {
    StoredEvent {
        seq,
        from: Role::Customer,
        id: format!("m{seq}"),
        text: "hi".into(),
        fallback: false,
        interrupted: false,
        cancelled: false,
        at_ms: 0,
        agent: None,
        name: None,
        event: None,
        owner_epoch: None,
    }
}

#[test]
fn origin_gets_ack_and_others_get_the_message_sharing_bytes() {
    let fanout = FanOut::default();
    let (a, mut a_rx) = session(8);
    let (b, mut b_rx) = session(8);
    let (c, mut c_rx) = session(8);
    assert_eq!(fanout.join(&key(), a.clone()), Ok(true));
    assert_eq!(fanout.join(&key(), b), Ok(false));
    fanout.join(&key(), c).unwrap();
    fanout.deliver_event(&key(), epoch(), &customer_event(1), Some(a.id), None);
    assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
    let Outbound::Event { seq, frame: b_frame, .. } = *b_rx.try_recv().unwrap() else { panic!("an event") };
    let c_frame = c_rx.try_recv().unwrap();
    assert!(b_frame.as_str().contains(r#""type":"message""#));
    assert_eq!(seq, 1);
    // One encoding shared by both sockets, not one copy each.
    assert_eq!(b_frame.as_str().as_ptr(), c_frame.frame().unwrap().as_str().as_ptr());
}

#[test]
fn a_lone_sender_gets_its_ack_and_a_last_joined_sender_still_gets_an_ack() {
    let fanout = FanOut::default();
    let (a, mut a_rx) = session(8);
    fanout.join(&key(), a.clone()).unwrap();
    fanout.deliver_event(&key(), epoch(), &customer_event(1), Some(a.id), None);
    assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
    assert!(a_rx.try_recv().is_err(), "one frame: the ack");
    // The sender joined last: the earlier socket gets the message, the sender its ack.
    let (b, mut b_rx) = session(8);
    fanout.join(&key(), b.clone()).unwrap();
    fanout.deliver_event(&key(), epoch(), &customer_event(2), Some(b.id), None);
    assert!(a_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"message""#));
    assert!(b_rx.try_recv().unwrap().frame().unwrap().as_str().contains(r#""type":"ack""#));
}

/// The seqs of the durable events queued for a session, and whether each is an `ack`.
fn events(rx: &mut mpsc::Receiver<Box<Outbound>>) -> Vec<(u64, bool)> {
    let mut events = Vec::new();
    while let Ok(item) = rx.try_recv() {
        if let Outbound::Event { seq, frame, .. } = *item {
            events.push((seq, frame.as_str().contains(r#""type":"ack""#)));
        }
    }
    events
}

#[test]
fn the_echo_of_a_locally_delivered_event_is_dropped() {
    let fanout = FanOut::default();
    let (a, mut a_rx) = session(16);
    fanout.join(&key(), a.clone()).unwrap();
    fanout.deliver_event(&key(), epoch(), &customer_event(1), Some(a.id), None);
    // The same event again, as the bus would hand it over: once is enough.
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(1), None);
    assert_eq!(events(&mut a_rx), [(1, true)]);
}

#[test]
fn remote_events_fill_in_in_order_and_a_gap_is_left_to_the_writer() {
    let fanout = FanOut::default();
    let (a, mut a_rx) = session(16);
    fanout.join(&key(), a.clone()).unwrap();
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(1), None);
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(2), None);
    // This node appended 4 while 3 (another node's) is still on its way:
    // handed on at once, the writer reads 3 from the log before it.
    fanout.deliver_event(&key(), epoch(), &customer_event(4), Some(a.id), None);
    let received = events(&mut a_rx);
    assert_eq!(received, [(1, false), (2, false), (4, true)]);
    let mut writer = crate::event::Cursor::at(2);
    assert_eq!(writer.step(4), crate::event::Step::Gap, "the writer fills 3 from the log");
    writer.advance(4);
    // 3 arrives late: every session already has it (from the log).
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(3), None);
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(5), None);
    assert_eq!(events(&mut a_rx), [(5, false)]);
}

#[test]
fn a_recreated_log_starts_the_fan_out_again_and_the_old_one_is_never_delivered_after_it() {
    let fanout = FanOut::default();
    let (a, mut a_rx) = session(16);
    fanout.join(&key(), a.clone()).unwrap();
    for seq in 1..=4 {
        IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(seq), None);
    }
    assert_eq!(events(&mut a_rx).len(), 4);
    // The log was lost and recreated: its seqs start again at 1.
    let new = LogEpoch::of("a07c3e91f6d2");
    fanout.deliver_event(&key(), new, &customer_event(1), Some(a.id), None);
    IncomingEvents::event(&fanout, &key(), new, &customer_event(2), None);
    // A late copy of the old log's events: dropped, whatever its seq.
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(5), None);
    IncomingEvents::event(&fanout, &key(), epoch(), &customer_event(3), None);
    IncomingEvents::event(&fanout, &key(), new, &customer_event(2), None);
    let mut received = Vec::new();
    while let Ok(item) = a_rx.try_recv() {
        if let Outbound::Event { epoch, seq, .. } = *item {
            received.push((epoch == new, seq));
        }
    }
    assert_eq!(received, [(true, 1), (true, 2)]);
}

#[tokio::test]
async fn appends_of_one_conversation_take_turns_only_while_it_has_sessions() {
    let fanout = FanOut::default();
    assert!(fanout.append_turn(&key()).is_none(), "no session here: no order to keep");
    let (a, _a_rx) = session(1);
    fanout.join(&key(), a).unwrap();
    let turn = fanout.append_turn(&key()).unwrap();
    let held = turn.lock().await;
    assert!(fanout.append_turn(&key()).unwrap().try_lock().is_none(), "the second append waits for the first");
    drop(held);
    assert!(fanout.append_turn(&key()).unwrap().try_lock().is_some());
}

#[test]
fn full_queue_closes_the_session_as_slow_consumer() {
    let fanout = FanOut::default();
    let (slow, _rx) = session(1);
    fanout.join(&key(), slow.clone()).unwrap();
    let frame = Utf8Bytes::from_static("{}");
    fanout.deliver_frames(&key(), vec![frame.clone(), frame.clone()], asked(0));
    assert!(!slow.closer.token().is_cancelled(), "a batch is one item");
    fanout.deliver_frames(&key(), vec![frame.clone()], asked(0));
    assert!(slow.closer.token().is_cancelled());
    assert_eq!(slow.closer.reason(), close::SLOW_CONSUMER);
}

#[test]
fn a_full_conversation_refuses_another_session_until_one_leaves() {
    let fanout = FanOut::with_max_sockets(2);
    let (a, _a_rx) = session(1);
    let (b, _b_rx) = session(1);
    let (c, _c_rx) = session(1);
    fanout.join(&key(), a.clone()).unwrap();
    fanout.join(&key(), b).unwrap();
    assert_eq!(fanout.join(&key(), c.clone()), Err(ConversationFull));
    assert_eq!(fanout.local_sessions(&key()), 2);
    fanout.leave(&key(), a.id);
    assert_eq!(fanout.join(&key(), c), Ok(false));
}

#[test]
fn leave_reports_the_last_session() {
    let fanout = FanOut::default();
    let (a, _a_rx) = session(1);
    let (b, _b_rx) = session(1);
    fanout.join(&key(), a.clone()).unwrap();
    fanout.join(&key(), b.clone()).unwrap();
    assert!(!fanout.leave(&key(), a.id));
    assert!(fanout.leave(&key(), b.id));
    assert_eq!(fanout.local_sessions(&key()), 0);
}

#[test]
fn an_agents_handle_gets_every_item_wrapped_with_its_conversation() {
    let fanout = FanOut::default();
    let key = ConversationKey::for_test("t", "a");
    let (customer, mut customer_rx) = session(8);
    let (tx, mut agent_rx) = mpsc::channel(8);
    let agent = agent_handle("anna", tx);
    assert!(agent.is_agent() && !customer.is_agent());
    fanout.join(&key, customer).unwrap();
    fanout.join(&key, agent.watching(key.clone())).unwrap();
    fanout.deliver_frames(&key, vec![Utf8Bytes::from_static("delta")], asked(0));
    fanout.resync_all();
    let Outbound::Frames { frames, asked: OwnerEpoch { epoch: 0, .. }, .. } = *customer_rx.try_recv().unwrap() else {
        panic!("a reply's")
    };
    assert_eq!(frames, ["delta"]);
    for expected in ["frame", "resync"] {
        let Outbound::Watched { key: watched, item } = *agent_rx.try_recv().unwrap() else { panic!("wrapped") };
        assert_eq!(watched, key);
        match (expected, *item) {
            ("frame", Outbound::Frames { frames, .. }) => assert_eq!(frames, ["delta"]),
            ("resync", Outbound::Resync) => {}
            (expected, other) => panic!("expected {expected}, got {other:?}"),
        }
    }
    // The agent's own frames (not about a watched conversation) are not wrapped.
    agent.push(Outbound::ephemeral(Utf8Bytes::from_static("pong")));
    assert!(matches!(*agent_rx.try_recv().unwrap(), Outbound::Frame { .. }));
}

#[test]
fn an_owner_change_that_arrives_after_a_later_event_of_this_node_still_fences_and_stops_older_replies() {
    use crate::event::SystemEvent;
    let fanout = FanOut::default();
    let (customer, mut rx) = session(16);
    fanout.join(&key(), customer.clone()).unwrap();
    let asked_at_0 = CancellationToken::new();
    fanout.hold(&key(), asked(0), asked_at_0.clone());
    // This node appended 2 (the customer's message) while another node's
    // takeover, 1, is still on its way: 2 goes on, the writer reads 1 from the log.
    fanout.deliver_event(&key(), epoch(), &customer_event(2), Some(customer.id), None);
    assert_eq!(events(&mut rx), [(2, true)]);
    let mut joined = customer_event(1);
    (joined.from, joined.event, joined.owner_epoch) = (Role::System, Some(SystemEvent::AgentJoined), Some(1));
    IncomingEvents::event(&fanout, &key(), epoch(), &joined, None);
    assert!(rx.try_recv().is_err(), "the sessions have it already");
    assert!(asked_at_0.is_cancelled(), "the reply asked before the takeover stops");
    assert!(
        !fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], asked(0)),
        "its deltas are fenced off"
    );
}

#[test]
fn an_owner_change_fences_off_older_frames_and_stops_older_replies() {
    use crate::event::SystemEvent;
    let fanout = FanOut::default();
    let (customer, mut rx) = session(16);
    let customer_id = customer.id;
    fanout.join(&key(), customer).unwrap();
    let (asked_at_0, later) = (CancellationToken::new(), CancellationToken::new());
    assert!(!fanout.hold(&key(), asked(0), asked_at_0.clone()), "the conversation was here already");
    let delta = Utf8Bytes::from_static("delta");
    assert!(fanout.deliver_frames(&key(), vec![delta.clone()], asked(0)));
    assert!(matches!(*rx.try_recv().unwrap(), Outbound::Frames { asked: OwnerEpoch { epoch: 0, .. }, .. }));
    // The takeover event: delivered, and the reply asked at epoch 0 is told to stop.
    let mut joined = customer_event(1);
    (joined.from, joined.event, joined.owner_epoch) = (Role::System, Some(SystemEvent::AgentJoined), Some(1));
    fanout.deliver_event(&key(), epoch(), &joined, None, None);
    assert!(matches!(*rx.try_recv().unwrap(), Outbound::Event { seq: 1, .. }));
    // Its writer raises its own fence (a customer's is never sent the `owner` frame).
    assert!(matches!(*rx.try_recv().unwrap(), Outbound::Owner { change: OwnerEpoch { epoch: 1, .. }, .. }));
    assert!(asked_at_0.is_cancelled());
    // Older frames are dropped, newer ones pass.
    assert!(!fanout.deliver_frames(&key(), vec![delta.clone()], asked(0)));
    assert!(fanout.deliver_frames(&key(), vec![delta.clone()], asked(1)));
    assert!(matches!(*rx.try_recv().unwrap(), Outbound::Frames { asked: OwnerEpoch { epoch: 1, .. }, .. }));
    assert!(rx.try_recv().is_err());
    // A reply registered under the old epoch now is stopped at once; one under the new is not.
    let late = CancellationToken::new();
    fanout.hold(&key(), asked(0), late.clone());
    fanout.hold(&key(), asked(1), later.clone());
    assert!(late.is_cancelled() && !later.is_cancelled());
    // Holds keep the entry (the node subscribed) after the last socket left.
    assert!(!fanout.leave(&key(), customer_id), "replies still hold it");
    for token in [&asked_at_0, &late] {
        assert!(fanout.unhold_unless_last(&key(), token));
    }
    assert!(!fanout.unhold_unless_last(&key(), &later), "the last hold goes the slow way");
    assert!(fanout.unhold(&key(), &later), "and then the entry goes");
    assert!(fanout.deliver_frames(&key(), vec![delta.clone()], asked(0)), "nothing here any more to fence");
}

#[test]
fn an_owner_change_of_a_recreated_log_takes_over_the_replies_of_the_lost_one() {
    use crate::event::SystemEvent;
    let fanout = FanOut::default();
    let (customer, mut rx) = session(16);
    fanout.join(&key(), customer.clone()).unwrap();
    fanout.deliver_event(&key(), epoch(), &customer_event(1), Some(customer.id), None);
    // Taken over and handed back: the old log is at owner epoch 2.
    for (seq, event) in [(2, SystemEvent::AgentJoined), (3, SystemEvent::AgentLeft)] {
        let mut change = customer_event(seq);
        (change.from, change.event, change.owner_epoch) = (Role::System, Some(event), Some(seq - 1));
        fanout.deliver_event(&key(), epoch(), &change, None, None);
    }
    assert!(!fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], asked(1)));
    // Asked at owner epoch 2 of the old log.
    let old_reply = CancellationToken::new();
    fanout.hold(&key(), asked(2), old_reply.clone());
    // The log is lost and recreated; its owner epochs start again.
    let new = LogEpoch::of("a07c3e91f6d2");
    let in_new = |epoch| OwnerEpoch { log: new, epoch };
    fanout.deliver_event(&key(), new, &customer_event(1), None, None);
    assert!(fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], in_new(0)), "the fence starts again");
    assert!(fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], asked(2)), "no takeover yet");
    assert!(!old_reply.is_cancelled());
    // An agent takes the new log over (its owner epoch 1, below the old reply's 2).
    let mut joined = customer_event(2);
    (joined.from, joined.event, joined.owner_epoch) = (Role::System, Some(SystemEvent::AgentJoined), Some(1));
    fanout.deliver_event(&key(), new, &joined, None, None);
    assert!(old_reply.is_cancelled(), "the lost log's reply stops");
    assert!(!fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], asked(2)), "and is fenced off");
    assert!(fanout.deliver_frames(&key(), vec![Utf8Bytes::from_static("delta")], in_new(1)));
    let late = CancellationToken::new();
    fanout.hold(&key(), asked(3), late.clone());
    assert!(late.is_cancelled(), "a reply of the lost log registered now stops at once");
    let writers_fence: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|item| match *item {
            Outbound::Owner { change, .. } => Some(change),
            _ => None,
        })
        .collect();
    assert_eq!(writers_fence, [asked(1), asked(2), in_new(1)], "each writer learns each change with its log");
}

fn agent_handle(agent: &str, tx: mpsc::Sender<Box<Outbound>>) -> SessionHandle {
    let viewer = crate::protocol::Viewer { agent: agent.into(), name: agent.to_uppercase() };
    SessionHandle::agent(SessionId::next(), tx, SessionCloser::child_of(&CancellationToken::new()), viewer)
}

/// The frames queued for a socket (unwrapped from a watch), as JSON.
fn drain(rx: &mut mpsc::Receiver<Box<Outbound>>) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    while let Ok(item) = rx.try_recv() {
        let item = match *item {
            Outbound::Watched { item, .. } => *item,
            other => other,
        };
        let frame = item.frame().expect("a single frame").clone();
        frames.push(serde_json::from_str(frame.as_str()).unwrap());
    }
    frames
}

#[test]
fn a_conversation_seen_waiting_is_due_once_and_a_later_owner_or_an_older_sighting_changes_that_rightly() {
    let fanout = FanOut::default();
    fanout.saw_owner(&key(), 1, true, 1_000);
    // An older sighting (a list read before the change) changes nothing.
    fanout.saw_owner(&key(), 0, false, 0);
    assert!(fanout.take_waiting_since(999).is_empty(), "not due yet");
    assert_eq!(fanout.take_waiting_since(1_000), vec![(key(), 1, 1_000)]);
    assert!(fanout.take_waiting_since(u64::MAX).is_empty(), "taken once");
    // Waiting again, then taken by an agent: nothing is due.
    fanout.saw_owner(&key(), 3, true, 2_000);
    fanout.saw_owner(&key(), 4, false, 2_500);
    assert!(fanout.take_waiting_since(u64::MAX).is_empty());
}

mod presence;
