//! The FAQ knowledge base of the built-in answerer: loading, validation and
//! matching a question (plus recent history) to one entry.
//!
//! Entries are indexed by the terms of their question and keywords. Terms
//! come from [`terms`]: lowercase English words minus a small stopword list
//! (with a naive plural strip), and for Chinese every character and every
//! character bigram, split at sentence particles. Each term is weighted by
//! its IDF over the whole file.
//!
//! A lookup builds a weighted query: the question's terms at 1.0, the last
//! customer turns at 0.5, 0.25, 0.125 and the last assistant/agent turns at
//! 0.25, 0.125. An entry is a *candidate* only if it covers at least
//! [`MIN_COVERAGE`] of the question's own IDF mass, so history can pick
//! between candidates ("and how much does it cost?" after "tell me about the
//! gold card" picks the Gold Card fee) but never answer on its own. Among
//! candidates the best score wins: the query-weighted overlap
//! (Σ weight × IDF²) with the entry, raised by up to [`CANONICAL_BONUS`] for
//! repeating the entry's own question. There is deliberately no length
//! normalisation: FAQ keywords are synonyms, so an entry with many of them
//! should not be penalised for it. Only entries of the
//! request's tenant and shared (`"*"`) entries are ever scored.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use crate::backend::{HistoryTurn, TurnRole};
use crate::error::BridgeError;

/// The knowledge base shipped in the repository, compiled into the binary.
pub const EMBEDDED_FAQ: &str = include_str!("../data/faq.json");

/// Tenant value of entries shared by every tenant.
pub const SHARED_TENANT: &str = "*";

/// Share of the question's IDF mass an entry must cover to be answered.
pub const MIN_COVERAGE: f64 = 0.5;

/// Score multiplier bonus for the share of an entry's own question that the
/// customer's question repeats: "What is the Gold Card?" is the overview,
/// even though the fee entry shares those words.
pub const CANONICAL_BONUS: f64 = 0.5;
/// Query weight of the question itself.
const QUESTION_WEIGHT: f64 = 1.0;
/// Query weights of the most recent customer turns, newest first.
const CUSTOMER_TURN_WEIGHTS: [f64; 3] = [0.5, 0.25, 0.125];
/// Query weights of the most recent assistant or agent turns, newest first.
const ASSISTANT_TURN_WEIGHTS: [f64; 2] = [0.25, 0.125];

const DEFAULT_ANSWER_EN: &str = "I'm not sure I understood — could you rephrase, or type 'agent' to talk to a person?";
const DEFAULT_ANSWER_ZH: &str = "抱歉，我不太确定您的意思——可以换一种说法吗？或者输入“人工”转接人工客服。";

/// Language of an entry or a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    /// `Zh` when the text is mostly CJK (at least as many CJK characters as
    /// Latin words), else `En`.
    pub fn detect(text: &str) -> Lang {
        let cjk = text.chars().filter(|&c| is_cjk(c)).count();
        let words = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).count();
        if cjk > 0 && cjk >= words { Lang::Zh } else { Lang::En }
    }
}

/// The polite answer sent when nothing matches confidently.
pub fn default_answer(lang: Lang) -> &'static str {
    match lang {
        Lang::En => DEFAULT_ANSWER_EN,
        Lang::Zh => DEFAULT_ANSWER_ZH,
    }
}

/// One question/answer pair of one tenant (or `"*"` for all tenants).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unique within the file.
    pub id: String,
    pub tenant: String,
    pub lang: Lang,
    /// A typical phrasing; indexed like the keywords.
    pub question: String,
    pub keywords: Vec<String>,
    pub answer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnowledgeFile {
    #[allow(dead_code)]
    version: u32,
    entries: Vec<Entry>,
}

/// foldhash, not SipHash: every lookup hashes each term of the question and
/// its history a few times, and the keys come from our own file.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A term of the vocabulary (every term some entry has), by number: a
/// lookup scores with these instead of hashing strings per entry.
type TermId = u32;

/// An entry's index: its terms with their IDF, and its own question's terms.
#[derive(Debug)]
struct EntryIndex {
    terms: Vec<(TermId, f64)>,
    /// Terms of the entry's own question, and their summed IDF.
    canonical: Vec<TermId>,
    canonical_mass: f64,
}

impl EntryIndex {
    fn has(&self, term: TermId) -> bool {
        self.terms.iter().any(|&(t, _)| t == term)
    }
}

