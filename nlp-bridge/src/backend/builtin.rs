//! The built-in answerer: deterministic, offline, paced like an LLM.
//!
//! It looks the question up in the [`KnowledgeBase`] and streams the chosen
//! answer (or the polite default) as word-sized tokens ([`split_tokens`],
//! done once per answer at load) at the configured pace. It exists so
//! the hub, the demo and the load tests have a realistic token stream without
//! a model; an LLM backend implements the same [`AnswerBackend`] trait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream;

use super::{AnswerBackend, BackendRequest, Finish, Token, TokenStream};
use crate::config::AnswererConfig;
use crate::error::BridgeError;
use crate::knowledge::{KnowledgeBase, Lang, Lookup, default_answer, is_cjk};

/// The FAQ answerer. Cheap to share: the knowledge base sits behind an `Arc`.
#[derive(Clone, Debug)]
pub struct BuiltinBackend {
    knowledge: Arc<KnowledgeBase>,
    /// Sleep before the first token; `None` = no timer at all.
    first_token_delay: Option<Duration>,
    /// Sleep before every later token; `None` = no timer at all.
    token_interval: Option<Duration>,
    /// Every answer of the knowledge base (and the defaults), split once.
    answer_tokens: Arc<HashMap<String, Arc<[String]>, foldhash::fast::RandomState>>,
}

impl BuiltinBackend {
    /// Loads the configured (or embedded) knowledge base.
    pub fn new(config: &AnswererConfig) -> Result<Self, BridgeError> {
        config.validate()?;
        let knowledge = match &config.knowledge_base {
            Some(path) => KnowledgeBase::from_path(path)?,
            None => KnowledgeBase::embedded()?,
        };
        Ok(Self::with_knowledge(Arc::new(knowledge), config))
    }

    /// Uses an already loaded knowledge base (ignores `config.knowledge_base`).
    pub fn with_knowledge(knowledge: Arc<KnowledgeBase>, config: &AnswererConfig) -> Self {
        let answers = knowledge.entries().iter().map(|entry| entry.answer.as_str());
        let answer_tokens = answers
            .chain([default_answer(Lang::En), default_answer(Lang::Zh)])
            .map(|answer| (answer.to_owned(), split_tokens(answer).into()))
            .collect();
        Self {
            knowledge,
            first_token_delay: config.first_token_delay(),
            token_interval: config.token_interval(),
            answer_tokens: Arc::new(answer_tokens),
        }
    }

    pub fn knowledge(&self) -> &Arc<KnowledgeBase> {
        &self.knowledge
    }

    /// The answer text and finish reason this backend gives to `request`.
    pub fn resolve(&self, request: &BackendRequest) -> (&str, Finish) {
        let lookup = self.knowledge.lookup(request.tenant.as_str(), &request.question, &request.history);
        match lookup {
            Lookup::Match { entry, coverage } => {
                tracing::debug!(entry = %entry.id, coverage, "knowledge base match");
                (&entry.answer, Finish::Stop)
            }
            Lookup::NoMatch { lang } => {
                tracing::debug!(?lang, "no knowledge base match");
                (default_answer(lang), Finish::NoMatch)
            }
        }
    }
}

impl AnswerBackend for BuiltinBackend {
    fn answer(&self, request: BackendRequest) -> TokenStream {
        let (answer, finish) = self.resolve(&request);
        let split = self.answer_tokens.get(answer).cloned().unwrap_or_else(|| split_tokens(answer).into());
        let texts = (0..split.len()).map(move |i| Token::Text(split[i].clone()));
        let tokens = texts.chain([Token::End(finish)]);
        let (first, interval) = (self.first_token_delay, self.token_interval);
        if first.is_none() && interval.is_none() {
            return stream::iter(tokens.map(Ok)).boxed();
        }
        stream::iter(tokens.enumerate())
            .then(move |(i, token)| async move {
                let delay = match (&token, i) {
                    (Token::End(_) | Token::Usage(_), _) => None,
                    (_, 0) => first,
                    _ => interval,
                };
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                Ok(token)
            })
            .boxed()
    }
}

/// What the current token holds besides leading whitespace and punctuation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Word,
    /// CJK characters, with their count (at most 2 per token).
    Cjk(u8),
}

