//! What `append.lua` answers, decoded here only.
//!
//! The script answers one string rather than an array of nine values:
//! redis-rs parses each value of an answer on its own, and an append's
//! answer cost ~11k instructions to parse as an array, on the path of
//! every message and every reply. The string is a line of decimal numbers
//! separated by spaces, then the bytes those numbers measure, back to back:
//!
//! ```text
//! <status> <seq> <others> <owner epoch> <owner since> <read> <epoch len> <owner len> <name len> [<entry len>…]\n
//! <epoch><owner><owner name>[<entry>…]
//! ```
//!
//! `<read>` is how many log entries before the new one the script read
//! (the question's history), each measured by an `<entry len>`, or `-1`
//! when it did not read them. Lengths, not separators, delimit the parts:
//! an owner's name may hold any character.

use thiserror::Error;

/// One decoded answer; its strings borrow from the answer's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct AppendAnswer<'a> {
    /// 1 stored, 0 a message already stored (`seq` is its seq), -1 the
    /// conversation does not exist (or exists with another owner or epoch
    /// than the append would create it with), -2 the owner operation
    /// found another owner or owner epoch (the owner fields say which),
    /// -3 creating the log would exceed its creator's cap.
    pub status: i64,
    pub seq: u64,
    /// Other nodes in the conversation's listeners hash.
    pub others: i64,
    pub owner_epoch: u64,
    pub owner_since: u64,
    /// The log's epoch (empty unless stored).
    pub epoch: &'a str,
    /// The owner, as `Owner::encode` writes it (empty: the assistant).
    pub owner: &'a str,
    pub owner_name: &'a str,
    /// The entries before the new one, oldest first, if the script read them.
    pub before: Option<Vec<&'a [u8]>>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unexpected answer from append.lua: {0}")]
pub struct AnswerError(&'static str);

impl<'a> AppendAnswer<'a> {
    pub fn decode(answer: &'a [u8]) -> Result<Self, AnswerError> {
        let newline = answer.iter().position(|&b| b == b'\n').ok_or(AnswerError("no header line"))?;
        let mut numbers = Numbers(&answer[..newline]);
        let mut next = || numbers.next();
        let (status, seq, others, owner_epoch, owner_since, read) =
            (next()?, next()?, next()?, next()?, next()?, next()?);
        let mut body = &answer[newline + 1..];
        let mut take = |len: i64| -> Result<&'a [u8], AnswerError> {
            let len = usize::try_from(len).map_err(|_| AnswerError("negative length"))?;
            if len > body.len() {
                return Err(AnswerError("body cut short"));
            }
            let (part, rest) = body.split_at(len);
            body = rest;
            Ok(part)
        };
        let text = |bytes: &'a [u8]| std::str::from_utf8(bytes).map_err(|_| AnswerError("text not UTF-8"));
        let epoch = text(take(next()?)?)?;
        let owner = text(take(next()?)?)?;
        let owner_name = text(take(next()?)?)?;
        let before = match read {
            -1 => None,
            count => {
                let count = usize::try_from(count).map_err(|_| AnswerError("negative entry count"))?;
                Some((0..count).map(|_| take(next()?)).collect::<Result<Vec<_>, _>>()?)
            }
        };
        if !body.is_empty() || !numbers.0.is_empty() {
            return Err(AnswerError("unexpected bytes after the answer"));
        }
        let unsigned = |n: i64| u64::try_from(n).map_err(|_| AnswerError("negative number"));
        Ok(Self {
            status,
            seq: unsigned(seq)?,
            others,
            owner_epoch: unsigned(owner_epoch)?,
            owner_since: unsigned(owner_since)?,
            epoch,
            owner,
            owner_name,
            before,
        })
    }
}

/// The header's numbers, read straight from its bytes (a `str` split and
/// parse cost ~2k more instructions per reply, on the path of every
/// message).
struct Numbers<'a>(&'a [u8]);

impl Numbers<'_> {
    /// The next number, and the one space after it unless it is the last.
    fn next(&mut self) -> Result<i64, AnswerError> {
        let (negative, digits) = match self.0 {
            [b'-', rest @ ..] => (true, rest),
            [] => return Err(AnswerError("header cut short")),
            rest => (false, rest),
        };
        let end = digits.iter().position(|&b| b == b' ').unwrap_or(digits.len());
        if end == 0 {
            return Err(AnswerError("not a number"));
        }
        let mut value: i64 = 0;
        for &digit in &digits[..end] {
            if !digit.is_ascii_digit() {
                return Err(AnswerError("not a number"));
            }
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i64::from(digit - b'0')))
                .ok_or(AnswerError("not a number"))?;
        }
        // A space is taken only with a number after it.
        self.0 = match &digits[end..] {
            [b' ', rest @ ..] if !rest.is_empty() => rest,
            [] => &[],
            _ => return Err(AnswerError("not a number")),
        };
        Ok(if negative { -value } else { value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_append_with_its_history_decodes() {
        let answer = b"1 7 2 3 1700000000000 2 12 11 7 7 8\n5e1b7c9d2a4fagent:anna\nAnna\nB.{\"a\":1}{\"b\":22}";
        let decoded = AppendAnswer::decode(answer).unwrap();
        assert_eq!(
            decoded,
            AppendAnswer {
                status: 1,
                seq: 7,
                others: 2,
                owner_epoch: 3,
                owner_since: 1_700_000_000_000,
                epoch: "5e1b7c9d2a4f",
                owner: "agent:anna\n",
                owner_name: "Anna\nB.",
                before: Some(vec![&b"{\"a\":1}"[..], &b"{\"b\":22}"[..]]),
            }
        );
    }

    #[test]
    fn an_answer_without_history_or_owner_decodes() {
        let decoded = AppendAnswer::decode(b"0 4 0 0 0 -1 0 0 0\n").unwrap();
        assert_eq!((decoded.status, decoded.seq, decoded.before, decoded.owner), (0, 4, None, ""));
        assert_eq!(AppendAnswer::decode(b"1 1 0 0 0 0 2 0 0\nab").unwrap().before, Some(vec![]));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for answer in [
            &b""[..],
            b"1 2 3",
            b"1 2 3 4 5 -1 0 0\n",
            b"1 2 3 4 5 -1 4 0 0\nab",
            b"1 2 3 4 5 -1 0 0 0\nextra",
            b"1 2 3 4 5 -1 0 0 0 9\n",
            b"1 2 3 4 5 2 0 0 0 1\nx",
            b"1 -2 3 4 5 -1 0 0 0\n",
            b"1 2 3 4 5 -1 -1 0 0\n",
            b"x 2 3 4 5 -1 0 0 0\n",
            b"1 2 3 4 5 -1 2 0 0\n\xff\xfe",
            b"1  2 3 4 5 -1 0 0 0\n",
            b"1 2 3 4 5 -1 0 0 0 \n",
            b"- 2 3 4 5 -1 0 0 0\n",
            b"1 99999999999999999999 3 4 5 -1 0 0 0\n",
            b"1 2 3 4 5 -1 0 0 0",
        ] {
            assert!(AppendAnswer::decode(answer).is_err(), "{:?}", String::from_utf8_lossy(answer));
        }
    }
}