/// The outcome of [`KnowledgeBase::lookup`].
#[derive(Clone, Copy, Debug)]
pub enum Lookup<'a> {
    /// `coverage` is the share of the question's IDF mass the entry covers.
    Match { entry: &'a Entry, coverage: f64 },
    /// Nothing confident; answer [`default_answer`] in `lang`.
    NoMatch { lang: Lang },
}

/// A parsed, validated and indexed knowledge base. Immutable once built,
/// shared by all calls.
#[derive(Debug)]
pub struct KnowledgeBase {
    entries: Vec<Entry>,
    index: Vec<EntryIndex>,
    /// The vocabulary: each term's number, an index into `idf`.
    vocabulary: HashMap<String, TermId>,
    idf: Vec<f64>,
    /// The known terms of each entry's answer, by answer text: the assistant
    /// turns of a history are mostly our own answers, and extracting their
    /// terms on every lookup was most of the answerer's work.
    answer_terms: HashMap<String, Vec<TermId>>,
    /// IDF of a term no entry contains: that of a term in one entry (an
    /// unseen word is rare, but no rarer than the rarest we know).
    unknown_idf: f64,
}

impl KnowledgeBase {
    /// The knowledge base embedded from `nlp-bridge/data/faq.json`.
    pub fn embedded() -> Result<Self, BridgeError> {
        Self::from_json(EMBEDDED_FAQ, "<embedded faq.json>")
    }

