//! Shared-secret challenge-response for the hello exchange. The secret never
//! crosses the wire: the client proves it knows it with an HMAC-SHA256 over both
//! sides' fresh nonces and the shard it asked for, so a recorded proof is useless
//! for any other connection.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 32;
const CONTEXT: &[u8] = b"dualpath-hello-v1";

fn mac(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], shard: u32) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(CONTEXT);
    for part in [client_nonce, server_nonce] {
        mac.update(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_le_bytes());
        mac.update(part);
    }
    mac.update(&shard.to_le_bytes());
    mac
}

/// The client's proof of the secret for one hello exchange.
pub fn proof(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], shard: u32) -> Vec<u8> {
    mac(secret, client_nonce, server_nonce, shard)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &[u8],
    client_nonce: &[u8],
    server_nonce: &[u8],
    shard: u32,
    proof: &[u8],
) -> bool {
    mac(secret, client_nonce, server_nonce, shard)
        .verify_slice(proof)
        .is_ok()
}

/// What one client may do: the namespaces it may read and those it may write
/// (`*` stands for all). A client holding the cluster secret may do everything;
/// others hold a token naming their grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    pub client: String,
    pub read: Vec<String>,
    pub write: Vec<String>,
    /// Unix time (seconds) after which the grant is void; `None`: until the
    /// cluster secret changes.
    pub expires: Option<u64>,
}

const TOKEN_PREFIX: &str = "dpt1";
const TOKEN_CONTEXT: &[u8] = b"dualpath-token-v1";
/// Longest grant body a token may carry (it travels in the `Hello`).
pub const GRANT_BYTES_MAX: usize = 1024;

impl AccessGrant {
    /// Everything: what the cluster secret itself grants.
    pub fn everything() -> Self {
        Self {
            client: "cluster-secret holder".into(),
            read: vec!["*".into()],
            write: vec!["*".into()],
            expires: None,
        }
    }

    /// Refuses a grant past its expiry at `now` (Unix seconds), naming the
    /// client and the fix.
    pub fn check_expiry(&self, now: u64) -> Result<(), String> {
        match self.expires {
            Some(expires) if now >= expires => Err(format!(
                "the token of {:?} expired {} s ago (at Unix time {expires}); issue a new one with `dualpath token`",
                self.client,
                now - expires
            )),
            _ => Ok(()),
        }
    }

    pub fn may_read(&self, namespace: &str) -> bool {
        Self::lists(&self.read, namespace) || Self::lists(&self.write, namespace)
    }

    pub fn may_write(&self, namespace: &str) -> bool {
        Self::lists(&self.write, namespace)
    }

    fn lists(names: &[String], namespace: &str) -> bool {
        names.iter().any(|name| name == "*" || name == namespace)
    }

    /// The grant as the bytes a token signs: `client=NAME;read=a,b;write=c`,
    /// then `;expires=UNIX_SECONDS` when it expires.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let check = |what: &str, name: &str| {
            if name.is_empty()
                || name.contains([';', ',', '='])
                || name.chars().any(char::is_whitespace)
            {
                Err(format!(
                    "{what} {name:?} must be non-empty without ';', ',', '=' or spaces"
                ))
            } else {
                Ok(())
            }
        };
        check("client name", &self.client)?;
        for name in self.read.iter().chain(&self.write) {
            check("namespace", name)?;
        }
        let mut body = format!(
            "client={};read={};write={}",
            self.client,
            self.read.join(","),
            self.write.join(",")
        );
        if let Some(expires) = self.expires {
            body.push_str(&format!(";expires={expires}"));
        }
        if body.len() > GRANT_BYTES_MAX {
            return Err(format!(
                "the grant is {} bytes; at most {GRANT_BYTES_MAX}",
                body.len()
            ));
        }
        Ok(body.into_bytes())
    }

    pub fn decode(body: &[u8]) -> Result<Self, String> {
        let text =
            std::str::from_utf8(body).map_err(|_| "the token's grant is not UTF-8".to_string())?;
        let mut grant = AccessGrant {
            client: String::new(),
            read: Vec::new(),
            write: Vec::new(),
            expires: None,
        };
        for field in text.split(';') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("bad grant field {field:?}"))?;
            let names = || {
                value
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            match key {
                "client" => grant.client = value.to_owned(),
                "read" => grant.read = names(),
                "write" => grant.write = names(),
                "expires" => {
                    grant.expires =
                        Some(value.parse().map_err(|_| {
                            format!("the grant's expiry {value:?} is not Unix seconds")
                        })?)
                }
                _ => return Err(format!("unknown grant field {key:?}")),
            }
        }
        if grant.client.is_empty() {
            return Err("the grant names no client".into());
        }
        Ok(grant)
    }
}

