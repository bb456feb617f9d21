//! The randomized tenant isolation trial: four tenants in jwt mode (real
//! HS256, RS256, ES256 and EdDSA keys), the same user names in every
//! tenant, three hub nodes on one real Redis, and random traffic from every
//! user: messages (some cancelled), reconnects to another node replaying
//! the whole conversation (`after=0`), new conversations, watcher sockets on
//! other nodes, and attempts to open other tenants' (and other users')
//! conversations with one's own token; and, for every tenant, an agent
//! writing private notes into that tenant's conversations.
//!
//! Every frame every socket receives is checked: its conversation is the
//! socket's, owned by the socket's tenant and user; every text carries no
//! other tenant's marker (each tenant's messages embed a random per-tenant
//! marker), and every customer message is the socket's own user's; a reply
//! id is only ever seen by one tenant and user; no customer's socket ever
//! gets a note (nor a note's text), and an agent only its own tenant's. Every foreign attempt gets
//! exactly the bytes a made-up conversation id gets (`error`
//! `conversation_not_found`, then close 4004): no hint that it exists.
//!
//! The trial runs until at least [`TARGET_FRAMES`] frames were checked and
//! prints that count and its seed; `FENGDA_TRIAL_SEED=<seed>` replays each
//! user's choices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use fengda_tests::tokens::{KeyDir, Signer, claims, toml_path};
use fengda_tests::{Hub, RedisServer, STEP_TIMEOUT};

/// Frames to check before the trial ends.
const TARGET_FRAMES: u64 = 100_000;
/// The trial fails if it has not checked its frames by then.
const DEADLINE: Duration = Duration::from_secs(60);
const USERS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
/// In every note's text, and in no customer's text.
const NOTE_MARK: &str = "private-note";
const QUESTIONS: [&str; 8] = [
    "Tell me about the Gold Card",
    "How much does it cost?",
    "I lost my card",
    "What are your opening hours?",
    "How do I reset my password?",
    "Can I get a refund?",
    "hello",
    "Do you have a student account?",
];

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Who a socket is: indexes into the trial's tenants and [`USERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Party {
    tenant: usize,
    user: usize,
}

struct Tenant {
    name: &'static str,
    /// Random, embedded in every message text and id of this tenant.
    marker: String,
    alg: Algorithm,
    kid: Option<&'static str>,
    signer: Signer,
}

/// What every socket checks against, shared by all users' tasks.
struct Trial {
    tenants: Vec<Tenant>,
    nodes: Vec<String>,
    /// One token per party, signed once.
    tokens: HashMap<Party, String>,
    /// conversation id → its owner, from the `ready` that gave it.
    owners: Mutex<HashMap<String, Party>>,
    /// reply id → the party whose conversation it streamed in.
    replies: Mutex<HashMap<String, Party>>,
    /// Conversations with a stored message, for the foreign attempts.
    stored: Mutex<Vec<(Party, String)>>,
    /// What a made-up conversation id gets: the error frame's text, the close code and reason.
    refusal: Mutex<Option<(String, u16, String)>>,
    frames: AtomicU64,
    foreign_attempts: AtomicU64,
    other_user_attempts: AtomicU64,
    made_up_attempts: AtomicU64,
    messages: AtomicU64,
    cancels: AtomicU64,
    replays: AtomicU64,
    watchers: AtomicU64,
    notes: AtomicU64,
}

impl Trial {
    fn ws_url(&self, node: usize, party: Party, query: &str) -> String {
        format!("{}/ws?token={}{query}", self.nodes[node], self.tokens[&party])
    }

