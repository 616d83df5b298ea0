//! OPA bundle signatures: `.signatures.json` holds one JWT whose payload
//! lists every file of the bundle with its SHA-256 digest.
//!
//! Digests follow OPA: raw bytes for policy files; for structured files
//! (`data.json`, `data.yaml`, `.manifest`) the parsed document is hashed
//! in a canonical form (object keys sorted, no whitespace), so that
//! re-indenting a data file does not break its signature.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::read::RawFile;
use super::{BundleError, Rejection};

/// The name of the signatures file at the bundle root.
pub const SIGNATURES_FILE: &str = ".signatures.json";
const HASH_ALGORITHM: &str = "SHA-256";

#[derive(Debug, Serialize, Deserialize)]
struct SignaturesFile {
    #[serde(default)]
    signatures: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plugin: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileDigest {
    name: String,
    hash: String,
    #[serde(default)]
    algorithm: String,
}

/// The JWT payload.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    files: Vec<FileDigest>,
    /// Deprecated in OPA in favour of the header's `kid`; read, not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
}

fn is_structured(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    matches!(
        base,
        "data.json" | "data.yaml" | "data.yml" | ".manifest" | "signatures.json"
    )
}

/// A JSON primitive as Go's encoder writes it with HTML escaping off:
/// `\u2028`/`\u2029` and control characters escaped, `<>&` kept.
fn encode_primitive(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::String(s) => {
            out.push(b'"');
            for c in s.chars() {
                match c {
                    '"' => out.extend_from_slice(b"\\\""),
                    '\\' => out.extend_from_slice(b"\\\\"),
                    '\n' => out.extend_from_slice(b"\\n"),
                    '\r' => out.extend_from_slice(b"\\r"),
                    '\t' => out.extend_from_slice(b"\\t"),
                    '\u{2028}' | '\u{2029}' => {
                        out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                    }
                    c if (c as u32) < 0x20 => {
                        out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                    }
                    c => {
                        let mut buf = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            out.push(b'"');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// The canonical form OPA hashes a structured document in.
fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::Object(map) => {
            out.push(b'{');
            let sorted: BTreeMap<&String, &serde_json::Value> = map.iter().collect();
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode_primitive(&serde_json::Value::String(k.clone()), out);
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        other => encode_primitive(other, out),
    }
}

/// Parses a structured file (JSON, or YAML for `data.yaml`/`data.yml`).
pub fn parse_structured(name: &str, bytes: &[u8]) -> anyhow::Result<serde_json::Value> {
    if name.ends_with(".yaml") || name.ends_with(".yml") {
        yaml_serde::from_slice(bytes).map_err(|e| anyhow!("{name}: invalid YAML: {e}"))
    } else {
        serde_json::from_slice(bytes).map_err(|e| anyhow!("{name}: invalid JSON: {e}"))
    }
}

/// The hex SHA-256 digest of one file, as OPA computes it.
pub fn digest(file: &RawFile) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    if is_structured(&file.name) {
        let doc = parse_structured(&file.name, &file.bytes)?;
        let mut buf = Vec::with_capacity(file.bytes.len());
        canonical(&doc, &mut buf);
        h.update(&buf);
    } else {
        h.update(&file.bytes);
    }
    Ok(hex::encode(h.finalize()))
}

fn parse_algorithm(name: &str) -> anyhow::Result<Algorithm> {
    name.parse::<Algorithm>().map_err(|_| {
        anyhow!("unknown signing algorithm {name:?} (expected RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, HS256, HS384, HS512 or EdDSA)")
    })
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The key bundles must be signed with, from `[policy.bundle.signing]`.
#[derive(Clone)]
pub struct VerificationKey {
    key: DecodingKey,
    algorithm: Algorithm,
    keyid: Option<String>,
    scope: Option<String>,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("algorithm", &self.algorithm)
            .field("keyid", &self.keyid)
            .field("scope", &self.scope)
            .finish()
    }
}

/// The kind of key file an algorithm needs, read the same way for
/// signing and for verifying.
enum KeyKind {
    /// HS*: the shared secret itself.
    Secret,
    Rsa,
    Ec,
    Ed,
}

impl KeyKind {
    fn of(algorithm: Algorithm) -> anyhow::Result<KeyKind> {
        Ok(match algorithm {
            a if is_hmac(a) => KeyKind::Secret,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyKind::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => KeyKind::Ec,
            Algorithm::EdDSA => KeyKind::Ed,
            other => bail!("signing algorithm {other:?} is not supported for bundles"),
        })
    }
}

/// Reads the key file of `algorithm` for signing or for verifying: the
/// shared secret (trimmed) for HS*, else a PEM key that `decode` parses
/// by its kind. `file` and `form` name it in errors.
fn read_key<K>(
    path: &Path,
    algorithm: &str,
    file: &str,
    form: &str,
    decode: impl FnOnce(KeyKind, &[u8]) -> jsonwebtoken::errors::Result<K>,
) -> anyhow::Result<(Algorithm, K)> {
    let algorithm = parse_algorithm(algorithm)?;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {file} {}", path.display()))?;
    let kind = KeyKind::of(algorithm)?;
    let bytes = match kind {
        KeyKind::Secret => trim_secret(&bytes),
        _ => &bytes,
    };
    let key = decode(kind, bytes).map_err(|e| {
        anyhow!(
            "{}: not a {algorithm:?} {form} in PEM form: {e}",
            path.display()
        )
    })?;
    Ok((algorithm, key))
}

impl VerificationKey {
    /// Reads a PEM public key (RSA, EC or Ed25519; a certificate is not
    /// accepted), or for HS* the shared secret, from `path`.
    pub fn open(
        path: &Path,
        algorithm: &str,
        keyid: Option<String>,
        scope: Option<String>,
    ) -> anyhow::Result<Self> {
        let (algorithm, key) = read_key(
            path,
            algorithm,
            "bundle verification key",
            "public key",
            |kind, bytes| match kind {
                KeyKind::Secret => Ok(DecodingKey::from_secret(bytes)),
                KeyKind::Rsa => DecodingKey::from_rsa_pem(bytes),
                KeyKind::Ec => DecodingKey::from_ec_pem(bytes),
                KeyKind::Ed => DecodingKey::from_ed_pem(bytes),
            },
        )?;
        Ok(VerificationKey {
            key,
            algorithm,
            keyid,
            scope,
        })
    }

    /// Checks `.signatures.json` against the key and every other file
    /// against the digests it lists: a file missing from the list, a
    /// listed file missing from the bundle or a digest that differs
    /// rejects the bundle.
    pub fn verify(&self, files: &[RawFile]) -> Result<(), BundleError> {
        let fail = |e: anyhow::Error| BundleError::new(Rejection::Signature, e);
        let sig = files
            .iter()
            .find(|f| f.name == SIGNATURES_FILE)
            .ok_or_else(|| {
                fail(anyhow!(
                    "the bundle is not signed (no {SIGNATURES_FILE}) and [policy.bundle.signing] requires a signature"
                ))
            })?;
        let doc: SignaturesFile = serde_json::from_slice(&sig.bytes)
            .map_err(|e| fail(anyhow!("{SIGNATURES_FILE}: invalid JSON: {e}")))?;
        if let Some(plugin) = &doc.plugin {
            return Err(fail(anyhow!(
                "{SIGNATURES_FILE}: signature plugin {plugin:?} is not supported"
            )));
        }
        let [token] = doc.signatures.as_slice() else {
            return Err(fail(anyhow!(
                "{SIGNATURES_FILE}: expected exactly one JWT, found {}",
                doc.signatures.len()
            )));
        };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| fail(anyhow!("{SIGNATURES_FILE}: unreadable JWT header: {e}")))?;
        let mut validation = Validation::new(self.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Payload>(token, &self.key, &validation).map_err(|e| {
            fail(anyhow!(
                "{SIGNATURES_FILE}: signature does not verify with the configured {:?} key: {e}",
                self.algorithm
            ))
        })?;
        let payload = data.claims;
        if let Some(want) = &self.keyid {
            let got = header.kid.as_ref().or(payload.keyid.as_ref());
            if let Some(got) = got.filter(|g| *g != want) {
                return Err(fail(anyhow!(
                    "{SIGNATURES_FILE}: signed with key id {got:?}, expected {want:?}"
                )));
            }
        }
        if payload.scope.as_deref().unwrap_or("") != self.scope.as_deref().unwrap_or("") {
            return Err(fail(anyhow!(
                "{SIGNATURES_FILE}: scope {:?} does not match the configured scope {:?}",
                payload.scope.unwrap_or_default(),
                self.scope.clone().unwrap_or_default()
            )));
        }
        let mut listed: BTreeMap<String, FileDigest> = BTreeMap::new();
        for f in payload.files {
            let name = super::read::clean_name(&f.name)?;
            listed.insert(name, f);
        }
        for file in files.iter().filter(|f| f.name != SIGNATURES_FILE) {
            let Some(want) = listed.remove(&file.name) else {
                return Err(fail(anyhow!(
                    "{} is not listed in {SIGNATURES_FILE} (added after signing?)",
                    file.name
                )));
            };
            if !want.algorithm.eq_ignore_ascii_case(HASH_ALGORITHM) {
                return Err(fail(anyhow!(
                    "{}: hashing algorithm {:?} is not supported (rempart verifies {HASH_ALGORITHM})",
                    file.name,
                    want.algorithm
                )));
            }
            let got = digest(file).map_err(|e| BundleError::new(Rejection::Invalid, e))?;
            if !got.eq_ignore_ascii_case(&want.hash) {
                return Err(fail(anyhow!(
                    "{}: digest mismatch (signed {}, found {got}): the file was changed after signing",
                    file.name,
                    want.hash
                )));
            }
        }
        if !listed.is_empty() {
            let names: Vec<&String> = listed.keys().collect();
            return Err(fail(anyhow!(
                "{SIGNATURES_FILE} lists files missing from the bundle: {names:?}"
            )));
        }
        Ok(())
    }
}

/// OPA reads an HMAC secret as given; a trailing newline from `echo` into
/// a file is almost never meant to be part of it.
fn trim_secret(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// A private key for `rempart policy build --signing-key`.
pub struct SigningKey {
    key: EncodingKey,
    algorithm: Algorithm,
    keyid: Option<String>,
    scope: Option<String>,
}

impl SigningKey {
    /// Reads a PEM private key (PKCS#8, or PKCS#1/SEC1 for RSA/EC), or for
    /// HS* the shared secret.
    pub fn open(
        path: &Path,
        algorithm: &str,
        keyid: Option<String>,
        scope: Option<String>,
    ) -> anyhow::Result<Self> {
        let (algorithm, key) = read_key(
            path,
            algorithm,
            "signing key",
            "private key",
            |kind, bytes| match kind {
                KeyKind::Secret => Ok(EncodingKey::from_secret(bytes)),
                KeyKind::Rsa => EncodingKey::from_rsa_pem(bytes),
                KeyKind::Ec => EncodingKey::from_ec_pem(bytes),
                KeyKind::Ed => EncodingKey::from_ed_pem(bytes),
            },
        )?;
        Ok(SigningKey {
            key,
            algorithm,
            keyid,
            scope,
        })
    }

    /// The `.signatures.json` for `files` (which must not include it).
    pub fn sign(&self, files: &[RawFile]) -> anyhow::Result<Vec<u8>> {
        let mut digests = Vec::with_capacity(files.len());
        for f in files {
            digests.push(FileDigest {
                name: f.name.clone(),
                hash: digest(f)?,
                algorithm: HASH_ALGORITHM.into(),
            });
        }
        let payload = Payload {
            files: digests,
            keyid: None,
            scope: self.scope.clone(),
            iat: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_secs()).ok()),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = self.keyid.clone();
        let token = jsonwebtoken::encode(&header, &payload, &self.key)
            .map_err(|e| anyhow!("cannot sign the bundle: {e}"))?;
        let doc = SignaturesFile {
            signatures: vec![token],
            plugin: None,
        };
        Ok(serde_json::to_vec(&doc)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> RawFile {
        RawFile {
            name: name.into(),
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn structured_digest_ignores_layout_and_key_order() {
        let a = digest(&file("x/data.json", r#"{"b": [1, 2], "a": "<&>"}"#)).unwrap();
        let b = digest(&file("x/data.json", "{\n  \"a\":\"<&>\",\"b\":[1,2]}")).unwrap();
        assert_eq!(a, b);
        // The canonical text is what OPA hashes: sorted keys, no spaces,
        // no HTML escaping.
        let want = hex::encode(Sha256::digest(br#"{"a":"<&>","b":[1,2]}"#));
        assert_eq!(a, want);
        // Policy files are hashed as bytes.
        let raw = digest(&file("p.rego", "package p\n")).unwrap();
        assert_eq!(raw, hex::encode(Sha256::digest(b"package p\n")));
    }

    #[test]
    fn hmac_round_trip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let signer = SigningKey::open(&secret, "HS256", Some("k1".into()), None).unwrap();
        let mut files = vec![
            file(".manifest", r#"{"revision":"r1"}"#),
            file("p.rego", "package p\n"),
        ];
        let sig = signer.sign(&files).unwrap();
        files.push(RawFile {
            name: SIGNATURES_FILE.into(),
            bytes: sig,
        });
        let key = VerificationKey::open(&secret, "HS256", Some("k1".into()), None).unwrap();
        key.verify(&files).unwrap();

        let mut tampered = files.clone();
        tampered[1].bytes = b"package p\nallow := true\n".to_vec();
        let e = key.verify(&tampered).unwrap_err();
        assert_eq!(e.reason, Rejection::Signature);
        assert!(e.to_string().contains("digest mismatch"), "{e}");

        let mut extra = files.clone();
        extra.push(file("q.rego", "package q\n"));
        let e = key.verify(&extra).unwrap_err();
        assert!(e.to_string().contains("q.rego is not listed"), "{e}");

        let other = dir.path().join("other");
        std::fs::write(&other, "other").unwrap();
        let wrong = VerificationKey::open(&other, "HS256", None, None).unwrap();
        let e = wrong.verify(&files).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");

        let wrong_kid = VerificationKey::open(&secret, "HS256", Some("k2".into()), None).unwrap();
        let e = wrong_kid.verify(&files).unwrap_err();
        assert!(e.to_string().contains("key id"), "{e}");
    }
}
