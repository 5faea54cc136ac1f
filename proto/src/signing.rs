//! Ed25519 signatures: runners sign commands, agents sign results and announcements.
//!
//! The signature covers the exact message body as sent, prefixed with a context string so a
//! signature made for one purpose can never be replayed as another (a result is not a
//! command). It travels in AMQP headers next to the signer's public key; receivers verify it
//! over the bytes received before they parse anything.
//!
//! Key files:
//! - a private key is PKCS#8 PEM (`openssl pkey -in runner.key -pubout` reads it), mode 0600;
//!   a key readable by group or others is refused, as ssh does;
//! - a public key is one line, `ed25519 <base64> [comment]`;
//! - an authorized-keys file holds public-key lines, each optionally preceded by
//!   restrictions: `plugins=dpkg,rpms nodes=web*,db01 ed25519 <base64> helpdesk`.
//!
//! Reading and writing those files is `vogeler_core::keyfile`'s; this module only parses and
//! verifies, so the fuzzers and the unit tests need no file system.

use std::{fmt, path::PathBuf};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{
    Signature, Signer, SigningKey, Verifier, VerifyingKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use sha2::{Digest, Sha256};

/// The AMQP header carrying the base64 signature.
pub const SIGNATURE_HEADER: &str = "x-vogeler-signature";
/// The AMQP header carrying the signer's base64 public key.
pub const KEY_HEADER: &str = "x-vogeler-key";

/// What a signature is for; each has its own context string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Runner → agents.
    Command,
    /// Agent → server and runner (results and announcements).
    Agent,
}

impl Purpose {
    fn context(self) -> &'static [u8] {
        match self {
            Purpose::Command => b"vogeler command v1\0",
            Purpose::Agent => b"vogeler agent v1\0",
        }
    }
}

fn signed_bytes(purpose: Purpose, body: &[u8]) -> Vec<u8> {
    let ctx = purpose.context();
    let mut v = Vec::with_capacity(ctx.len() + body.len());
    v.extend_from_slice(ctx);
    v.extend_from_slice(body);
    v
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 private key in PKCS#8 PEM format: {reason}")]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("private key {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    Unprotected { path: PathBuf, mode: u32 },
    #[error("{path} already exists; remove it first or choose another directory")]
    Exists { path: PathBuf },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
    #[error("invalid authorized keys:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Authorized(Vec<String>),
}

/// Why a signed message was refused. Messages name the signer where one is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("message is not signed (no {SIGNATURE_HEADER} and {KEY_HEADER} headers)")]
    Unsigned,
    #[error("message carries a malformed public key")]
    BadKey,
    #[error("message carries a malformed signature")]
    BadSignatureFormat,
    #[error("signature by key {0} does not match the message (tampered or corrupted)")]
    BadSignature(String),
}

/// A private signing key. Never printed.
#[derive(Clone)]
pub struct PrivateKey(SigningKey);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({})", self.public().id())
    }
}

impl PrivateKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The key a 32-byte seed makes: for tests and simulated fleets that need many keys
    /// they can make again. A real key comes from [`PrivateKey::generate`].
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Parse a PKCS#8 PEM private key; the error says why it is not one.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, String> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// The key as PKCS#8 PEM, the way [`PrivateKey::from_pkcs8_pem`] reads it.
    pub fn to_pkcs8_pem(&self) -> Result<String, String> {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| e.to_string())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The two header values (public key, signature) for `body`.
    pub fn sign(&self, purpose: Purpose, body: &[u8]) -> (String, String) {
        let sig = self.0.sign(&signed_bytes(purpose, body));
        (self.public().to_base64(), B64.encode(sig.to_bytes()))
    }
}

/// A public key: who signed a message.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

