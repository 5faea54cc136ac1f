//! What a receiver checks before it believes a message from an agent: the size, the
//! signature over the bytes received, then the decoding. Which signer is the right one for a
//! node is the store's decision (it pins each node's key); the runner only needs the reply to
//! be signed and intact.

use crate::{
    limits::MAX_MESSAGE_BYTES,
    signing::{self, PublicKey, Purpose},
    wire::{self, Message},
};

/// A message whose signature checked out, with its signer.
#[derive(Debug, Clone)]
pub struct Signed {
    pub message: Message,
    pub signer: PublicKey,
}

/// Check and decode a result or announcement as it came off the broker; the error is the
/// reason it is refused (it goes to logs and the dead-letter header).
pub fn from_agent(
    body: &[u8],
    key: Option<&str>,
    signature: Option<&str>,
) -> Result<Signed, String> {
    // Before hashing: a signature over 64 MiB of garbage is not worth checking.
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message is {} bytes, over the limit of {MAX_MESSAGE_BYTES}",
            body.len()
        ));
    }
    let signer =
        signing::verify(Purpose::Agent, body, key, signature).map_err(|e| e.to_string())?;
    let message = wire::decode(body).map_err(|e| e.to_string())?;
    Ok(Signed { message, signer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::PrivateKey;

    #[test]
    fn signed_intact_messages_pass_and_everything_else_says_why() {
        let key = PrivateKey::generate().expect("key");
        let body = include_bytes!("../tests/fixtures/result.json");
        let (k, s) = key.sign(Purpose::Agent, body);
        let signed = from_agent(body, Some(&k), Some(&s)).expect("valid");
        assert_eq!(signed.signer, key.public());
        assert_eq!(signed.message.kind(), "result");

        let err = from_agent(body, None, None).expect_err("unsigned");
        assert!(err.contains("not signed"), "{err}");
        let (k2, s2) = key.sign(Purpose::Command, body);
        assert!(
            from_agent(body, Some(&k2), Some(&s2)).is_err(),
            "wrong purpose"
        );
        let (k3, s3) = key.sign(Purpose::Agent, b"{}");
        let err = from_agent(b"{}", Some(&k3), Some(&s3)).expect_err("undecodable");
        assert!(err.contains("schema"), "{err}");
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        let err = from_agent(&big, Some(&k), Some(&s)).expect_err("too large");
        assert!(err.contains("over the limit"), "{err}");
    }
}
