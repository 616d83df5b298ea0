//! The hash chain that makes the trail tamper-evident.
//!
//! Every line is `{"seq":N,"prev_hash":"…",<record fields>,"hash":"…"}`.
//! `hash` is the SHA-256 (hex) of the line's own bytes as written, with the
//! trailing `,"hash":"…"` removed: the canonical serialisation is the exact
//! bytes on disk, so no JSON re-encoding can disagree about it. `prev_hash`
//! is the previous line's `hash` (64 zeros for the first line of a chain),
//! so editing, deleting, inserting or reordering a line breaks the chain at
//! that line. (Cutting lines off the end leaves a valid shorter chain, and
//! the hash is not secret; the signed checkpoints of [`super::checkpoint`]
//! close those gaps.)

use sha2::{Digest, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_KEY: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;

/// Where the chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    pub fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// The most bytes [`link_into`] adds to a record: `{"seq":N,"prev_hash":"…",`
/// before its fields and `,"hash":"…"}` and the newline after them.
pub const LINE_OVERHEAD_MAX: usize =
    "{\"seq\":,\"prev_hash\":\"\",".len() + 20 + 64 + SUFFIX_LEN + 1;

/// Chains one record (a JSON object, `{…}`) after `head`: returns the line
/// to write (with its newline) and advances `head`.
pub fn link(head: &mut Head, record: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(record.len() + LINE_OVERHEAD_MAX);
    link_into(head, record, &mut line);
    line
}

/// [`link`], appending the line to `out`: the writer chains a whole batch
/// into one buffer without a line's worth of allocation and copy each.
pub fn link_into(head: &mut Head, record: &[u8], out: &mut Vec<u8>) {
    let seq = head.seq + 1;
    let start = out.len();
    out.extend_from_slice(b"{\"seq\":");
    super::record::json_uint(out, seq);
    out.extend_from_slice(b",\"prev_hash\":\"");
    out.extend_from_slice(head.hash.as_bytes());
    out.push(b'"');
    let fields = record.strip_prefix(b"{").unwrap_or(record);
    let fields = fields.strip_suffix(b"}").unwrap_or(fields);
    if !fields.is_empty() {
        out.push(b',');
        out.extend_from_slice(fields);
    }
    out.push(b'}');
    let mut hex = [0u8; 64];
    // Cannot fail: 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(&out[start..]), &mut hex);
    out.pop();
    out.extend_from_slice(HASH_KEY.as_bytes());
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\"}\n");
    head.seq = seq;
    head.hash.clear();
    // Hex digits are ASCII: the whole of them is valid UTF-8.
    head.hash
        .push_str(std::str::from_utf8(&hex).unwrap_or_default());
}

/// What one line says about itself, once its own hash is checked.
#[derive(Debug)]
pub struct Checked {
    pub seq: u64,
    pub prev_hash: String,
    pub hash: String,
    pub timestamp: Option<String>,
    /// The whole record, parsed.
    pub value: serde_json::Value,
}

/// Checks a line's own hash and reads its chain fields. The error says
/// what is wrong with the line itself.
pub fn check_line(line: &str) -> Result<Checked, String> {
    if line.len() < SUFFIX_LEN || !line.ends_with("\"}") {
        return Err("not a chained record (no trailing \"hash\" field)".into());
    }
    let cut = line.len() - SUFFIX_LEN;
    if &line[cut..cut + HASH_KEY.len()] != HASH_KEY {
        return Err("not a chained record (no trailing \"hash\" field)".into());
    }
    let stated = &line[cut + HASH_KEY.len()..line.len() - 2];
    let mut body = line[..cut].to_string();
    body.push('}');
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != stated {
        return Err(format!("hash mismatch: the line says {stated}, its content hashes to {actual} (the record was edited)"));
    }
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v["seq"].as_u64().ok_or("no \"seq\" field")?;
    let prev_hash = v["prev_hash"]
        .as_str()
        .ok_or("no \"prev_hash\" field")?
        .to_string();
    Ok(Checked {
        seq,
        prev_hash,
        hash: stated.to_string(),
        timestamp: v["timestamp"].as_str().map(String::from),
        value: v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_never_outgrows_its_reserved_overhead() {
        for record in [&br#"{}"#[..], br#"{"decision_id":"a"}"#] {
            for seq in [0, 9, u64::MAX - 1] {
                let mut head = Head {
                    seq,
                    hash: GENESIS.to_string(),
                };
                let line = link(&mut head, record);
                assert!(line.len() <= record.len() + LINE_OVERHEAD_MAX);
                assert!(line.capacity() == record.len() + LINE_OVERHEAD_MAX);
            }
        }
        let mut head = Head {
            seq: u64::MAX - 1,
            hash: GENESIS.to_string(),
        };
        // The longest seq and the shortest record: exactly the overhead
        // less the record's own braces, less the comma it did not need.
        let line = link(&mut head, b"{}");
        assert_eq!(line.len(), LINE_OVERHEAD_MAX + 2 - 2 - 1);
    }

    #[test]
    fn linked_lines_check_and_edits_do_not() {
        let mut head = Head::genesis();
        let a = String::from_utf8(link(&mut head, br#"{"decision_id":"a","status":200}"#)).unwrap();
        let b = String::from_utf8(link(&mut head, br#"{"decision_id":"b","status":403}"#)).unwrap();
        let ca = check_line(a.trim_end()).unwrap();
        let cb = check_line(b.trim_end()).unwrap();
        assert_eq!((ca.seq, ca.prev_hash.as_str()), (1, GENESIS));
        assert_eq!((cb.seq, &cb.prev_hash), (2, &ca.hash));
        assert_eq!(
            head,
            Head {
                seq: 2,
                hash: cb.hash.clone()
            }
        );
        assert!(a.starts_with(r#"{"seq":1,"prev_hash":"000"#));
        let edited = a.replace("\"status\":200", "\"status\":201");
        assert!(check_line(edited.trim_end())
            .unwrap_err()
            .contains("hash mismatch"));
        assert!(check_line(r#"{"decision_id":"x"}"#).is_err());
    }

    #[test]
    fn sequence_numbers_are_written_in_full_decimal() {
        for (from, written) in [
            (9, "10"),
            (99_999, "100000"),
            (u64::MAX - 1, "18446744073709551615"),
        ] {
            let mut head = Head {
                seq: from,
                hash: GENESIS.to_string(),
            };
            let line = String::from_utf8(link(&mut head, br#"{"status":200}"#)).unwrap();
            assert!(
                line.starts_with(&format!(
                    r#"{{"seq":{written},"prev_hash":"{GENESIS}","status":200,"hash":""#
                )),
                "{line}"
            );
            let checked = check_line(line.trim_end()).unwrap();
            assert_eq!((checked.seq, &checked.hash), (from + 1, &head.hash));
        }
    }
}