impl PublicKey {
    /// A short fingerprint for logs and audit lines: the first 8 bytes of the SHA-256 of the
    /// key, in hex.
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_bytes())
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        let bytes: [u8; 32] = B64.decode(s.trim()).ok()?.try_into().ok()?;
        VerifyingKey::from_bytes(&bytes).ok().map(Self)
    }

    /// The one-line public key file format.
    pub fn to_line(&self, comment: &str) -> String {
        format!("ed25519 {} {comment}", self.to_base64())
            .trim_end()
            .to_string()
    }

    /// Check `signature` (base64) over `body` for `purpose`.
    pub fn verify(&self, purpose: Purpose, body: &[u8], signature: &str) -> Result<(), SignError> {
        let bytes: [u8; 64] = B64
            .decode(signature.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SignError::BadSignatureFormat)?;
        self.0
            .verify(&signed_bytes(purpose, body), &Signature::from_bytes(&bytes))
            .map_err(|_| SignError::BadSignature(self.id()))
    }
}

/// Verify a message from its header values; returns the signer's key. Whether that signer
/// is trusted is the caller's decision.
pub fn verify(
    purpose: Purpose,
    body: &[u8],
    key: Option<&str>,
    signature: Option<&str>,
) -> Result<PublicKey, SignError> {
    let (Some(key), Some(signature)) = (key, signature) else {
        return Err(SignError::Unsigned);
    };
    let key = PublicKey::from_base64(key).ok_or(SignError::BadKey)?;
    key.verify(purpose, body, signature)?;
    Ok(key)
}

/// One trusted runner key and what it may do.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    pub key: PublicKey,
    pub comment: String,
    /// Plugin name patterns this key may run; `None`: any.
    pub plugins: Option<Vec<glob::Pattern>>,
    /// Node name patterns this key may command; `None`: any.
    pub nodes: Option<Vec<glob::Pattern>>,
    /// `file:line`, for messages.
    pub source: String,
}

impl AuthorizedKey {
    /// Whether this key may run `plugin` on `node`; the error says which restriction denied.
    pub fn permits(&self, plugin: &str, node: &str) -> Result<(), String> {
        let allowed = |patterns: &Option<Vec<glob::Pattern>>, name: &str| {
            patterns
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p.matches(name)))
        };
        if !allowed(&self.plugins, plugin) {
            return Err(format!(
                "key {} may not run plugin {plugin} (restricted to plugins={})",
                self.key.id(),
                join(&self.plugins)
            ));
        }
        if !allowed(&self.nodes, node) {
            return Err(format!(
                "key {} may not command node {node} (restricted to nodes={})",
                self.key.id(),
                join(&self.nodes)
            ));
        }
        Ok(())
    }
}

