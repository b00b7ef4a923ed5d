//! HS256 JWT tokens (`sub`, `exp`): issued by the bundled client, checked by the backend.
//!
//! The claims are deliberately minimal: the backend only needs to know who the
//! user is (`sub`) and that the token is still fresh (`exp`). A token from another
//! issuer may also carry `nbf` (not before); when present it is enforced too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The documented demo secret, used when neither `--secret` nor `LB_SECRET` is given.
pub const DEFAULT_SECRET: &str = "lb-demo-secret";

/// The claims carried by a token: the user it names and when it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user name.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was rejected; each variant is a distinct reason shown to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The token's `exp` lies in the past.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` (not before) lies in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// The token is well-formed but was not signed with our secret (or not with HS256).
    #[error("bad token signature")]
    BadSignature,
    /// The token is not a JWT we understand (shape, encoding, or claims).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The secret is empty; HMAC keys must not be.
    #[error("empty token secret")]
    EmptySecret,
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues a token for `user` valid for `ttl` from now.
///
/// # Panics
/// If `secret` is empty (see [`try_issue`] for the fallible form).
pub fn issue(secret: &str, user: &str, ttl: Duration) -> String {
    try_issue(secret, user, ttl).expect("token secret must not be empty")
}

/// Issues a token for `user` valid for `ttl` from now; fails only on an empty secret.
pub fn try_issue(secret: &str, user: &str, ttl: Duration) -> Result<String, TokenError> {
    issue_claims(
        secret,
        &Claims {
            sub: user.to_string(),
            exp: now_unix().saturating_add(ttl.as_secs()),
        },
    )
}

/// Signs arbitrary claims (also lets tests mint already-expired tokens); fails
/// only on an empty secret.
pub fn issue_claims(secret: &str, claims: &Claims) -> Result<String, TokenError> {
    let key = EncodingKey::from_secret(secret.as_bytes()).map_err(|_| TokenError::EmptySecret)?;
    // With a valid HMAC key, signing plain claims has no failure mode left.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| TokenError::Malformed(e.to_string()))
}

/// Checks signature, expiry and (if present) not-before of `token`; returns its claims.
/// `exp` and a non-empty `sub` are required; `nbf` is optional.
pub fn verify(secret: &str, token: &str) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Backends and clients of this product share a clock (or NTP); an expiry is an
    // expiry, and a start time is a start time.
    validation.leeway = 0;
    validation.validate_exp = true;
    // Checked only when the token has an `nbf`; a malformed one is refused.
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|_| TokenError::EmptySecret)?;
    let data =
        jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            // A token signed with another algorithm is as untrusted as a forged one.
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
            _ => TokenError::Malformed(e.to_string()),
        })?;
    if data.claims.sub.is_empty() {
        return Err(TokenError::Malformed("empty sub".into()));
    }
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = issue("s", "alice", Duration::from_secs(60));
        let c = verify("s", &t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.exp >= now_unix() + 59);
    }

    #[test]
    fn wrong_secret_is_bad_signature() {
        let t = issue("s", "alice", Duration::from_secs(60));
        assert_eq!(verify("other", &t), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired() {
        let t = issue_claims(
            "s",
            &Claims {
                sub: "alice".into(),
                exp: now_unix() - 10,
            },
        )
        .unwrap();
        assert_eq!(verify("s", &t), Err(TokenError::Expired));
    }

    /// Signs arbitrary JSON claims (for claims `Claims` cannot express).
    fn sign_json(secret: &str, claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    #[test]
    fn not_before() {
        let now = now_unix();
        let exp = now + 3600;
        let t = sign_json(
            "s",
            serde_json::json!({"sub": "a", "exp": exp, "nbf": now + 60}),
        );
        assert_eq!(verify("s", &t), Err(TokenError::NotYetValid));
        // Leeway 0: even one second early is refused.
        let t = sign_json(
            "s",
            serde_json::json!({"sub": "a", "exp": exp, "nbf": now + 2}),
        );
        assert_eq!(verify("s", &t), Err(TokenError::NotYetValid));
        let t = sign_json(
            "s",
            serde_json::json!({"sub": "a", "exp": exp, "nbf": now - 1}),
        );
        assert_eq!(verify("s", &t).map(|c| c.sub), Ok("a".to_string()));
        let t = sign_json(
            "s",
            serde_json::json!({"sub": "a", "exp": exp, "nbf": "soon"}),
        );
        assert!(matches!(verify("s", &t), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn sub_and_exp_required() {
        let exp = now_unix() + 3600;
        for claims in [
            serde_json::json!({"exp": exp}),
            serde_json::json!({"sub": "", "exp": exp}),
            serde_json::json!({"sub": "a"}),
        ] {
            let t = sign_json("s", claims.clone());
            assert!(
                matches!(verify("s", &t), Err(TokenError::Malformed(_))),
                "{claims} accepted"
            );
        }
    }

    #[test]
    fn malformed() {
        assert!(matches!(
            verify("s", "not-a-jwt"),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(verify("s", ""), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn empty_secret_is_an_error_not_a_panic() {
        assert_eq!(
            try_issue("", "alice", Duration::from_secs(1)),
            Err(TokenError::EmptySecret)
        );
        assert_eq!(verify("", "a.b.c"), Err(TokenError::EmptySecret));
    }
}