    /// Reads a knowledge-base file.
    pub fn from_path(path: &Path) -> Result<Self, BridgeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BridgeError::ReadKnowledgeBase { path: path.to_owned(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses, validates and indexes JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, BridgeError> {
        let file: KnowledgeFile = serde_json::from_str(text)
            .map_err(|source| BridgeError::ParseKnowledgeBase { origin: origin.to_owned(), source })?;
        let invalid = |reason: String| BridgeError::InvalidKnowledgeBase { origin: origin.to_owned(), reason };
        if file.entries.is_empty() {
            return Err(invalid("no entries".into()));
        }
        let mut ids = HashSet::new();
        let mut entry_terms = Vec::with_capacity(file.entries.len());
        let mut canonical_terms = Vec::with_capacity(file.entries.len());
        for entry in &file.entries {
            if !ids.insert(entry.id.as_str()) {
                return Err(invalid(format!("duplicate id {:?}", entry.id)));
            }
            if entry.tenant.trim().is_empty() || entry.answer.trim().is_empty() {
                return Err(invalid(format!("entry {:?} has no tenant or answer", entry.id)));
            }
            let canonical = terms(&entry.question);
            let mut set: HashSet<String> = canonical.iter().cloned().collect();
            canonical_terms.push(canonical);
            for keyword in &entry.keywords {
                set.extend(terms(keyword));
            }
            if set.is_empty() {
                return Err(invalid(format!("entry {:?} has no searchable terms", entry.id)));
            }
            entry_terms.push(set);
        }

        let n = file.entries.len() as f64;
        let mut df: HashMap<&str, usize> = HashMap::default();
        for set in &entry_terms {
            for term in set {
                *df.entry(term.as_str()).or_default() += 1;
            }
        }
        let idf_of = |df: usize| ((n + 1.0) / (df as f64 + 1.0)).ln() + 1.0;
        let mut vocabulary: HashMap<String, TermId> = HashMap::default();
        let mut idf = Vec::with_capacity(df.len());
        for (term, &count) in &df {
            vocabulary.insert((*term).to_owned(), idf.len() as TermId);
            idf.push(idf_of(count));
        }
        let index = entry_terms
            .into_iter()
            .zip(canonical_terms)
            .map(|(set, canonical)| {
                // In term order: every entry sums its score in the same order, so
                // entries with equal terms score exactly equal and the earlier wins.
                let mut terms: Vec<(TermId, f64)> =
                    set.iter().map(|term| vocabulary[term]).map(|id| (id, idf[id as usize])).collect();
                terms.sort_unstable_by_key(|&(id, _)| id);
                let canonical: Vec<TermId> = canonical.iter().map(|term| vocabulary[term]).collect();
                let canonical_mass = canonical.iter().map(|&id| idf[id as usize]).sum();
                EntryIndex { terms, canonical, canonical_mass }
            })
            .collect();
        let mut answer_terms = HashMap::default();
        for answer in file.entries.iter().map(|e| e.answer.as_str()).chain([DEFAULT_ANSWER_EN, DEFAULT_ANSWER_ZH]) {
            let known = terms(answer).iter().filter_map(|term| vocabulary.get(term).copied()).collect();
            answer_terms.insert(answer.to_owned(), known);
        }
        Ok(Self { entries: file.entries, index, vocabulary, idf, answer_terms, unknown_idf: idf_of(1) })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Looks up an entry by id (any tenant); for tests and tooling.
    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    fn idf(&self, term: TermId) -> f64 {
        self.idf[term as usize]
    }

    /// An unknown question term's share of the coverage denominator: none
    /// for a CJK bigram, [`Self::unknown_idf`] otherwise. Most unknown
    /// bigrams straddle a word boundary ("有什" in "有什么套餐") and would
    /// drown real matches; unknown characters and English words still count
    /// in full. (A known term counts its IDF.)
    fn unknown_question_idf(&self, term: &str) -> f64 {
        if term.chars().count() == 2 && term.chars().all(is_cjk) { 0.0 } else { self.unknown_idf }
    }

    /// Finds the best entry of `tenant` (or shared) for `question`, using
    /// `history` (oldest first) to break ties between candidates.
    pub fn lookup<'a>(&'a self, tenant: &str, question: &str, history: &[HistoryTurn]) -> Lookup<'a> {
        match self.ranked(tenant, question, history, 1).first() {
            Some(&(entry, coverage)) => Lookup::Match { entry, coverage },
            None => Lookup::NoMatch { lang: Lang::detect(question) },
        }
    }

    /// The retriever of grounded LLM answers: up to `k` entries of `tenant`
    /// (or shared) for `question`, best first, by the rule of [`Self::lookup`]
    /// (every one a candidate, ranked by score), so the first is the one
    /// the built-in answerer would give.
    pub fn retrieve<'a>(&'a self, tenant: &str, question: &str, history: &[HistoryTurn], k: usize) -> Vec<&'a Entry> {
        self.ranked(tenant, question, history, k).into_iter().map(|(entry, _)| entry).collect()
    }

    /// Up to `k` candidates with their coverage, best first.
    fn ranked<'a>(&'a self, tenant: &str, question: &str, history: &[HistoryTurn], k: usize) -> Vec<(&'a Entry, f64)> {
        if k == 0 {
            return Vec::new();
        }
        // The question's distinct terms: the known ones by number, the rest
        // only for their share of the mass.
        let mut question_terms: Vec<TermId> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        let mut question_mass = 0.0;
        for_each_term(question, |term| match self.vocabulary.get(term) {
            Some(&id) if !question_terms.contains(&id) => {
                question_terms.push(id);
                question_mass += self.idf(id);
            }
            Some(_) => {}
            None if !unknown.iter().any(|seen| seen == term) => {
                question_mass += self.unknown_question_idf(term);
                unknown.push(term.to_owned());
            }
            None => {}
        });
        if question_mass <= 0.0 {
            return Vec::new();
        }

        // Only terms some entry has can score, so the query is a weight per
        // vocabulary term: a buffer kept per thread (a fresh zeroed one per
        // lookup cost more than the scoring), reset where it was written.
        QUERY.with_borrow_mut(|buffer| {
            let mut query = Query::new(buffer, self.idf.len());
            // The question's known terms are found already.
            for &term in &question_terms {
                query.raise(term, QUESTION_WEIGHT);
            }
            let mut add = |text: &str, weight: f64| {
                let mut add_known = |term: TermId| query.raise(term, weight);
                match self.answer_terms.get(text) {
                    Some(known) => known.iter().for_each(|&term| add_known(term)),
                    None => for_each_term(text, |term| {
                        if let Some(&id) = self.vocabulary.get(term) {
                            add_known(id);
                        }
                    }),
                }
            };
            let customer = history.iter().rev().filter(|t| t.role == TurnRole::Customer);
            for (turn, weight) in customer.zip(CUSTOMER_TURN_WEIGHTS) {
                add(&turn.text, weight);
            }
            let assistant = history.iter().rev().filter(|t| matches!(t.role, TurnRole::Assistant | TurnRole::Agent));
            for (turn, weight) in assistant.zip(ASSISTANT_TURN_WEIGHTS) {
                add(&turn.text, weight);
            }
            let best = self.best_entries(tenant, &question_terms, question_mass, &query.buffer.weights, k);
            best.into_iter().map(|(i, _, coverage)| (&self.entries[i], coverage)).collect()
        })
    }

    /// The `k` best-scoring candidates of `tenant` (or shared): index,
    /// score and coverage, best first; of equal scores the earlier entry.
    fn best_entries(
        &self,
        tenant: &str,
        question_terms: &[TermId],
        question_mass: f64,
        query: &[f64],
        k: usize,
    ) -> Vec<(usize, f64, f64)> {
        let mut best: Vec<(usize, f64, f64)> = Vec::with_capacity(k + 1);
        for (i, entry) in self.entries.iter().enumerate() {
            if entry.tenant != tenant && entry.tenant != SHARED_TENANT {
                continue;
            }
            let index = &self.index[i];
            let covered: f64 = question_terms.iter().filter(|&&t| index.has(t)).map(|&t| self.idf(t)).sum();
            let coverage = covered / question_mass;
            if coverage < MIN_COVERAGE {
                continue;
            }
            let dot: f64 = index.terms.iter().map(|&(term, idf)| query[term as usize] * idf * idf).sum();
            let canonical: f64 =
                index.canonical.iter().filter(|t| question_terms.contains(t)).map(|&t| self.idf(t)).sum();
            let canonical = canonical / index.canonical_mass.max(f64::EPSILON);
            let score = dot * (1.0 + CANONICAL_BONUS * canonical);
            // Kept sorted; a later entry goes after equal scores.
            let at = best.partition_point(|&(_, better, _)| better >= score);
            if at < k {
                best.insert(at, (i, score, coverage));
                best.truncate(k);
            }
        }
        best
    }
}