    /// Checks one frame received by `party`'s socket on `conversation` and returns it.
    fn check(&self, party: Party, conversation: &str, text: &str) -> Value {
        self.frames.fetch_add(1, Ordering::Relaxed);
        let frame: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let kind = frame["type"].as_str().unwrap_or_else(|| panic!("no type: {text}"));
        let own = &self.tenants[party.tenant];
        for (i, tenant) in self.tenants.iter().enumerate() {
            assert!(
                i == party.tenant || !text.contains(&tenant.marker),
                "{} of {} received {}'s marker: {text}",
                USERS[party.user],
                own.name,
                tenant.name
            );
        }
        if let Some(id) = frame["conversation"].as_str() {
            assert_eq!(id, conversation, "{party:?}: a frame of another conversation: {text}");
        }
        assert!(kind != "note" && !text.contains(NOTE_MARK), "{party:?}, a customer, received a note: {text}");
        match kind {
            "ready" => {
                let id = frame["conversation"].as_str().expect("ready.conversation").to_owned();
                let owner = *self.owners.lock().unwrap().entry(id).or_insert(party);
                assert_eq!(owner, party, "ready gave {party:?} a conversation of {owner:?}: {text}");
            }
            "message" if frame["from"] == "customer" => {
                let prefix = format!("{}/{} ", own.marker, USERS[party.user]);
                let said = frame["text"].as_str().expect("message text");
                assert!(said.starts_with(&prefix), "{party:?} received another party's message: {text}");
                assert!(frame["id"].as_str().unwrap().starts_with(&self.message_id_prefix(party)), "{text}");
            }
            "ack" => assert!(frame["id"].as_str().unwrap().starts_with(&self.message_id_prefix(party)), "{text}"),
            _ => {}
        }
        let reply = match kind {
            "message" if frame["from"] == "assistant" => frame["id"].as_str(),
            "queued" | "reply.delta" | "reply.done" => frame["reply"].as_str(),
            _ => None,
        };
        if let Some(reply) = reply {
            let owner = *self.replies.lock().unwrap().entry(reply.to_owned()).or_insert(party);
            assert_eq!(owner, party, "{party:?} received a reply of {owner:?}: {text}");
        }
        frame
    }

    fn message_id_prefix(&self, party: Party) -> String {
        format!("{}-{}-", self.tenants[party.tenant].marker, USERS[party.user])
    }
}

/// One socket of a party on one conversation, checking every frame.
struct Socket {
    ws: Ws,
    party: Party,
    conversation: String,
    ready: Value,
    /// Replies this socket has whole (a `reply.done`, or the assistant's
    /// `message` in a replay): protocol §8 rule 7, their deltas are dropped.
    finished: std::collections::HashSet<String>,
}

impl Socket {
    async fn open(trial: &Trial, node: usize, party: Party, query: &str) -> Socket {
        let url = trial.ws_url(node, party, query);
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap_or_else(|e| panic!("{party:?} {query}: {e}"));
        let mut socket =
            Socket { ws, party, conversation: String::new(), ready: Value::Null, finished: Default::default() };
        let first = socket.raw().await.expect("a first frame");
        let ready: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(ready["type"], "ready", "{party:?} {query}: {first}");
        socket.conversation = ready["conversation"].as_str().unwrap().to_owned();
        trial.check(party, &socket.conversation, &first);
        socket.ready = ready;
        socket
    }

    /// The next text frame, or the close frame's (code, reason) as an error.
    async fn raw(&mut self) -> Result<String, (u16, String)> {
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{:?}: no frame within the step timeout", self.party))
                .unwrap_or_else(|| panic!("{:?}: the socket ended without a close frame", self.party))
                .unwrap_or_else(|e| panic!("{:?}: {e}", self.party));
            match message {
                Message::Text(text) => return Ok(text.as_str().to_owned()),
                Message::Close(frame) => {
                    let frame = frame.expect("a close frame with a code");
                    return Err((u16::from(frame.code), frame.reason.as_str().to_owned()));
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("{:?}: unexpected {other:?}", self.party),
            }
        }
    }

