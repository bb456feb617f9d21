//! The in-memory log's tests, run through [`Conversations`] as the hub
//! composes it on a single node.

use super::*;
use crate::bus::LocalBus;
use crate::conversations::Conversations;
use crate::fanout::SessionHandle;
use crate::ids::SessionId;
use crate::ids::TenantId;

fn config(log_cap: usize, max_created_per_user: u32) -> ConversationConfig {
    ConversationConfig {
        log_cap,
        idle_window_ms: 60_000,
        retention_secs: 3600,
        max_created_per_user,
        ..ConversationConfig::default()
    }
}

/// A single node: the log under test, composed as the hub composes it.
struct Node {
    log: Arc<MemoryLog>,
    fanout: Arc<FanOut>,
    composed: Conversations,
}

impl std::ops::Deref for Node {
    type Target = MemoryLog;

    fn deref(&self) -> &MemoryLog {
        &self.log
    }
}

impl Node {
    fn new(config: &ConversationConfig) -> Self {
        let (log, fanout) = (Arc::new(MemoryLog::new(config)), Arc::new(FanOut::default()));
        let composed =
            Conversations::new(log.clone(), Arc::new(LocalBus), fanout.clone(), Arc::new(crate::presence::LocalBoard));
        Self { log, fanout, composed }
    }

    async fn open(&self, t: &TenantId, u: &UserId, c: Option<&ConversationId>) -> Result<Opened, StoreError> {
        self.composed.open(&Party { tenant: t.clone(), user: u.clone() }, c).await
    }

    async fn append(
        &self,
        key: &ConversationKey,
        event: NewEvent,
        origin: Option<SessionId>,
        create: Option<&Pending>,
    ) -> Result<Outcome, StoreError> {
        let with = AppendWith { create, ..AppendWith::default() };
        self.composed.append(key, event, origin, with).await.map(|appended| match appended {
            Appended::New { event, .. } => Outcome::New(event.seq),
            Appended::Duplicate(seq) => Outcome::Duplicate(seq),
        })
    }

    async fn attach(
        &self,
        key: &ConversationKey,
        session: SessionHandle,
        after: Option<u64>,
        pending: Option<&Pending>,
    ) -> Result<Snapshot, StoreError> {
        self.composed.attach(key, session, after, pending).await
    }

    async fn detach(&self, key: &ConversationKey, session: SessionId) {
        self.composed.detach(key, session).await
    }

    async fn touch(&self, user: &UserId, key: &ConversationKey) {
        self.composed.touch(user, key).await
    }

    fn sweep(&self, now_ms: u64) -> usize {
        self.log.sweep(now_ms, |key| self.fanout.local_sessions(key) > 0)
    }
}

/// An append's outcome, by seq.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    New(u64),
    Duplicate(u64),
}

fn backend(log_cap: usize) -> Node {
    Node::new(&config(log_cap, 20))
}

fn session() -> (SessionHandle, tokio::sync::mpsc::Receiver<Box<crate::fanout::Outbound>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let closer = crate::fanout::SessionCloser::child_of(&CancellationToken::new());
    (SessionHandle::customer(SessionId::next(), tx, closer), rx)
}

/// Opens a new conversation for `user` and stores a first message in it.
async fn started(backend: &Node, tenant: &TenantId, user: &UserId) -> ConversationKey {
    let opened = backend.open(tenant, user, None).await.unwrap();
    let first = NewEvent::customer("m0".into(), "hi".into());
    backend.append(&opened.key, first, None, opened.pending.as_ref()).await.unwrap();
    opened.key
}