thread_local! {
    /// [`KnowledgeBase::lookup`]'s query, all zero between lookups.
    static QUERY: std::cell::RefCell<QueryBuffer> = const {
        std::cell::RefCell::new(QueryBuffer { weights: Vec::new(), touched: Vec::new() })
    };
}

/// A query weight per vocabulary term, and the terms written.
struct QueryBuffer {
    weights: Vec<f64>,
    touched: Vec<TermId>,
}

/// One lookup's use of the thread's [`QueryBuffer`]: zeroes what it wrote
/// when dropped, however the lookup ends.
struct Query<'a> {
    buffer: &'a mut QueryBuffer,
}

impl<'a> Query<'a> {
    fn new(buffer: &'a mut QueryBuffer, vocabulary_len: usize) -> Self {
        buffer.weights.resize(vocabulary_len, 0.0);
        Self { buffer }
    }

    /// Raises `term`'s weight to at least `weight` (> 0).
    fn raise(&mut self, term: TermId, weight: f64) {
        let slot = &mut self.buffer.weights[term as usize];
        if *slot == 0.0 {
            self.buffer.touched.push(term);
        }
        *slot = slot.max(weight);
    }
}

impl Drop for Query<'_> {
    fn drop(&mut self) {
        let QueryBuffer { weights, touched } = &mut *self.buffer;
        for term in touched.drain(..) {
            weights[term as usize] = 0.0;
        }
    }
}

/// English words that carry no meaning for matching.
fn is_stopword(word: &str) -> bool {
    matches!(
        word,
        "a" | "about"
            | "am"
            | "an"
            | "and"
            | "any"
            | "are"
            | "as"
            | "at"
            | "be"
            | "but"
            | "by"
            | "can"
            | "could"
            | "did"
            | "do"
            | "does"
            | "for"
            | "from"
            | "has"
            | "have"
            | "how"
            | "i"
            | "if"
            | "in"
            | "is"
            | "it"
            | "its"
            | "me"
            | "my"
            | "of"
            | "on"
            | "or"
            | "our"
            | "please"
            | "should"
            | "so"
            | "that"
            | "the"
            | "there"
            | "this"
            | "to"
            | "us"
            | "was"
            | "we"
            | "were"
            | "what"
            | "when"
            | "which"
            | "will"
            | "with"
            | "would"
            | "you"
            | "your"
    )
}

/// Chinese particles (and the copula 是): a CJK run is split at them and
/// they are dropped, so "年费是多少" gives 年费 and 多少 but no 费是/是多.
const CJK_PARTICLES: &[char] = &['的', '了', '吗', '呢', '吧', '啊', '呀', '嘛', '哦', '是'];