fn join(patterns: &Option<Vec<glob::Pattern>>) -> String {
    patterns
        .iter()
        .flatten()
        .map(glob::Pattern::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// The runner keys an agent trusts.
#[derive(Debug, Clone, Default)]
pub struct AuthorizedKeys {
    keys: Vec<AuthorizedKey>,
}

impl AuthorizedKeys {
    /// Parse authorized-keys text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        Self::parse_all([(text, origin)])
    }

    /// Parse several texts, each named by its origin; every bad line is reported at once.
    pub fn parse_all<'a>(
        texts: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, KeyError> {
        let mut problems = Vec::new();
        let mut keys = Vec::new();
        for (text, origin) in texts {
            for (i, line) in text.lines().enumerate() {
                let source = format!("{origin}:{}", i + 1);
                match parse_line(line, &source) {
                    Ok(Some(k)) => keys.push(k),
                    Ok(None) => {}
                    Err(e) => problems.push(format!("{source}: {e}")),
                }
            }
        }
        if problems.is_empty() {
            Ok(Self { keys })
        } else {
            Err(KeyError::Authorized(problems))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The entry for `key`, if it is trusted.
    pub fn find(&self, key: &PublicKey) -> Option<&AuthorizedKey> {
        self.keys.iter().find(|k| k.key == *key)
    }
}

/// One line: `[plugins=a,b] [nodes=x*,y] ed25519 BASE64 [comment]`; blank and `#` lines
/// are skipped.
fn parse_line(line: &str, source: &str) -> Result<Option<AuthorizedKey>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(at) = words.iter().position(|w| *w == "ed25519") else {
        return Err("no \"ed25519 <key>\" on this line".into());
    };
    let (mut plugins, mut nodes) = (None, None);
    for option in &words[..at] {
        let (name, value) = option
            .split_once('=')
            .ok_or_else(|| format!("{option:?} is not a restriction (plugins=... or nodes=...)"))?;
        let patterns = value
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| glob::Pattern::new(p).map_err(|e| format!("bad pattern {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if patterns.is_empty() {
            return Err(format!("{name}= lists nothing"));
        }
        match name {
            "plugins" => plugins = Some(patterns),
            "nodes" => nodes = Some(patterns),
            other => {
                return Err(format!(
                    "unknown restriction {other:?}; use plugins= or nodes="
                ));
            }
        }
    }
    let key = words
        .get(at + 1)
        .and_then(|k| PublicKey::from_base64(k))
        .ok_or("the key after \"ed25519\" is not a base64 Ed25519 public key")?;
    Ok(Some(AuthorizedKey {
        key,
        comment: words[at + 2..].join(" "),
        plugins,
        nodes,
        source: source.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip_and_bind_purpose() {
        let k = PrivateKey::generate().expect("key");
        let (key, sig) = k.sign(Purpose::Command, b"{\"a\":1}");
        let signer = verify(Purpose::Command, b"{\"a\":1}", Some(&key), Some(&sig)).expect("ok");
        assert_eq!(signer, k.public());
        assert!(matches!(
            verify(Purpose::Command, b"{\"a\":2}", Some(&key), Some(&sig)),
            Err(SignError::BadSignature(_))
        ));
        assert!(matches!(
            verify(Purpose::Agent, b"{\"a\":1}", Some(&key), Some(&sig)),
            Err(SignError::BadSignature(_))
        ));
        assert_eq!(
            verify(Purpose::Command, b"x", None, Some(&sig)),
            Err(SignError::Unsigned)
        );
        assert_eq!(
            verify(Purpose::Command, b"x", Some("AAAA"), Some(&sig)),
            Err(SignError::BadKey)
        );
        assert_eq!(
            verify(Purpose::Command, b"x", Some(&key), Some("!!")),
            Err(SignError::BadSignatureFormat)
        );
    }

    #[test]
    fn pem_round_trip_and_debug_hides_the_key() {
        let k = PrivateKey::generate().expect("key");
        let pem = k.to_pkcs8_pem().expect("pem");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let again = PrivateKey::from_pkcs8_pem(&pem).expect("parse");
        assert_eq!(again.public(), k.public());
        assert!(PrivateKey::from_pkcs8_pem("not a key").is_err());
        assert!(!format!("{k:?}").contains(&k.public().to_base64()));
    }

    #[test]
    fn authorized_keys_with_restrictions() {
        let a = PrivateKey::generate().expect("key").public();
        let b = PrivateKey::generate().expect("key").public();
        let text = format!(
            "# ops\n{}\n\nplugins=dpkg,os_* nodes=web* {}\n",
            a.to_line("ops@admin"),
            b.to_line("helpdesk")
        );
        let keys = AuthorizedKeys::parse(&text, "test").expect("parse");
        assert_eq!(keys.len(), 2);
        let ops = keys.find(&a).expect("a");
        assert_eq!(ops.comment, "ops@admin");
        assert!(ops.permits("anything", "db01").is_ok());
        let help = keys.find(&b).expect("b");
        assert!(help.permits("dpkg", "web01").is_ok());
        assert!(help.permits("os_release", "web02").is_ok());
        let err = help.permits("users", "web01").expect_err("plugin");
        assert!(err.contains("plugins=dpkg,os_*"), "{err}");
        let err = help.permits("dpkg", "db01").expect_err("node");
        assert!(err.contains("nodes=web*"), "{err}");
    }

    #[test]
    fn bad_authorized_lines_are_all_reported() {
        let text = "ed25519 notakey\nhosts=x ed25519 AAAA\nssh-rsa AAAA\nplugins= ed25519 AAAA\n";
        let KeyError::Authorized(problems) = AuthorizedKeys::parse(text, "f").expect_err("invalid")
        else {
            panic!("wrong error")
        };
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].starts_with("f:1:"), "{problems:#?}");
        assert!(problems[1].contains("unknown restriction"), "{problems:#?}");
    }
}
