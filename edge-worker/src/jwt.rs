//! HS256 JWT verification (RustCrypto `hmac` + `sha2`: pure Rust, so it builds for wasm32).
//!
//! Only a token whose signature verifies with the Worker's secret, whose `alg` is `HS256`, whose
//! `exp`/`nbf` hold at `now` and whose `iss` matches (when configured) yields claims; anything
//! else is no identity from the token (the caller falls back to its API key or address), never
//! an error the client can see.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::config::JwtConfig;
use crate::shard::OwnedClaims;

/// The token in a `Bearer <token>` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Verifies `token` with `secret` at `now_secs`; the configured claims on success.
pub fn verify(
    token: &str,
    secret: &[u8],
    config: &JwtConfig,
    now_secs: u64,
) -> Option<OwnedClaims> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    if header.get("alg")?.as_str()? != "HS256" {
        return None;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(token.get(..token.len() - signature.len() - 1)?.as_bytes());
    mac.verify_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?)
        .ok()?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    if claims
        .get("exp")
        .and_then(Value::as_u64)
        .is_some_and(|exp| now_secs >= exp)
    {
        return None;
    }
    if claims
        .get("nbf")
        .and_then(Value::as_u64)
        .is_some_and(|nbf| now_secs < nbf)
    {
        return None;
    }
    if let Some(issuer) = &config.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return None;
        }
    }
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let sub = text(&config.sub)?;
    Some(OwnedClaims {
        sub: Some(sub),
        org: text(&config.org),
        plan: text(&config.plan),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], header: &str, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    fn config() -> JwtConfig {
        serde_json::from_str(r#"{"issuer":"e2e"}"#).unwrap()
    }

    #[test]
    fn a_good_token_yields_its_claims_and_anything_else_nothing() {
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        let claims = serde_json::json!({"iss":"e2e","sub":"u1","org":"o1","plan":"pro","exp":2000});
        let good = sign(b"s3cret", hs, &claims);
        assert_eq!(
            verify(&good, b"s3cret", &config(), 1000),
            Some(OwnedClaims {
                sub: Some("u1".into()),
                org: Some("o1".into()),
                plan: Some("pro".into())
            })
        );
        assert_eq!(bearer(&format!("Bearer {good}")), Some(good.as_str()));
        for (token, now) in [
            (good.clone(), 2000),                                  // expired
            (sign(b"other", hs, &claims), 1000),                   // wrong key
            (sign(b"s3cret", r#"{"alg":"none"}"#, &claims), 1000), // wrong alg
            (
                sign(b"s3cret", hs, &serde_json::json!({"iss":"x","sub":"u"})),
                1000,
            ), // issuer
            (sign(b"s3cret", hs, &serde_json::json!({"iss":"e2e"})), 1000), // no subject
            (format!("{good}x"), 1000),                            // tampered
            ("a.b".to_string(), 1000),
        ] {
            assert_eq!(verify(&token, b"s3cret", &config(), now), None, "{token}");
        }
    }
}