/// Chinese characters too common to be useful alone (still part of bigrams).
const CJK_STOP_CHARS: &[char] =
    &['我', '你', '您', '他', '她', '在', '请', '和', '与', '有', '个', '一', '这', '那', '么', '要', '想', '们'];

/// Whether `c` is a CJK ideograph (punctuation is not).
pub fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}' | '\u{20000}'..='\u{2A6DF}')
}

/// The matching terms of `text`, deduplicated, in order of first appearance.
///
/// English: lowercase alphanumeric words, stopwords and single letters
/// dropped, a trailing plural `s` stripped ("cards" → "card"). CJK: every
/// character (minus very common ones) and every adjacent pair, with runs
/// split at particles such as 的 and 吗.
pub fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for_each_term(text, |term| {
        if !seen.contains(term) {
            seen.insert(term.to_owned());
            out.push(term.to_owned());
        }
    });
    out
}

/// Calls `f` with every term of `text` (see [`terms`]), repeats included,
/// without allocating per term: lookups score several history turns per
/// question, and building a `String` for each of their terms was most of
/// the answerer's work.
pub fn for_each_term(text: &str, mut f: impl FnMut(&str)) {
    let mut word = String::new();
    let mut run: Vec<char> = Vec::new();
    let flush_word = |word: &mut String, f: &mut dyn FnMut(&str)| {
        if let Some(term) = normalize_word(word) {
            f(term);
        }
        word.clear();
    };
    let flush_run = |run: &mut Vec<char>, f: &mut dyn FnMut(&str)| {
        let mut buf = [0u8; 8];
        for (i, &c) in run.iter().enumerate() {
            if !CJK_STOP_CHARS.contains(&c) {
                f(c.encode_utf8(&mut buf));
            }
            if let Some(&next) = run.get(i + 1) {
                let first = c.encode_utf8(&mut buf).len();
                let second = next.encode_utf8(&mut buf[first..]).len();
                // Both halves are whole characters, so this never fails.
                if let Ok(pair) = std::str::from_utf8(&buf[..first + second]) {
                    f(pair);
                }
            }
        }
        run.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            flush_word(&mut word, &mut f);
            if CJK_PARTICLES.contains(&c) {
                flush_run(&mut run, &mut f);
            } else {
                run.push(c);
            }
        } else if c.is_alphanumeric() {
            flush_run(&mut run, &mut f);
            if c.is_ascii() {
                word.push(c.to_ascii_lowercase());
            } else {
                word.extend(c.to_lowercase());
            }
        } else {
            flush_word(&mut word, &mut f);
            flush_run(&mut run, &mut f);
        }
    }
    flush_word(&mut word, &mut f);
    flush_run(&mut run, &mut f);
}