    async fn next(&mut self, trial: &Trial) -> Value {
        let text = self.raw().await.unwrap_or_else(|close| panic!("{:?}: closed {close:?}", self.party));
        let frame = trial.check(self.party, &self.conversation, &text);
        let finished = match frame["type"].as_str() {
            Some("message") if frame["from"] == "assistant" => frame["id"].as_str(),
            Some("reply.done") => frame["reply"].as_str(),
            _ => None,
        };
        if let Some(reply) = finished {
            self.finished.insert(reply.to_owned());
        }
        frame
    }

    async fn send(&mut self, frame: Value) {
        self.ws.send(Message::text(frame.to_string())).await.expect("send");
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Reads a watcher socket until told to stop, checking every frame.
async fn watch(trial: Arc<Trial>, mut socket: Socket, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            message = socket.ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    trial.check(socket.party, &socket.conversation, text.as_str());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("{:?}: watcher got {other:?}", socket.party),
            },
        }
    }
    socket.close().await;
}

/// A tenant's agent writing notes into the tenant's stored conversations
/// (from a random node) until the trial has its frames; every frame it gets
/// is its own tenant's.
async fn run_agent(trial: Arc<Trial>, tenant: usize, token: String, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let url = format!("{}/ws?token={token}", trial.nodes[rng.usize(..trial.nodes.len())]);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("the agent connects");
    let own = &trial.tenants[tenant];
    let mut written = 0u64;
    while trial.frames.load(Ordering::Relaxed) < TARGET_FRAMES {
        // Within the default frame rate (20 a second).
        tokio::time::sleep(Duration::from_millis(60)).await;
        let conversations: Vec<String> =
            trial.stored.lock().unwrap().iter().filter(|(p, _)| p.tenant == tenant).map(|(_, c)| c.clone()).collect();
        if conversations.is_empty() {
            continue;
        }
        let conversation = &conversations[rng.usize(..conversations.len())];
        written += 1;
        let text = format!("{} {NOTE_MARK} {written}", own.marker);
        let note = json!({"type": "note", "conversation": conversation, "id": format!("n{written}"), "text": text});
        ws.send(Message::text(note.to_string())).await.expect("send");
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT, ws.next()).await.expect("the agent hears back");
            let Some(Ok(Message::Text(frame))) = message else { continue };
            for (i, other) in trial.tenants.iter().enumerate() {
                assert!(i == tenant || !frame.contains(&other.marker), "{}'s agent got {frame}", own.name);
            }
            let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
            if frame["type"] == "ready" {
                continue;
            }
            assert_eq!(
                (&frame["type"], &frame["conversation"], &frame["text"]),
                (&json!("note"), &json!(conversation), &json!(text))
            );
            trial.notes.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    let _ = ws.close(None).await;
}