#[tokio::test]
async fn a_resent_message_is_a_duplicate_while_it_is_in_the_log() {
    let backend = backend(3);
    let opened = backend.open(&TenantId::parse("t").unwrap(), &UserId::parse("u").unwrap(), None).await.unwrap();
    let key = opened.key;
    let first = NewEvent::customer("m1".into(), "hi".into());
    assert_eq!(backend.append(&key, first, None, opened.pending.as_ref()).await.unwrap(), Outcome::New(1));
    let send = |id: &str| backend.append(&key, NewEvent::customer(id.into(), "hi".into()), None, None);
    assert_eq!(send("m2").await.unwrap(), Outcome::New(2));
    assert_eq!(send("m1").await.unwrap(), Outcome::Duplicate(1));
    // An assistant event with a customer's id is not a customer message.
    let reply = NewEvent { from: Role::Assistant, ..NewEvent::customer("m2".into(), "answer".into()) };
    assert_eq!(backend.append(&key, reply, None, None).await.unwrap(), Outcome::New(3));
    assert_eq!(send("m2").await.unwrap(), Outcome::Duplicate(2));
    // m1 and m2 fall out of the capped log; m1 is new again, m4's index entry stays.
    assert_eq!(send("m4").await.unwrap(), Outcome::New(4));
    assert_eq!(send("m5").await.unwrap(), Outcome::New(5));
    assert_eq!(send("m1").await.unwrap(), Outcome::New(6));
    assert_eq!(send("m4").await.unwrap(), Outcome::Duplicate(4));
    let ids: Vec<_> = backend.events_after(&key, 0).await.unwrap().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, ["m4", "m5", "m1"]);
}

#[tokio::test]
async fn a_socket_that_never_sends_leaves_nothing_behind() {
    let backend = backend(10);
    let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
    for _ in 0..3 {
        let opened = backend.open(&tenant, &user, None).await.unwrap();
        let pending = opened.pending.expect("a new conversation is pending");
        let (handle, _rx) = session();
        let id = handle.id;
        let snapshot = backend.attach(&opened.key, handle, Some(0), Some(&pending)).await.unwrap();
        assert_eq!((snapshot.exists, snapshot.last_seq, snapshot.epoch.as_str()), (false, 0, pending.epoch.as_str()));
        // Not resumable by id: it does not exist.
        let resumed = backend.open(&tenant, &user, Some(opened.key.conversation())).await;
        assert!(matches!(resumed, Err(StoreError::ConversationNotFound)));
        backend.detach(&opened.key, id).await;
        backend.touch(&user, &opened.key).await;
    }
    assert_eq!((backend.conversations.len(), backend.users.latest.len(), backend.users.created.len()), (0, 0, 0));
    assert_eq!(
        backend.fanout.local_sessions(
            &Party { tenant, user: UserId::parse("nobody").unwrap() }.conversation(ConversationId::generate())
        ),
        0
    );
}

#[tokio::test]
async fn the_first_message_creates_the_conversation_with_the_announced_epoch() {
    let backend = backend(10);
    let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
    let opened = backend.open(&tenant, &user, None).await.unwrap();
    let pending = opened.pending.clone().unwrap();
    // Another user cannot take it over by naming it, nor create it with another epoch.
    let thief = Pending::fresh(&UserId::parse("mallory").unwrap());
    let key = started(&backend, &tenant, &user).await;
    assert_ne!(key, opened.key, "the second open got its own new id: nothing pointed to the first");
    let first = NewEvent::customer("m1".into(), "hi".into());
    assert_eq!(backend.append(&opened.key, first.clone(), None, Some(&pending)).await.unwrap(), Outcome::New(1));
    let stolen = backend.append(&opened.key, first.clone(), None, Some(&thief)).await;
    assert!(matches!(stolen, Err(StoreError::ConversationNotFound)));
    // The creator's resend (its first ack lost) is recognised.
    assert_eq!(backend.append(&opened.key, first, None, Some(&pending)).await.unwrap(), Outcome::Duplicate(1));
    let (handle, _rx) = session();
    let snapshot = backend.attach(&opened.key, handle, None, None).await.unwrap();
    assert_eq!((snapshot.exists, snapshot.last_seq, snapshot.epoch), (true, 1, pending.epoch));
    // The latest created conversation is the user's most recent.
    assert_eq!(backend.open(&tenant, &user, None).await.unwrap().key, opened.key);
}

