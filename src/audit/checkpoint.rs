//! Signed checkpoints: every so often the writer appends a record carrying
//! the chain head (seq and hash of the record before it) signed with an
//! Ed25519 key that only rempart holds. Someone who can write the trail but
//! not read the key cannot rebuild the chain after an edit without the
//! signatures failing, nor cut a trail back past a checkpoint unseen.
//! The threat model is in docs/audit.md.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use super::chain::Head;

/// What is signed: a fixed label, then the head.
pub fn message(seq: u64, hash: &str) -> Vec<u8> {
    format!("rempart-audit-checkpoint-v1\n{seq}\n{hash}").into_bytes()
}

/// A short name for a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Reads an Ed25519 private key: PKCS#8 PEM (`openssl genpkey -algorithm
/// ed25519`, or `rempart audit keygen`), 32 raw bytes, or 64 hex digits.
pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read audit signing key {}", path.display()))?;
    let what = || format!("audit signing key {}", path.display());
    if let Some(text) = pem_text(&bytes) {
        return SigningKey::from_pkcs8_pem(text)
            .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 private key: {e}", what()));
    }
    Ok(SigningKey::from_bytes(&raw_key(&bytes).with_context(what)?))
}

/// Reads an Ed25519 public key: SPKI PEM (`openssl pkey -pubout`, or the
/// `.pub` file of `rempart audit keygen`), 32 raw bytes, or 64 hex digits.
pub fn load_verifying_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    let what = || format!("public key {}", path.display());
    if let Some(text) = pem_text(&bytes) {
        return VerifyingKey::from_public_key_pem(text)
            .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 public key: {e}", what()));
    }
    VerifyingKey::from_bytes(&raw_key(&bytes).with_context(what)?)
        .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 public key: {e}", what()))
}

fn pem_text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .map(str::trim)
        .filter(|t| t.starts_with("-----BEGIN"))
}

fn raw_key(bytes: &[u8]) -> anyhow::Result<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Ok(raw);
    }
    let text = std::str::from_utf8(bytes).unwrap_or("").trim();
    match hex::decode(text).ok().map(<[u8; 32]>::try_from) {
        Some(Ok(raw)) => Ok(raw),
        _ => bail!(
            "expected PEM, 32 raw bytes or 64 hex digits ({} bytes found)",
            bytes.len()
        ),
    }
}

/// A new key pair as (private PKCS#8 PEM, public SPKI PEM, key id), from
/// the operating system's random source.
pub fn generate() -> anyhow::Result<(String, String, String)> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?,
        &mut seed,
    )
    .context("cannot read /dev/urandom")?;
    let key = SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("cannot encode the private key: {e}"))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("cannot encode the public key: {e}"))?;
    Ok((private.to_string(), public, key_id(&key.verifying_key())))
}

/// The writer's side: when to sign, and the checkpoint records.
pub struct Checkpointer {
    key: SigningKey,
    key_id: String,
    every_records: u64,
    every: Option<Duration>,
    /// Records chained since the last checkpoint.
    pub since: u64,
    last: Instant,
}

impl Checkpointer {
    pub fn new(key: SigningKey, every_records: u64, every: Option<Duration>) -> Checkpointer {
        Checkpointer {
            key_id: key_id(&key.verifying_key()),
            key,
            every_records,
            every,
            since: 0,
            last: Instant::now(),
        }
    }

    pub fn due(&self) -> bool {
        self.since > 0
            && ((self.every_records > 0 && self.since >= self.every_records)
                || self.every.is_some_and(|e| self.last.elapsed() >= e))
    }

    /// How long until the interval makes a checkpoint due (when records
    /// are waiting for one), so that an idle writer still signs them.
    pub fn wait(&self) -> Option<Duration> {
        let every = self.every.filter(|_| self.since > 0)?;
        Some(every.saturating_sub(self.last.elapsed()))
    }

    /// The checkpoint record (a JSON object) signing `head`.
    pub fn record(&mut self, head: &Head) -> Vec<u8> {
        let signature = self.key.sign(&message(head.seq, &head.hash));
        self.since = 0;
        self.last = Instant::now();
        serde_json::json!({
            "type": "checkpoint",
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "signed_seq": head.seq,
            "signed_hash": head.hash,
            "key_id": self.key_id,
            "signature": hex::encode(signature.to_bytes()),
        })
        .to_string()
        .into_bytes()
    }
}

/// Checks a checkpoint record against the record before it (`prev`: its
/// seq and hash) and the public key.
pub fn check(
    v: &serde_json::Value,
    prev: Option<&(u64, String)>,
    key: &VerifyingKey,
) -> Result<(), String> {
    let seq = v["signed_seq"]
        .as_u64()
        .ok_or("checkpoint without signed_seq")?;
    let hash = v["signed_hash"]
        .as_str()
        .ok_or("checkpoint without signed_hash")?;
    match prev {
        Some((pseq, phash)) if *pseq == seq && phash == hash => {}
        Some((pseq, phash)) => {
            return Err(format!(
                "checkpoint signs seq {seq} hash {hash}, but the record before it is seq {pseq} hash {phash}"
            ))
        }
        None => return Err("a checkpoint cannot be the first record checked".into()),
    }
    let expected = key_id(key);
    let id = v["key_id"].as_str().unwrap_or("");
    if id != expected {
        return Err(format!(
            "checkpoint signed by key {id}, not by the given public key ({expected})"
        ));
    }
    let sig = v["signature"]
        .as_str()
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or("checkpoint signature is not 128 hex digits")?;
    key.verify(&message(seq, hash), &Signature::from_bytes(&sig))
        .map_err(|_| "checkpoint signature does not verify: the chain up to here was rewritten, or the checkpoint forged".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_verify_with_the_right_key_only() {
        let (private, public, id) = generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (kp, pp) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
        std::fs::write(&kp, &private).unwrap();
        std::fs::write(&pp, &public).unwrap();
        let key = load_signing_key(&kp).unwrap();
        let pubkey = load_verifying_key(&pp).unwrap();
        assert_eq!(key_id(&pubkey), id);
        let mut cp = Checkpointer::new(key, 2, None);
        cp.since = 2;
        assert!(cp.due());
        let head = Head {
            seq: 7,
            hash: "ab".repeat(32),
        };
        let rec: serde_json::Value = serde_json::from_slice(&cp.record(&head)).unwrap();
        assert!(!cp.due());
        let prev = (7, "ab".repeat(32));
        check(&rec, Some(&prev), &pubkey).unwrap();
        let other = (7, "cd".repeat(32));
        assert!(check(&rec, Some(&other), &pubkey)
            .unwrap_err()
            .contains("record before it"));
        let stranger = SigningKey::from_bytes(&[9; 32]).verifying_key();
        assert!(check(&rec, Some(&prev), &stranger)
            .unwrap_err()
            .contains("not by the given public key"));
        let mut forged = rec.clone();
        forged["signature"] = serde_json::json!("00".repeat(64));
        assert!(check(&forged, Some(&prev), &pubkey)
            .unwrap_err()
            .contains("does not verify"));
        // Raw and hex keys are accepted too; garbage is named.
        std::fs::write(&pp, hex::encode(pubkey.as_bytes())).unwrap();
        assert_eq!(load_verifying_key(&pp).unwrap(), pubkey);
        std::fs::write(&kp, "not a key").unwrap();
        assert!(format!("{:#}", load_signing_key(&kp).unwrap_err()).contains("64 hex digits"));
    }
}