/// One user's random traffic until the trial has its frames.
async fn run_user(trial: Arc<Trial>, party: Party, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut node = rng.usize(..trial.nodes.len());
    let mut primary = Socket::open(&trial, node, party, "").await;
    // This user's conversations with a stored message.
    let mut mine: Vec<String> = Vec::new();
    let mut watcher: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut sent = 0u64;
    let nodes = trial.nodes.len();
    let other_node = |rng: &mut fastrand::Rng, node: usize| (node + 1 + rng.usize(..nodes - 1)) % nodes;
    while trial.frames.load(Ordering::Relaxed) < TARGET_FRAMES {
        match rng.u32(..100) {
            // Ask, and sometimes cancel the reply once it streams.
            0..55 => {
                sent += 1;
                let id = format!("{}{sent}", trial.message_id_prefix(party));
                let question = QUESTIONS[rng.usize(..QUESTIONS.len())];
                let text = format!("{}/{} {question}", trial.tenants[party.tenant].marker, USERS[party.user]);
                let cancel = rng.u32(..8) == 0;
                primary.send(json!({ "type": "message", "id": id, "text": text })).await;
                trial.messages.fetch_add(1, Ordering::Relaxed);
                let mut reply: Option<String> = None;
                loop {
                    let frame = primary.next(&trial).await;
                    match frame["type"].as_str().unwrap() {
                        "ack" => assert_eq!(frame["id"], id.as_str()),
                        // The tail of a reply a replay already had (it
                        // streamed on another node while this socket joined).
                        "queued" | "reply.delta" if primary.finished.contains(frame["reply"].as_str().unwrap()) => {}
                        "queued" | "reply.delta" if reply.is_none() => {
                            let id = frame["reply"].as_str().unwrap().to_owned();
                            if cancel {
                                primary.send(json!({ "type": "cancel", "reply": id })).await;
                                trial.cancels.fetch_add(1, Ordering::Relaxed);
                            }
                            reply = Some(id);
                        }
                        "reply.done" if reply.as_deref().is_none_or(|r| frame["reply"] == r) => break,
                        "error" => panic!("{party:?}: {frame}"),
                        _ => {}
                    }
                }
                if !mine.contains(&primary.conversation) {
                    mine.push(primary.conversation.clone());
                    trial.stored.lock().unwrap().push((party, primary.conversation.clone()));
                }
            }
            // Reconnect to another node, replaying one of this user's conversations.
            55..70 if !mine.is_empty() => {
                let conversation = mine[rng.usize(..mine.len())].clone();
                primary.close().await;
                node = other_node(&mut rng, node);
                primary = Socket::open(&trial, node, party, &format!("&conversation={conversation}&after=0")).await;
                assert_eq!(primary.conversation, conversation);
                let seq = primary.ready["seq"].as_u64().unwrap();
                let mut last = 0;
                while last < seq {
                    let frame = primary.next(&trial).await;
                    assert_eq!(frame["type"], "message", "{party:?}: replay: {frame}");
                    last = frame["seq"].as_u64().unwrap();
                }
                trial.replays.fetch_add(1, Ordering::Relaxed);
            }
            // A new conversation (the idle window is a millisecond; the
            // closing socket's leave is activity too, so within that
            // millisecond the most recent one is given again).
            70..76 => {
                primary.close().await;
                node = other_node(&mut rng, node);
                primary = Socket::open(&trial, node, party, "").await;
                let fresh = primary.ready["seq"] == 0;
                assert!(fresh || mine.contains(&primary.conversation), "{party:?}: {}", primary.ready);
            }
            // Name another tenant's conversation (or, one time in four, another
            // user's of this tenant), or a made-up one, with this user's token.
            76..88 => {
                let target = {
                    let stored = trial.stored.lock().unwrap();
                    let foreign: Vec<_> = stored
                        .iter()
                        .filter(|(owner, _)| {
                            owner.tenant != party.tenant || (owner.user != party.user && rng.u32(..4) == 0)
                        })
                        .collect();
                    (!foreign.is_empty()).then(|| foreign[rng.usize(..foreign.len())].clone())
                };
                let (named, counter) = match target {
                    Some((owner, conversation)) if owner.tenant != party.tenant => {
                        (conversation, &trial.foreign_attempts)
                    }
                    Some((_, conversation)) => (conversation, &trial.other_user_attempts),
                    None => (format!("{:032x}", rng.u128(..)), &trial.made_up_attempts),
                };
                let refusal = refusal(&trial, rng.usize(..trial.nodes.len()), party, &named).await;
                let reference = trial.refusal.lock().unwrap().clone().expect("the reference refusal");
                assert_eq!(refusal, reference, "{party:?} naming {named}: not the made-up id's refusal");
                counter.fetch_add(1, Ordering::Relaxed);
            }
            // Start or stop a watcher on another node.
            88..100 if !mine.is_empty() => match watcher.take() {
                Some((stop, task)) => {
                    stop.cancel();
                    task.await.expect("watcher");
                }
                None => {
                    let conversation = primary.conversation.clone();
                    if mine.contains(&conversation) {
                        let at = other_node(&mut rng, node);
                        let socket =
                            Socket::open(&trial, at, party, &format!("&conversation={conversation}&after=0")).await;
                        let stop = CancellationToken::new();
                        watcher = Some((stop.clone(), tokio::spawn(watch(trial.clone(), socket, stop))));
                        trial.watchers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            _ => {}
        }
    }
    if let Some((stop, task)) = watcher {
        stop.cancel();
        task.await.expect("watcher");
    }
    primary.close().await;
}

/// What naming `conversation` gets `party` on `node`: the error frame's
/// bytes and the close code and reason. Each frame is checked too.
async fn refusal(trial: &Trial, node: usize, party: Party, conversation: &str) -> (String, u16, String) {
    let url = trial.ws_url(node, party, &format!("&conversation={conversation}&after=0"));
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("the upgrade itself succeeds");
    let mut socket =
        Socket { ws, party, conversation: conversation.to_owned(), ready: Value::Null, finished: Default::default() };
    let error = socket.raw().await.expect("an error frame");
    let frame = trial.check(party, conversation, &error);
    assert_eq!((frame["type"].as_str(), frame["code"].as_str()), (Some("error"), Some("conversation_not_found")));
    let (code, reason) = socket.raw().await.expect_err("then the close");
    (error, code, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_frame_of_one_tenant_ever_reaches_another_across_three_nodes() {
    let seed = std::env::var("FENGDA_TRIAL_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("FENGDA_TRIAL_SEED is a u64"))
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("isolation trial seed {seed} (replay with FENGDA_TRIAL_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = KeyDir::new();
    let tenants = vec![
        Tenant {
            name: "acme",
            marker: String::new(),
            alg: Algorithm::HS256,
            kid: None,
            signer: dir.hmac_secret("acme.secret"),
        },
        Tenant {
            name: "bank",
            marker: String::new(),
            alg: Algorithm::RS256,
            kid: Some("bank-1"),
            signer: dir.key_pair("bank", "rsa"),
        },
        Tenant {
            name: "shop",
            marker: String::new(),
            alg: Algorithm::ES256,
            kid: None,
            signer: dir.key_pair("shop", "ec"),
        },
        Tenant {
            name: "telco",
            marker: String::new(),
            alg: Algorithm::EdDSA,
            kid: None,
            signer: dir.key_pair("telco", "ed25519"),
        },
    ];
    let tenants: Vec<Tenant> =
        tenants.into_iter().map(|t| Tenant { marker: format!("mk{:016x}", rng.u64(..)), ..t }).collect();
    let mut config = String::from("[auth]\nmode = \"jwt\"\n");
    for tenant in &tenants {
        let (file, alg) = match tenant.alg {
            Algorithm::HS256 => ("secret_file", "HS256"),
            Algorithm::RS256 => ("public_key_file", "RS256"),
            Algorithm::ES256 => ("public_key_file", "ES256"),
            _ => ("public_key_file", "EdDSA"),
        };
        let kid = tenant.kid.map(|kid| format!("kid = \"{kid}\"\n")).unwrap_or_default();
        config.push_str(&format!(
            "[[auth.keys]]\ntenant = \"{}\"\nalg = \"{alg}\"\n{file} = {}\n{kid}",
            tenant.name,
            toml_path(&tenant.signer.path)
        ));
    }
    let config = dir.write("fengda.toml", config.as_bytes()).display().to_string();

    let redis = RedisServer::start().await;
    let flags = ["--config", &config, "--idle-window-ms", "1", "--max-created-per-user", "0"];
    let mut hubs = Vec::new();
    for _ in 0..3 {
        hubs.push(Hub::start_node(&redis, &flags).await);
    }
    let mut tokens = HashMap::new();
    for (t, tenant) in tenants.iter().enumerate() {
        for (u, user) in USERS.iter().enumerate() {
            tokens.insert(
                Party { tenant: t, user: u },
                tenant.signer.sign(tenant.alg, tenant.kid, &claims(tenant.name, user)),
            );
        }
    }
    let trial = Arc::new(Trial {
        tenants,
        nodes: hubs.iter().map(|hub| hub.url.replacen("http://", "ws://", 1)).collect(),
        tokens,
        owners: Mutex::default(),
        replies: Mutex::default(),
        stored: Mutex::default(),
        refusal: Mutex::default(),
        frames: AtomicU64::new(0),
        foreign_attempts: AtomicU64::new(0),
        other_user_attempts: AtomicU64::new(0),
        made_up_attempts: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        cancels: AtomicU64::new(0),
        replays: AtomicU64::new(0),
        watchers: AtomicU64::new(0),
        notes: AtomicU64::new(0),
    });

    // The reference: a made-up id, by every tenant, on every node, is refused identically.
    let made_up = format!("{:032x}", rng.u128(..));
    let reference = refusal(&trial, 0, Party { tenant: 0, user: 0 }, &made_up).await;
    assert_eq!((reference.1, reference.2.as_str()), (4004, "conversation not found"), "{reference:?}");
    for tenant in 0..trial.tenants.len() {
        for node in 0..3 {
            assert_eq!(refusal(&trial, node, Party { tenant, user: 0 }, &made_up).await, reference);
        }
    }
    *trial.refusal.lock().unwrap() = Some(reference);

    let started = std::time::Instant::now();
    let users: Vec<_> = (0..trial.tenants.len())
        .flat_map(|tenant| (0..USERS.len()).map(move |user| Party { tenant, user }))
        .map(|party| {
            let seed = rng.u64(..);
            tokio::spawn(run_user(trial.clone(), party, seed))
        })
        .collect();
    let agents: Vec<_> = trial
        .tenants
        .iter()
        .enumerate()
        .map(|(t, tenant)| {
            let agent = fengda_tests::tokens::with(claims(tenant.name, "agent-1"), json!({"role": "agent"}));
            let token = tenant.signer.sign(tenant.alg, tenant.kid, &agent);
            tokio::spawn(run_agent(trial.clone(), t, token, rng.u64(..)))
        })
        .collect();
    let all = futures::future::try_join_all(users.into_iter().chain(agents));
    tokio::time::timeout(DEADLINE, all).await.expect("the trial ran past its deadline").expect("a user's task failed");

    let frames = trial.frames.load(Ordering::Relaxed);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "isolation trial seed {seed}: {frames} frames checked in {:.1} s; {} messages, {} cancels, {} replays, \
         {} watchers, {} notes, {} conversations ({} stored), {} foreign-tenant attempts, {} other-user attempts",
        started.elapsed().as_secs_f64(),
        count(&trial.messages),
        count(&trial.cancels),
        count(&trial.replays),
        count(&trial.watchers),
        count(&trial.notes),
        trial.owners.lock().unwrap().len(),
        trial.stored.lock().unwrap().len(),
        count(&trial.foreign_attempts),
        count(&trial.other_user_attempts),
    );
    assert!(frames >= TARGET_FRAMES, "{frames}");
    assert!(count(&trial.foreign_attempts) >= 100, "too few foreign attempts to mean anything");
    assert!(count(&trial.other_user_attempts) >= 10);
    assert!(count(&trial.cancels) >= 10 && count(&trial.replays) >= 50 && count(&trial.watchers) >= 20);
    assert!(count(&trial.notes) >= 20, "too few notes to mean anything");
    // Every conversation in Redis is one the trial knows, named under its owner's tenant.
    let owners = trial.owners.lock().unwrap().clone();
    let logs = redis.cli(&["--scan", "--pattern", "fengda:conv:*:log"]).await;
    let mut seen = 0;
    for key in logs.lines() {
        let inner = key.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(inner, _)| inner).unwrap();
        let (tenant, conversation) = inner.rsplit_once(':').unwrap();
        let owner = owners.get(conversation).unwrap_or_else(|| panic!("unknown conversation in Redis: {key}"));
        assert_eq!(tenant, trial.tenants[owner.tenant].name, "{key}");
        seen += 1;
    }
    assert_eq!(seen, trial.stored.lock().unwrap().len(), "one log per stored conversation");
    drop(hubs);
}
