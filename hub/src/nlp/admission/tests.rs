//! The admission queue end to end: fairness, places in line, shedding, capacity.

use std::collections::VecDeque;

use super::*;

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn waiting(entry: Result<Entry, QueueFull>) -> Ticket {
    match entry {
        Ok(Entry::Waiting(ticket)) => ticket,
        other => panic!("expected a place in line, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bursting_tenant_does_not_starve_another() {
    let admission = Admission::new(1, 1, 100);
    let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
    let mut burst: VecDeque<_> = (0..5).map(|_| waiting(admission.enter(&tenant("a")))).collect();
    let steady = waiting(admission.enter(&tenant("b")));
    assert_eq!(burst[0].position(), 1);
    assert_eq!(steady.position(), 2, "b is served right after a's first waiter");
    assert_eq!(burst[1].position(), 3);

    drop(running);
    let first = burst.pop_front().unwrap().admitted().await.expect("admitted, not shed");
    assert_eq!(steady.position(), 1);
    drop(first);
    let _second = steady.admitted().await.expect("admitted, not shed");
    assert_eq!(burst[0].position(), 1);
}

#[tokio::test]
async fn places_in_line_follow_the_round_robin_and_move_up_as_slots_free() {
    let admission = Admission::new(1, 1, 100);
    let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
    let a: Vec<_> = (0..3).map(|_| waiting(admission.enter(&tenant("a")))).collect();
    let b = waiting(admission.enter(&tenant("b")));
    let c: Vec<_> = (0..2).map(|_| waiting(admission.enter(&tenant("c")))).collect();
    let places = |a: &[Ticket], b: &Ticket, c: &[Ticket]| {
        (a.iter().map(Ticket::position).collect::<Vec<_>>(), b.position(), c.iter().map(Ticket::position).collect())
    };
    assert_eq!(places(&a, &b, &c), (vec![1, 4, 6], 2, vec![3, 5]));
    drop(running);
    let mut a = a.into_iter();
    let first = a.next().unwrap().admitted().await.expect("admitted, not shed");
    let a: Vec<_> = a.collect();
    // a moved to the back of the ring after its turn: b, c, then a again.
    assert_eq!(places(&a, &b, &c), (vec![3, 5], 1, vec![2, 4]));
    drop(c);
    assert_eq!(places(&a, &b, &[]), (vec![2, 3], 1, vec![]));
    drop(first);
    let _b = b.admitted().await.expect("admitted, not shed");
    assert_eq!(a.iter().map(Ticket::position).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test]
async fn a_tenant_at_its_share_leaves_the_other_slots_to_other_tenants() {
    let admission = Admission::new(4, 2, 100);
    let Ok(Entry::Running(b_running)) = admission.enter(&tenant("b")) else { panic!("b starts") };
    let mut a_running: Vec<_> = (0..2).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    assert!(a_running.iter().all(|entry| matches!(entry, Entry::Running(_))));
    // With b running, a is at its share: its third question waits though a slot is free...
    let a_waiting = waiting(admission.enter(&tenant("a")));
    // ...and b's next question starts at once in that slot.
    let Ok(Entry::Running(_b_second)) = admission.enter(&tenant("b")) else { panic!("b starts at once") };
    let b_waiting = waiting(admission.enter(&tenant("b")));
    // One of a's calls ends: a is below its share again; round robin
    // serves a first (it waited first), and b's waiter stays in line.
    drop(a_running.remove(0));
    let _a = a_waiting.admitted().await.expect("admitted, not shed");
    assert_eq!(b_waiting.position(), 1);
    drop(b_running);
    let _b = b_waiting.admitted().await.expect("admitted, not shed");
}

#[tokio::test(start_paused = true)]
async fn a_tenant_alone_may_use_every_slot_until_another_tenant_comes() {
    let admission = Admission::new(4, 2, 100);
    let alone: Vec<_> = (0..4).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    assert!(alone.iter().all(|entry| matches!(entry, Entry::Running(_))), "alone, a takes all four slots");
    drop(alone);
    let b = admission.enter(&tenant("b")).unwrap();
    drop(b);
    // b has no call running, but asked recently: a is held to its share.
    let a: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    assert!(matches!(a[1], Entry::Running(_)), "a's share is 2");
    assert!(matches!(a[2], Entry::Waiting(_)), "with b active, a waits beyond its share: {:?}", a[2]);
    drop(a);
    // Once b has been quiet for the window, a is alone again.
    tokio::time::advance(ACTIVE_WINDOW).await;
    let a: Vec<_> = (0..4).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    assert!(a.iter().all(|entry| matches!(entry, Entry::Running(_))), "alone again: {a:?}");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_admitted_once_its_tenant_is_alone_and_a_newer_question_does_not_pass_it() {
    let admission = Admission::new(4, 2, 100);
    drop(admission.enter(&tenant("b")).unwrap());
    let _a_running: Vec<_> = (0..2).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    let waiter = waiting(admission.enter(&tenant("a")));
    tokio::time::advance(ACTIVE_WINDOW).await;
    // b fell quiet: a may use every slot, and its waiter goes first.
    assert_eq!(waiter.position(), 0, "admitted when it asked its place");
    let newer = admission.enter(&tenant("a")).unwrap();
    assert!(matches!(newer, Entry::Running(_)), "{newer:?}");
    let _waiter = waiter.admitted().await.expect("admitted, not shed");
    assert!(matches!(admission.enter(&tenant("a")).unwrap(), Entry::Waiting(_)), "all four slots taken");
}

#[tokio::test]
async fn a_full_line_makes_room_for_a_shorter_line_by_refusing_the_longest_lines_newest() {
    let admission = Admission::new(1, 1, 3);
    let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
    let a: Vec<_> = (0..3).map(|_| waiting(admission.enter(&tenant("a")))).collect();
    assert_eq!(admission.enter(&tenant("a")).unwrap_err(), QueueFull, "a's own line is the longest");
    let b = waiting(admission.enter(&tenant("b")));
    let mut a = a.into_iter();
    let (first, second, mut newest) = (a.next().unwrap(), a.next().unwrap(), a.next().unwrap());
    assert!((&mut newest.admitted).await.is_err(), "a's newest waiter was refused to make room");
    // Lines of 2 (a) and 1 (b): b may not push out another of a's.
    assert_eq!(admission.enter(&tenant("b")).unwrap_err(), QueueFull);
    assert_eq!((first.position(), b.position(), second.position()), (1, 2, 3));
    drop(running);
    let _first = first.admitted().await.expect("admitted, not shed");
}

#[tokio::test]
async fn an_admitted_ticket_dropped_unused_passes_its_slot_on() {
    let admission = Admission::new(1, 1, 10);
    let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!() };
    let abandoned = waiting(admission.enter(&tenant("a")));
    let next = waiting(admission.enter(&tenant("b")));
    drop(running);
    drop(abandoned);
    let _permit = next.admitted().await.expect("admitted, not shed");
}

#[test]
fn the_queue_is_bounded_and_leaving_frees_a_place() {
    let admission = Admission::new(1, 1, 2);
    let _running = admission.enter(&tenant("a")).unwrap();
    let first = waiting(admission.enter(&tenant("a")));
    let second = waiting(admission.enter(&tenant("b")));
    assert_eq!(admission.enter(&tenant("c")).unwrap_err(), QueueFull);
    drop(first);
    assert_eq!(second.position(), 1);
    assert!(admission.enter(&tenant("c")).is_ok());
}

#[tokio::test]
async fn a_lowered_capacity_holds_new_calls_back_until_running_calls_end_and_a_raised_one_admits() {
    let admission = Admission::new(4, 4, 10);
    let mut running: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    admission.set_capacity(2);
    let waiter = waiting(admission.enter(&tenant("a")));
    drop(running.pop());
    assert_eq!(waiter.position(), 1, "two still running: at capacity");
    admission.set_capacity(3);
    let _permit = waiter.admitted().await.expect("a raised capacity admits at once");
    admission.set_capacity(100);
    assert_eq!(admission.capacity(), 4, "never above max_concurrent");
}

#[test]
fn the_tenant_share_scales_with_the_capacity() {
    let admission = Admission::new(8, 4, 10);
    admission.set_capacity(4);
    let _b = admission.enter(&tenant("b")).unwrap();
    let a: Vec<_> = (0..3).map(|_| admission.enter(&tenant("a")).unwrap()).collect();
    assert!(matches!(a[1], Entry::Running(_)), "{a:?}");
    assert!(matches!(a[2], Entry::Waiting(_)), "a's share of 4 slots is 2 (4 of 8), though one is free: {a:?}");
}

#[tokio::test]
async fn a_question_that_lost_its_slot_goes_back_to_the_front_of_its_line() {
    let admission = Admission::new(1, 1, 10);
    let Ok(Entry::Running(running)) = admission.enter(&tenant("a")) else { panic!("a slot") };
    let newer = waiting(admission.enter(&tenant("a")));
    let returning = waiting(admission.reenter(&tenant("a")));
    assert_eq!((returning.position(), newer.position()), (1, 2));
    drop(running);
    let permit = returning.admitted().await.expect("admitted first");
    assert_eq!(newer.position(), 1);
    drop(permit);
    // With a free slot and nobody ahead, it runs at once.
    let admission = Admission::new(2, 2, 10);
    let _running = admission.enter(&tenant("a")).unwrap();
    assert!(matches!(admission.reenter(&tenant("a")), Ok(Entry::Running(_))));
}

#[tokio::test]
async fn a_slot_freed_while_nobody_waits_is_reused() {
    let admission = Admission::new(1, 1, 1);
    let Ok(Entry::Running(permit)) = admission.enter(&tenant("a")) else { panic!() };
    drop(permit);
    assert!(matches!(admission.enter(&tenant("a")), Ok(Entry::Running(_))));
}
