//! The fan-out's part in presence and typing.

use std::time::Duration;

use super::*;
use crate::presence::{Typing, Typist};

#[test]
fn typing_reaches_whom_it_may_and_expires_by_itself() {
    let fanout = FanOut::default().with_typing_ttl(Duration::from_millis(20));
    let key = ConversationKey::for_test("t", "a");
    let (customer, mut customer_rx) = session(16);
    let customer_id = customer.id;
    let ((anna_tx, mut anna_rx), (bob_tx, mut bob_rx)) = (mpsc::channel(16), mpsc::channel(16));
    let (anna, bob) = (agent_handle("anna", anna_tx), agent_handle("bob", bob_tx));
    fanout.join(&key, customer).unwrap();
    fanout.note_exists(&key);
    fanout.join(&key, anna.watching(key.clone())).unwrap();
    fanout.join(&key, bob.watching(key.clone())).unwrap();
    let present = drain(&mut anna_rx);
    assert_eq!(present.len(), 1, "anna is told bob came: {present:?}");
    assert_eq!(present[0]["type"], "presence");
    assert_eq!(present[0]["online"], true);
    assert_eq!(
        present[0]["viewers"],
        serde_json::json!([{"agent": "anna", "name": "ANNA"}, {"agent": "bob", "name": "BOB"}])
    );
    assert!(drain(&mut bob_rx).is_empty(), "bob learns it from his snapshot");

    // The customer types: both agents see it, the customer's socket does not get it back.
    let customer_typing = Typing { typist: Typist::Customer, on: true, note: false, to_customer: false };
    fanout.deliver_typing(&key, &customer_typing, Some(customer_id));
    fanout.deliver_typing(&key, &customer_typing, Some(customer_id));
    for rx in [&mut anna_rx, &mut bob_rx] {
        let frames = drain(rx);
        assert_eq!(
            frames,
            [
                serde_json::json!({"type": "typing", "conversation": key.conversation().as_str(), "from": "customer", "on": true})
            ],
            "a repeat only extends it"
        );
    }
    // Anna types a note: bob sees it as a note, the customer never.
    let anna_as = Typist::Agent { agent: "anna".into(), name: "ANNA".into() };
    let note = Typing { typist: anna_as.clone(), on: true, note: true, to_customer: false };
    fanout.deliver_typing(&key, &note, Some(anna.id));
    assert_eq!(drain(&mut bob_rx)[0]["note"], true);
    assert!(drain(&mut anna_rx).is_empty() && drain(&mut customer_rx).is_empty());
    // Now a message as the owner: the customer sees the name, not the id.
    let owner = Typing { typist: anna_as, on: true, note: false, to_customer: true };
    fanout.deliver_typing(&key, &owner, Some(anna.id));
    assert_eq!(
        drain(&mut customer_rx),
        [
            serde_json::json!({"type": "typing", "conversation": key.conversation().as_str(), "from": "agent", "name": "ANNA", "on": true})
        ]
    );
    assert_eq!(drain(&mut bob_rx).len(), 1);
    // Nobody sends again: each stops by itself, told once.
    std::thread::sleep(Duration::from_millis(30));
    fanout.expire_typing();
    let stopped = drain(&mut bob_rx);
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    assert!(stopped.iter().all(|frame| frame["on"] == false), "{stopped:?}");
    assert_eq!(
        drain(&mut customer_rx),
        [
            serde_json::json!({"type": "typing", "conversation": key.conversation().as_str(), "from": "agent", "name": "ANNA", "on": false})
        ]
    );
    assert_eq!(
        drain(&mut anna_rx),
        [
            serde_json::json!({"type": "typing", "conversation": key.conversation().as_str(), "from": "customer", "on": false})
        ]
    );
    fanout.expire_typing();
    assert!(drain(&mut bob_rx).is_empty());

    // The customer leaves: the agents are told, and the entry is marked for the board.
    fanout.take_changed_presence();
    fanout.leave(&key, customer_id);
    assert_eq!(drain(&mut anna_rx)[0]["online"], false);
    assert_eq!(drain(&mut bob_rx)[0]["online"], false);
    let changed = fanout.take_changed_presence();
    assert_eq!(changed.len(), 1);
    assert!(!changed[0].1.online && changed[0].1.viewers.len() == 2);
}