/// The term of one lowercase word, if it is one.
fn normalize_word(word: &str) -> Option<&str> {
    if word.is_empty() || is_stopword(word) {
        return None;
    }
    let mut chars = word.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        // Single letters ("s" of "what's") say nothing; single digits might.
        return c.is_numeric().then_some(word);
    }
    let plural = word.len() > 3
        && word.ends_with('s')
        && !word.ends_with("ss")
        && !word.ends_with("us")
        && !word.ends_with("is");
    Some(if plural { &word[..word.len() - 1] } else { word })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kb() -> KnowledgeBase {
        KnowledgeBase::embedded().expect("embedded knowledge base is valid")
    }

    fn matched(kb: &KnowledgeBase, tenant: &str, q: &str, history: &[HistoryTurn]) -> String {
        match kb.lookup(tenant, q, history) {
            Lookup::Match { entry, .. } => entry.id.clone(),
            Lookup::NoMatch { lang } => format!("<no match {lang:?}>"),
        }
    }

    fn customer(text: &str) -> HistoryTurn {
        HistoryTurn::new(TurnRole::Customer, text)
    }

    fn assistant(kb: &KnowledgeBase, id: &str) -> HistoryTurn {
        HistoryTurn::new(TurnRole::Assistant, kb.entry(id).unwrap().answer.clone())
    }

    fn retrieved(kb: &KnowledgeBase, tenant: &str, q: &str, history: &[HistoryTurn], k: usize) -> Vec<String> {
        kb.retrieve(tenant, q, history, k).into_iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn the_retriever_ranks_candidates_and_history_reorders_them() {
        let kb = kb();
        let fee = "How much is the annual fee?";
        // Both card fees match; with nothing else, the Gold Card (earlier, equal) first.
        assert_eq!(retrieved(&kb, "demo", fee, &[], 3), ["demo-gold-card-fee", "demo-platinum-card-fee"]);
        // After talk of the Platinum Card, its fee comes first.
        let history = [customer("Tell me about the Platinum Card")];
        assert_eq!(retrieved(&kb, "demo", fee, &history, 3), ["demo-platinum-card-fee", "demo-gold-card-fee"]);
        // k bounds the list; the first is always what lookup picks.
        assert_eq!(retrieved(&kb, "demo", fee, &history, 1), [matched(&kb, "demo", fee, &history)]);
        assert!(retrieved(&kb, "demo", fee, &[], 0).is_empty());
    }

    #[test]
    fn the_retriever_keeps_to_the_tenant_and_gives_nothing_unrelated() {
        let kb = kb();
        // Another tenant's entries never come back, nor does an unrelated question match anything.
        assert!(retrieved(&kb, "telco", "How much is the Gold Card annual fee?", &[], 5).is_empty());
        assert!(retrieved(&kb, "demo", "What is the capital of France?", &[], 5).is_empty());
        assert!(retrieved(&kb, "nobody", "How much is the annual fee?", &[], 5).is_empty());
        assert_eq!(retrieved(&kb, "telco", "漫游怎么收费？", &[], 2)[0], "telco-roaming-zh");
    }

    #[test]
    fn english_terms() {
        assert_eq!(terms("What's the Gold Card's annual FEES?"), ["gold", "card", "annual", "fee"]);
        assert_eq!(terms("I lost my cards, address 24/7"), ["lost", "card", "address", "24", "7"]);
        assert!(terms("how is it to the?").is_empty());
    }

    #[test]
    fn chinese_terms() {
        assert_eq!(terms("金卡的年费是多少？"), ["金", "金卡", "卡", "年", "年费", "费", "多", "多少", "少"]);
        // Pronouns are dropped alone but kept in bigrams.
        assert_eq!(terms("你好"), ["你好", "好"]);
        assert_eq!(terms("Gold卡"), ["gold", "卡"]);
    }

    #[test]
    fn language_detection() {
        assert_eq!(Lang::detect("年费多少？"), Lang::Zh);
        assert_eq!(Lang::detect("how much is it?"), Lang::En);
        assert_eq!(Lang::detect("Gold Card 年费多少"), Lang::Zh);
    }

    #[test]
    fn embedded_file_parses_with_both_languages() {
        let kb = kb();
        let entries = kb.entries();
        assert!(entries.len() >= 24, "{} entries", entries.len());
        let en = entries.iter().filter(|e| e.lang == Lang::En).count();
        let zh = entries.iter().filter(|e| e.lang == Lang::Zh).count();
        assert!(en >= 10 && zh >= 10, "en {en}, zh {zh}");
        for tenant in ["demo", "telco", "shop", SHARED_TENANT] {
            for lang in [Lang::En, Lang::Zh] {
                assert!(entries.iter().any(|e| e.tenant == tenant && e.lang == lang), "{tenant} has no {lang:?} entry");
            }
        }
    }

    #[test]
    fn answers_have_the_promised_length_and_content() {
        let kb = kb();
        for e in kb.entries() {
            match e.lang {
                Lang::En => {
                    let words = e.answer.split_whitespace().count();
                    assert!((20..=60).contains(&words), "{}: {words} words", e.id);
                }
                Lang::Zh => {
                    let chars = e.answer.chars().count();
                    assert!((40..=120).contains(&chars), "{}: {chars} chars", e.id);
                }
            }
        }
        let fee = &kb.entry("demo-gold-card-fee").unwrap().answer;
        assert!(fee.contains("Gold Card") && fee.contains('$'), "{fee}");
        let fee_zh = &kb.entry("demo-gold-card-fee-zh").unwrap().answer;
        assert!(fee_zh.contains("金卡") && fee_zh.contains("元"), "{fee_zh}");
        assert!(kb.entry("demo-gold-card-zh").unwrap().answer.contains("金卡"));
    }

    #[test]
    fn equal_entries_score_equal_and_the_earlier_wins() {
        // The same terms in a tenant's entry and a shared one: the file's order decides, every time.
        let entry = |id: &str, tenant: &str| {
            format!(
                r#"{{"id":"{id}","tenant":"{tenant}","lang":"en","question":"gold card annual fee waiver rules",
                "keywords":["premium metal card yearly charge","lounge access travel insurance"],"answer":"{id}"}}"#
            )
        };
        let file = format!(r#"{{"version":1,"entries":[{},{}]}}"#, entry("first", "*"), entry("second", "t"));
        let kb = KnowledgeBase::from_json(&file, "t").unwrap();
        // Summed in the same order (floating-point sums in another order can differ in the last bit).
        assert_eq!(kb.index[0].terms, kb.index[1].terms);
        let history = [customer("premium metal card lounge access"), customer("travel insurance yearly charge")];
        for _ in 0..20 {
            assert_eq!(matched(&kb, "t", "gold card annual fee waiver", &history), "first");
        }
    }

    #[test]
    fn a_lookup_leaves_no_weight_behind_for_the_next_one() {
        // The query buffer is per thread: a lookup with history, then one
        // without, must match what a first lookup on a fresh thread gives.
        let fresh = std::thread::spawn(|| matched(&kb(), "demo", "how much is the annual fee?", &[]));
        let kb = kb();
        let history = [customer("tell me about the gold card"), assistant(&kb, "demo-gold-card")];
        assert_eq!(matched(&kb, "demo", "how much is the annual fee?", &history), "demo-gold-card-fee");
        assert_eq!(matched(&kb, "demo", "how much is the annual fee?", &[]), fresh.join().unwrap());
        // A knowledge base with a smaller vocabulary on the same thread, then the big one again.
        let small = KnowledgeBase::from_json(
            r#"{"version":1,"entries":[{"id":"x","tenant":"demo","lang":"en","question":"annual fee","keywords":[],"answer":"a"}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(matched(&small, "demo", "annual fee?", &history), "x");
        assert_eq!(matched(&kb, "demo", "how much is the annual fee?", &history), "demo-gold-card-fee");
        QUERY.with_borrow(|buffer| {
            assert!(buffer.weights.iter().all(|&w| w == 0.0) && buffer.touched.is_empty());
        });
    }

    #[test]
    fn invalid_files_are_rejected() {
        assert!(KnowledgeBase::from_json("{", "t").is_err());
        assert!(KnowledgeBase::from_json(r#"{"version":1,"entries":[]}"#, "t").is_err());
        let entry = r#"{"id":"x","tenant":"t","lang":"en","question":"q word","keywords":[],"answer":"a"}"#;
        let dup = format!(r#"{{"version":1,"entries":[{entry},{entry}]}}"#);
        assert!(KnowledgeBase::from_json(&dup, "t").is_err());
        let unknown = r#"{"version":1,"entries":[],"extra":1}"#;
        assert!(KnowledgeBase::from_json(unknown, "t").is_err());
    }

    #[test]
    fn gold_card_overview() {
        let kb = kb();
        assert_eq!(matched(&kb, "demo", "Tell me about the Gold Card", &[]), "demo-gold-card");
        assert_eq!(matched(&kb, "demo", "gold card benefits?", &[]), "demo-gold-card");
        assert_eq!(matched(&kb, "demo", "介绍一下金卡", &[]), "demo-gold-card-zh");
        assert_eq!(matched(&kb, "demo", "金卡", &[]), "demo-gold-card-zh");
    }

    #[test]
    fn direct_fee_questions() {
        let kb = kb();
        let q = "What is the annual fee of the Gold Card?";
        assert_eq!(matched(&kb, "demo", q, &[]), "demo-gold-card-fee");
        let q = "How much does the Platinum Card cost?";
        assert_eq!(matched(&kb, "demo", q, &[]), "demo-platinum-card-fee");
        assert_eq!(matched(&kb, "demo", "白金卡年费多少钱", &[]), "demo-platinum-card-fee-zh");
        assert_eq!(matched(&kb, "demo", "金卡年费多少钱", &[]), "demo-gold-card-fee-zh");
    }

    #[test]
    fn gold_card_follow_up_uses_history() {
        let kb = kb();
        let history = [customer("tell me about the gold card"), assistant(&kb, "demo-gold-card")];
        let q = "and how much does it cost?";
        assert_eq!(matched(&kb, "demo", q, &history), "demo-gold-card-fee");
        // Without history the question alone is ambiguous between products;
        // after a Platinum turn the same words pick the Platinum fee.
        let history = [customer("I'm interested in the platinum card")];
        assert_eq!(matched(&kb, "demo", q, &history), "demo-platinum-card-fee");
    }

    #[test]
    fn chinese_follow_up_uses_history() {
        let kb = kb();
        let history = [customer("介绍一下金卡"), assistant(&kb, "demo-gold-card-zh")];
        assert_eq!(matched(&kb, "demo", "年费多少？", &history), "demo-gold-card-fee-zh");
        let history = [customer("白金卡有什么好处")];
        assert_eq!(matched(&kb, "demo", "年费多少？", &history), "demo-platinum-card-fee-zh");
    }

    #[test]
    fn common_questions_per_tenant() {
        let kb = kb();
        let cases = [
            ("demo", "I lost my card, what do I do?", "demo-card-lost"),
            ("demo", "When are you open on Saturday?", "demo-opening-hours"),
            ("demo", "what time do you open", "demo-opening-hours"),
            ("demo", "what is the daily transfer limit", "demo-transfer-limits"),
            ("demo", "我的卡丢了", "demo-card-lost-zh"),
            ("demo", "转账额度多少", "demo-transfer-limits-zh"),
            ("demo", "周末营业吗", "demo-opening-hours-zh"),
            ("telco", "which plans do you have?", "telco-plans"),
            ("telco", "does roaming work in Europe?", "telco-roaming"),
            ("telco", "I ran out of data, can I buy more data?", "telco-data-topup"),
            ("telco", "有什么套餐", "telco-plans-zh"),
            ("telco", "出国漫游收费吗", "telco-roaming-zh"),
            ("shop", "can I return this jacket for a refund?", "shop-returns"),
            ("shop", "how long does shipping take", "shop-delivery"),
            ("shop", "where is my parcel", "shop-order-tracking"),
            ("shop", "怎么退款", "shop-returns-zh"),
            ("shop", "查询物流", "shop-order-tracking-zh"),
            ("shop", "hi there", "shared-greeting"),
            ("telco", "thanks a lot!", "shared-thanks"),
            ("demo", "agent", "shared-human-agent"),
            ("demo", "can I speak to someone?", "shared-human-agent"),
            ("demo", "转人工", "shared-human-agent-zh"),
            ("shop", "您好", "shared-greeting-zh"),
        ];
        for (tenant, q, want) in cases {
            assert_eq!(matched(&kb, tenant, q, &[]), want, "{tenant}: {q}");
        }
    }

    #[test]
    fn history_never_answers_alone() {
        let kb = kb();
        let history = [customer("tell me about the gold card")];
        assert_eq!(matched(&kb, "demo", "what is the weather on mars?", &history), "<no match En>");
        assert_eq!(matched(&kb, "demo", "thanks!", &history), "shared-thanks");
    }

    #[test]
    fn tenants_are_isolated() {
        let kb = kb();
        for q in [
            "Does roaming work in Europe?",
            "How much does roaming cost in Europe?",
            "I ran out of data, how do I top up?",
            "出国漫游怎么收费？",
            "What is your return policy?",
        ] {
            if let Lookup::Match { entry, .. } = kb.lookup("demo", q, &[]) {
                panic!("demo asked {q:?} and got {}", entry.id);
            }
        }
        assert_eq!(matched(&kb, "telco", "gold card annual fee", &[]), "<no match En>");
        // An unknown tenant sees shared entries only.
        assert_eq!(matched(&kb, "acme", "hello", &[]), "shared-greeting");
        assert_eq!(matched(&kb, "acme", "What is the Gold Card?", &[]), "<no match En>");
        assert_eq!(matched(&kb, "acme", "介绍一下金卡", &[]), "<no match Zh>");
        assert_eq!(matched(&kb, "", "What mobile plans do you offer?", &[]), "<no match En>");
    }

    #[test]
    fn no_match_defaults() {
        let kb = kb();
        assert_eq!(matched(&kb, "demo", "purple elephants dancing", &[]), "<no match En>");
        assert_eq!(matched(&kb, "demo", "今天天气怎么样", &[]), "<no match Zh>");
        assert_eq!(matched(&kb, "demo", "???", &[]), "<no match En>");
        assert!(default_answer(Lang::En).contains("agent"));
        assert!(default_answer(Lang::Zh).contains("人工"));
    }
}