/// The key a token's holder proves in the hello: derived from the cluster
/// secret and the grant, so it is good only for that grant.
pub fn token_key(secret: &[u8], grant_body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(TOKEN_CONTEXT);
    mac.update(grant_body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// A token for `grant`: `dpt1.<grant hex>.<key hex>`. Give it to one client;
/// it never needs the cluster secret.
pub fn issue_token(secret: &[u8], grant: &AccessGrant) -> Result<String, String> {
    let body = grant.encode()?;
    Ok(format!(
        "{TOKEN_PREFIX}.{}.{}",
        hex(&body),
        hex(&token_key(secret, &body))
    ))
}

/// Splits a token into its grant (sent in the hello) and its key (proved).
pub fn parse_token(token: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let bad = || {
        "not a dualpath access token (expected dpt1.<grant>.<key>, as `dualpath token` prints)"
            .to_string()
    };
    let mut parts = token.trim().split('.');
    let (Some(TOKEN_PREFIX), Some(body), Some(key), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (body, key) = (unhex(body).ok_or_else(bad)?, unhex(key).ok_or_else(bad)?);
    AccessGrant::decode(&body)?;
    Ok((body, key))
}

const SIGNATURE_CONTEXT: &[u8] = b"dualpath-gossip-v1";
/// Bytes of a signature appended by [`sign`].
pub const SIGNATURE_BYTES: usize = 32;

/// Appends an HMAC-SHA256 of `message` under `secret` (gateway-to-gateway gossip).
pub fn sign(secret: &[u8], message: &mut Vec<u8>) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(SIGNATURE_CONTEXT);
    mac.update(message);
    message.extend_from_slice(&mac.finalize().into_bytes());
}

/// Checks and strips the signature `sign` appended; `None` if it does not verify.
pub fn verify_signed<'a>(secret: &[u8], signed: &'a [u8]) -> Option<&'a [u8]> {
    let split = signed.len().checked_sub(SIGNATURE_BYTES)?;
    let (message, signature) = signed.split_at(split);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(SIGNATURE_CONTEXT);
    mac.update(message);
    mac.verify_slice(signature).ok().map(|()| message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_its_grant_and_a_key_only_the_secret_derives() {
        let grant = AccessGrant {
            client: "pe-7".into(),
            read: vec!["kv".into()],
            write: vec!["scratch".into()],
            expires: None,
        };
        let token = issue_token(b"cluster", &grant).expect("issued");
        let (body, key) = parse_token(&token).expect("parses");
        assert_eq!(AccessGrant::decode(&body).expect("grant"), grant);
        assert_eq!(key, token_key(b"cluster", &body));
        assert_ne!(key, token_key(b"other", &body));
        let decoded = AccessGrant::decode(&body).expect("grant");
        assert!(
            decoded.may_read("kv") && decoded.may_read("scratch") && decoded.may_write("scratch")
        );
        assert!(!decoded.may_read("other") && !decoded.may_write("kv"));
        assert!(AccessGrant::everything().may_write("anything"));
        assert!(parse_token("dpt1.zz.00").is_err());
        assert!(parse_token(&token.replace("dpt1", "dpt2")).is_err());
        let bad = AccessGrant {
            client: "a;b".into(),
            read: vec![],
            write: vec![],
            expires: None,
        };
        assert!(issue_token(b"cluster", &bad).is_err());
    }

    #[test]
    fn an_expiry_is_signed_with_the_grant_and_void_from_its_second_on() {
        let grant = AccessGrant {
            client: "pe-8".into(),
            read: vec!["kv".into()],
            write: vec![],
            expires: Some(1_800_000_000),
        };
        let token = issue_token(b"cluster", &grant).expect("issued");
        let (body, key) = parse_token(&token).expect("parses");
        assert_eq!(AccessGrant::decode(&body).expect("grant"), grant);
        // The expiry is part of what the key signs: extending it changes the key.
        let extended = AccessGrant {
            expires: Some(1_900_000_000),
            ..grant.clone()
        };
        assert_ne!(
            key,
            token_key(b"cluster", &extended.encode().expect("encodes"))
        );
        assert!(grant.check_expiry(1_799_999_999).is_ok());
        let error = grant.check_expiry(1_800_000_005).expect_err("expired");
        assert!(
            error.contains("pe-8") && error.contains("expired 5 s ago"),
            "{error}"
        );
        assert!(AccessGrant::everything().check_expiry(u64::MAX).is_ok());
        assert!(AccessGrant::decode(b"client=x;read=;write=;expires=soon")
            .expect_err("not a number")
            .contains("not Unix seconds"));
    }

    #[test]
    fn signed_messages_verify_only_with_the_secret_and_unchanged() {
        let mut message = b"report".to_vec();
        super::sign(b"secret", &mut message);
        assert_eq!(
            super::verify_signed(b"secret", &message),
            Some(&b"report"[..])
        );
        assert_eq!(super::verify_signed(b"other", &message), None);
        message[0] ^= 1;
        assert_eq!(super::verify_signed(b"secret", &message), None);
        assert_eq!(super::verify_signed(b"secret", b"short"), None);
    }

    #[test]
    fn proof_verifies_only_with_the_same_secret_nonces_and_shard() {
        let (client, server) = ([1u8; NONCE_BYTES], [2u8; NONCE_BYTES]);
        let good = proof(b"secret", &client, &server, 3);
        assert!(verify(b"secret", &client, &server, 3, &good));
        assert!(!verify(b"other", &client, &server, 3, &good));
        assert!(!verify(b"secret", &server, &client, 3, &good));
        assert!(!verify(b"secret", &client, &server, 4, &good));
        assert!(!verify(b"secret", &client, &server, 3, &good[..31]));
    }
}