#[tokio::test]
async fn creations_beyond_the_cap_are_refused_for_that_user_only() {
    let backend = Node::new(&config(10, 2));
    let tenant = TenantId::parse("t").unwrap();
    let (greedy, other) = (UserId::parse("greedy").unwrap(), UserId::parse("other").unwrap());
    for _ in 0..2 {
        let opened = backend.open(&tenant, &greedy, None).await.unwrap();
        let first = NewEvent::customer("m1".into(), "hi".into());
        backend.append(&opened.key, first, None, opened.pending.as_ref()).await.unwrap();
        backend.users.latest.clear(); // as if the idle window had passed
    }
    let opened = backend.open(&tenant, &greedy, None).await.unwrap();
    let first = NewEvent::customer("m1".into(), "hi".into());
    let refused = backend.append(&opened.key, first, None, opened.pending.as_ref()).await;
    assert!(matches!(refused, Err(StoreError::TooManyConversations { max: 2, window_secs: 3600 })), "{refused:?}");
    assert!(matches!(backend.events_after(&opened.key, 0).await, Err(StoreError::ConversationNotFound)));
    started(&backend, &tenant, &other).await;
    // Past the window the user may create again, and the sweeper forgets the count.
    assert_eq!(backend.users.created.len(), 2);
    backend.sweep(now_ms() + 3_600_001);
    assert_eq!(backend.users.created.len(), 0);
}

#[tokio::test]
async fn conversations_past_their_retention_are_forgotten_unless_a_socket_is_open() {
    let backend = backend(10);
    let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
    let idle = started(&backend, &tenant, &user).await;
    let watched = started(&backend, &tenant, &UserId::parse("w").unwrap()).await;
    let (handle, _rx) = session();
    backend.attach(&watched, handle, None, None).await.unwrap();

    // Within the hour nothing goes.
    assert_eq!(backend.sweep(now_ms() + 59 * 60 * 1000), 0);
    assert_eq!(backend.events_after(&idle, 0).await.unwrap().len(), 1);
    // Past it, the idle conversation and the user's pointer to it go; the watched one stays.
    assert_eq!(backend.sweep(now_ms() + 61 * 60 * 1000), 1);
    assert!(matches!(backend.events_after(&idle, 0).await, Err(StoreError::ConversationNotFound)));
    assert!(matches!(
        backend.open(&tenant, &user, Some(idle.conversation())).await,
        Err(StoreError::ConversationNotFound)
    ));
    assert!(backend.events_after(&watched, 0).await.is_ok());
    // The user starts a new conversation, not a dangling one.
    let fresh = started(&backend, &tenant, &user).await;
    assert_ne!(fresh, idle);
    assert!(backend.events_after(&fresh, 0).await.is_ok());
}