/// Splits an answer into streaming tokens whose concatenation is exactly
/// `text`.
///
/// English tokens are words that keep their leading whitespace (`" world"`);
/// CJK tokens hold one or two characters; punctuation attaches to the
/// preceding token (`" card."`, `"费用。"`), and joiners inside a word or
/// number stay in it (`"24/7"`, `"$1,000"`, `"one-time"`).
pub fn split_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut body = Body::None;
    // Punctuation was appended after the body: the next body starts a new token.
    let mut closed = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let starts_new = if c.is_whitespace() {
            body != Body::None || closed
        } else if is_cjk(c) {
            match body {
                Body::None => false,
                Body::Cjk(n) => closed || n >= 2,
                Body::Word => true,
            }
        } else if c.is_alphanumeric() {
            match body {
                Body::None => false,
                Body::Word => closed,
                Body::Cjk(_) => true,
            }
        } else {
            false
        };
        if starts_new && !current.is_empty() {
            tokens.push(std::mem::take(&mut current));
            body = Body::None;
            closed = false;
        }
        current.push(c);
        if c.is_whitespace() {
            continue;
        }
        if is_cjk(c) {
            body = Body::Cjk(match body {
                Body::Cjk(n) => n + 1,
                _ => 1,
            });
        } else if c.is_alphanumeric() {
            body = Body::Word;
        } else if body != Body::None {
            // A joiner between two word characters keeps the word open.
            let joiner = matches!(c, '\'' | '’' | '-' | '.' | ',' | ':' | '/')
                && body == Body::Word
                && chars.peek().is_some_and(|n| n.is_alphanumeric() && !is_cjk(*n));
            closed |= !joiner;
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConversationId, TenantId};

    #[test]
    fn english_tokens_keep_leading_space_and_trailing_punctuation() {
        assert_eq!(
            split_tokens("Hello, world! Call 24/7 or pay $1,000."),
            ["Hello,", " world!", " Call", " 24/7", " or", " pay", " $1,000."]
        );
        assert_eq!(split_tokens("type 'agent' now"), ["type", " 'agent'", " now"]);
        assert_eq!(split_tokens("one-time code"), ["one-time", " code"]);
    }

    #[test]
    fn cjk_tokens_have_one_or_two_characters() {
        assert_eq!(
            split_tokens("金卡的年费为每年800元。首年免费"),
            ["金卡", "的年", "费为", "每年", "800", "元。", "首年", "免费"]
        );
        assert_eq!(split_tokens("您好，欢迎！"), ["您好，", "欢迎！"]);
        assert_eq!(split_tokens("输入“人工”即可"), ["输入“", "人工”", "即可"]);
    }

    #[test]
    fn edge_cases() {
        assert!(split_tokens("").is_empty());
        assert_eq!(split_tokens("  a  b "), ["  a", "  b", " "]);
        assert_eq!(split_tokens("..."), ["..."]);
    }

    #[test]
    fn tokens_concatenate_to_every_answer() {
        let backend = BuiltinBackend::new(&AnswererConfig::unpaced()).unwrap();
        let mut texts: Vec<&str> = backend.knowledge().entries().iter().map(|e| e.answer.as_str()).collect();
        texts.push(default_answer(crate::knowledge::Lang::En));
        texts.push(default_answer(crate::knowledge::Lang::Zh));
        for text in texts {
            let tokens = split_tokens(text);
            assert_eq!(tokens.concat(), text);
            for token in &tokens {
                let cjk = token.chars().filter(|&c| is_cjk(c)).count();
                assert!(cjk <= 2, "{token:?} in {text:?}");
                assert!(!token.trim().is_empty(), "blank token in {text:?}");
            }
        }
    }

    fn request(tenant: &str, question: &str) -> BackendRequest {
        BackendRequest {
            tenant: TenantId::new(tenant),
            conversation: ConversationId::new("c1"),
            request_id: String::new(),
            history: Vec::new(),
            question: question.into(),
        }
    }

    async fn collect(backend: &BuiltinBackend, req: BackendRequest) -> (String, Finish) {
        let items: Vec<Token> = backend.answer(req).map(|item| item.expect("builtin never fails")).collect().await;
        let (last, texts) = items.split_last().unwrap();
        let Token::End(finish) = last else { panic!("last item is {last:?}") };
        let text = texts
            .iter()
            .map(|t| match t {
                Token::Text(s) => s.as_str(),
                other => panic!("{other:?} before the last item"),
            })
            .collect();
        (text, *finish)
    }

    #[tokio::test]
    async fn streams_the_answer_then_end() {
        let backend = BuiltinBackend::new(&AnswererConfig::unpaced()).unwrap();
        let (text, finish) = collect(&backend, request("demo", "What is the Gold Card?")).await;
        assert_eq!(finish, Finish::Stop);
        let want = &backend.knowledge().entry("demo-gold-card").unwrap().answer;
        assert_eq!(&text, want);
        let (text, finish) = collect(&backend, request("demo", "今天天气怎么样")).await;
        assert_eq!(finish, Finish::NoMatch);
        assert_eq!(text, default_answer(crate::knowledge::Lang::Zh));
    }

    #[tokio::test(start_paused = true)]
    async fn paces_first_token_then_each_token() {
        let config = AnswererConfig { first_token_delay_ms: 150, tokens_per_second: 10.0, ..AnswererConfig::default() };
        let backend = BuiltinBackend::new(&config).unwrap();
        let start = tokio::time::Instant::now();
        let mut stream = backend.answer(request("demo", "hello"));
        stream.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(150));
        stream.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }
}