#[test]
fn the_customer_typing_here_is_in_this_nodes_presence_entry_until_it_stops_or_expires() {
    let fanout = FanOut::default().with_typing_ttl(Duration::from_millis(20));
    let (customer, _rx) = session(16);
    let id = customer.id;
    fanout.join(&key(), customer).unwrap();
    fanout.note_exists(&key());
    fanout.take_changed_presence();
    let typing = Typing { typist: Typist::Customer, on: true, note: false, to_customer: false };
    // Heard from another node: not this node's to tell.
    fanout.deliver_typing(&key(), &typing, None);
    assert!(!fanout.local_entry(&key()).typing);
    fanout.deliver_typing(&key(), &typing.stopped(), None);
    fanout.deliver_typing(&key(), &typing, Some(id));
    assert!(fanout.local_entry(&key()).typing);
    assert_eq!(fanout.take_changed_presence().len(), 1, "a change to write");
    fanout.deliver_typing(&key(), &typing, Some(id));
    assert!(fanout.take_changed_presence().is_empty(), "a repeat is no change");
    std::thread::sleep(Duration::from_millis(30));
    fanout.expire_typing();
    assert!(!fanout.local_entry(&key()).typing);
    assert_eq!(fanout.take_changed_presence().len(), 1, "the expiry is a change");
}

#[test]
fn a_conversation_keeps_no_presence_entry_until_it_exists() {
    let fanout = FanOut::default();
    let (customer, _rx) = session(16);
    let id = customer.id;
    // A fresh conversation: nothing can list or watch it yet.
    fanout.join(&key(), customer).unwrap();
    let typing = Typing { typist: Typist::Customer, on: true, note: false, to_customer: false };
    fanout.deliver_typing(&key(), &typing, Some(id));
    assert!(fanout.take_changed_presence().is_empty(), "nothing to write");
    assert!(fanout.presence_entries().is_empty(), "nothing to refresh");
    // Its first event creates it: the entry is written from then on.
    fanout.deliver_event(&key(), epoch(), &customer_event(1), Some(id), None);
    let changed = fanout.take_changed_presence();
    assert_eq!(changed.len(), 1);
    assert!(changed[0].1.online && changed[0].1.typing);
    assert_eq!(fanout.presence_entries().len(), 1);
    fanout.leave(&key(), id);
    assert_eq!(fanout.take_changed_presence(), [(key(), Present::default())], "its removal is written");

    // A socket of a conversation that never existed leaves nothing to remove.
    let (customer, _rx) = session(16);
    let id = customer.id;
    fanout.join(&key(), customer).unwrap();
    fanout.leave(&key(), id);
    assert!(fanout.take_changed_presence().is_empty());
}

#[test]
fn an_entry_left_then_joined_again_before_it_was_written_is_removed() {
    let fanout = FanOut::default();
    let (customer, _rx) = session(16);
    let id = customer.id;
    fanout.join(&key(), customer).unwrap();
    fanout.note_exists(&key());
    fanout.take_changed_presence();
    fanout.leave(&key(), id);
    // A new socket of it arrives before the removal is written; its own
    // entry waits for its snapshot, the old one goes.
    let (again, _rx) = session(16);
    fanout.join(&key(), again).unwrap();
    assert_eq!(fanout.take_changed_presence(), [(key(), Present::default())]);
    fanout.note_exists(&key());
    let changed = fanout.take_changed_presence();
    assert!(changed.len() == 1 && changed[0].1.online, "{changed:?}");
}