#[tokio::test]
async fn an_append_returns_the_newest_turns_before_it_and_records_the_users_activity() {
    let backend = backend(100);
    let (tenant, user) = (TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
    let key = started(&backend, &tenant, &user).await;
    for (seq, from) in [(2, Role::Assistant), (3, Role::Customer), (4, Role::Agent)] {
        let event = NewEvent { from, ..NewEvent::customer(format!("m{seq}"), format!("t{seq}")) };
        backend.append(&key, event, None, None).await.unwrap();
    }
    let latest = |backend: &Node| backend.users.latest.get(&(tenant.clone(), user.clone())).unwrap().last_active_ms;
    let before = latest(&backend);
    std::thread::sleep(std::time::Duration::from_millis(2));
    let question = NewEvent::customer("m5".into(), "t5".into());
    let with = AppendWith { active_user: Some(&user), turns_before: 3, ..AppendWith::default() };
    let Appended::New { event, turns_before, .. } = backend.log.append(&key, question, with).await.unwrap() else {
        panic!("stored")
    };
    assert_eq!(event.seq, 5);
    let turns: Vec<_> = turns_before.iter().map(|e| (e.seq, e.from, e.text.as_str())).collect();
    assert_eq!(turns, [(2, Role::Assistant, "t2"), (3, Role::Customer, "t3"), (4, Role::Agent, "t4")]);
    assert!(latest(&backend) > before, "the append recorded the user's activity");
    let reply = NewEvent { from: Role::Assistant, ..NewEvent::customer("r".into(), "a".into()) };
    let Appended::New { turns_before, .. } = backend.log.append(&key, reply, AppendWith::default()).await.unwrap()
    else {
        panic!("stored")
    };
    assert!(turns_before.is_empty(), "none asked for, none read");
}

#[tokio::test]
async fn the_owner_changes_only_by_compare_and_set_and_fences_agents_writes() {
    use crate::event::SystemEvent;
    use crate::owner::Owner;
    use crate::store::OwnerOp;
    let backend = backend(100);
    let key = started(&backend, &TenantId::parse("t").unwrap(), &UserId::parse("u").unwrap()).await;
    let anna = Owner::Agent { id: "anna".into(), name: "Anna".into() };
    let bob = Owner::Agent { id: "bob".into(), name: "Bob".into() };
    let change = |expected, to| AppendWith { owner: OwnerOp::Change { expected, to }, ..AppendWith::default() };
    let joined = |agent: &str| NewEvent::system(SystemEvent::AgentJoined, Some((agent, agent)));
    // From epoch 0: exactly one of two takes at epoch 0 wins.
    let Appended::New { event, ownership, .. } =
        backend.log.append(&key, joined("anna"), change(0, &anna)).await.unwrap()
    else {
        panic!("stored")
    };
    assert_eq!((ownership.owner, ownership.epoch, event.owner_epoch), (anna.clone(), 1, Some(1)));
    let Err(StoreError::OwnerChanged(now)) = backend.log.append(&key, joined("bob"), change(0, &bob)).await else {
        panic!("a stale compare-and-set is refused")
    };
    assert_eq!((now.owner, now.epoch), (anna.clone(), 1));
    // Fenced writes: the owner under its epoch only.
    let fence = |agent, epoch| AppendWith { owner: OwnerOp::Fence { agent, epoch }, ..AppendWith::default() };
    let said = |id: &str| NewEvent::agent(id.into(), "hello".into(), "anna", "Anna");
    assert!(backend.log.append(&key, said("a1"), fence("anna", Some(1))).await.is_ok());
    assert!(backend.log.append(&key, said("a2"), fence("anna", None)).await.is_ok());
    assert!(matches!(backend.log.append(&key, said("a3"), fence("bob", None)).await, Err(StoreError::OwnerChanged(_))));
    // Bob steals (at the epoch he read): anna's epoch is stale even if she takes it back.
    backend.log.append(&key, joined("bob"), change(1, &bob)).await.unwrap();
    backend.log.append(&key, joined("anna"), change(2, &anna)).await.unwrap();
    assert!(matches!(
        backend.log.append(&key, said("a4"), fence("anna", Some(1))).await,
        Err(StoreError::OwnerChanged(_))
    ));
    let snapshot = backend.log.snapshot(&key, Some(0)).await.unwrap().unwrap();
    assert_eq!((snapshot.ownership.owner, snapshot.ownership.epoch), (anna, 3));
    let stored: Vec<_> = snapshot.missed.iter().map(|e| (e.from, e.owner_epoch)).collect();
    assert_eq!(
        stored,
        [
            (Role::Customer, None),
            (Role::System, Some(1)),
            (Role::Agent, None),
            (Role::Agent, None),
            (Role::System, Some(2)),
            (Role::System, Some(3))
        ],
        "refused writes stored nothing"
    );
}
