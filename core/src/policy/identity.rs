//! Who is calling: resolved from the credentials a runtime extracted, in the configured order.
//! An unknown API key is not an identity — otherwise anyone could mint fresh buckets by sending
//! random keys — so it falls through to the next source (usually the client address).

use std::sync::Arc;

use super::compile::Policy;
use super::document::IdentitySource;
use crate::hash;

/// How a caller was identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A known API key.
    ApiKey,
    /// Claims verified upstream (Envoy's `jwt_authn`, or the worker's verifier).
    Jwt,
    /// The client address only.
    ClientIp,
    /// Nothing at all.
    Anonymous,
}

/// The caller, as the limiter counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// How it was identified.
    pub kind: IdentityKind,
    /// Key id, subject, or `ip:<address>`; never a secret.
    pub user: Option<Arc<str>>,
    /// The org, when known.
    pub org: Option<Arc<str>>,
    /// The plan whose limits apply.
    pub plan: Arc<str>,
}

/// Verified claims: the subject, org and plan a JWT verifier vouched for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims<'a> {
    /// `sub`.
    pub sub: Option<&'a str>,
    /// The org claim.
    pub org: Option<&'a str>,
    /// The plan or tier claim.
    pub plan: Option<&'a str>,
}

/// What a runtime extracted from a request.
#[derive(Clone, Debug, Default)]
pub struct Credentials<'a> {
    /// An API key (already stripped of `Bearer `).
    pub api_key: Option<&'a str>,
    /// Claims verified upstream.
    pub claims: Option<Claims<'a>>,
    /// The client address.
    pub client_ip: Option<&'a str>,
}

/// The API key carried by header `name` with `value`: `authorization` must be `Bearer <key>`,
/// any other configured header carries the key as is.
pub fn api_key_from_header<'v>(name: &str, value: &'v str) -> Option<&'v str> {
    let value = value.trim();
    let key = if name.eq_ignore_ascii_case("authorization") {
        let (scheme, rest) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        rest.trim()
    } else {
        value
    };
    (!key.is_empty()).then_some(key)
}

impl Policy {
    /// Whether the policy tries `source` to identify callers: an edge reads nothing (no
    /// header, no property: each is a host call) for a source it does not try.
    pub fn tries(&self, source: IdentitySource) -> bool {
        self.identity.sources.contains(&source)
    }

    /// Whether an API key can identify anyone: the policy lists keys and tries that source.
    pub fn identifies_by_api_key(&self) -> bool {
        !self.keys.is_empty() && self.tries(IdentitySource::ApiKey)
    }

    /// Resolves the caller from `credentials`, trying the configured sources in order.
    pub fn identify(&self, credentials: &Credentials<'_>) -> Identity {
        for source in &self.identity.sources {
            let found = match source {
                IdentitySource::ApiKey => credentials.api_key.and_then(|k| self.identify_key(k)),
                IdentitySource::Jwt => credentials
                    .claims
                    .as_ref()
                    .and_then(|c| self.identify_claims(c)),
                IdentitySource::ClientIp => {
                    credentials
                        .client_ip
                        .filter(|ip| !ip.is_empty())
                        .map(|ip| Identity {
                            kind: IdentityKind::ClientIp,
                            user: Some(Arc::from(format!("ip:{ip}"))),
                            org: None,
                            plan: Arc::from(self.anonymous_plan.as_str()),
                        })
                }
            };
            if let Some(identity) = found {
                return identity;
            }
        }
        Identity {
            kind: IdentityKind::Anonymous,
            user: None,
            org: None,
            plan: Arc::from(self.anonymous_plan.as_str()),
        }
    }

    fn identify_key(&self, key: &str) -> Option<Identity> {
        let entry = self.keys.get(&hash::sha256(key.as_bytes()))?;
        Some(Identity {
            kind: IdentityKind::ApiKey,
            user: Some(Arc::from(entry.id.as_str())),
            org: entry.org.as_deref().map(Arc::from),
            plan: Arc::from(entry.plan.as_str()),
        })
    }

    fn identify_claims(&self, claims: &Claims<'_>) -> Option<Identity> {
        let sub = claims.sub.filter(|s| !s.is_empty())?;
        // A plan claim naming no plan we know gets the default plan, not a free pass.
        let plan = claims
            .plan
            .filter(|p| self.has_plan(p))
            .unwrap_or(&self.default_plan);
        Some(Identity {
            kind: IdentityKind::Jwt,
            user: Some(Arc::from(sub)),
            org: claims.org.filter(|o| !o.is_empty()).map(Arc::from),
            plan: Arc::from(plan),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let json = format!(
            r#"{{"version":1,"keys":[{{"id":"key_1","hash":"{}","org":"acme","plan":"pro"}}]}}"#,
            hash::sha256_tagged("sk_live_abc")
        );
        Policy::from_json(&json).unwrap()
    }

    #[test]
    fn bearer_and_plain_headers() {
        assert_eq!(
            api_key_from_header("Authorization", "Bearer sk_1"),
            Some("sk_1")
        );
        assert_eq!(
            api_key_from_header("authorization", "bearer  sk_1 "),
            Some("sk_1")
        );
        assert_eq!(api_key_from_header("authorization", "Basic abc"), None);
        assert_eq!(api_key_from_header("x-api-key", " sk_2 "), Some("sk_2"));
        assert_eq!(api_key_from_header("x-api-key", "  "), None);
    }

    #[test]
    fn sources_in_order_and_unknown_keys_fall_through() {
        let p = policy();
        let known = p.identify(&Credentials {
            api_key: Some("sk_live_abc"),
            client_ip: Some("10.0.0.1"),
            ..Default::default()
        });
        assert_eq!(
            (
                known.kind,
                known.user.as_deref(),
                known.org.as_deref(),
                &*known.plan
            ),
            (IdentityKind::ApiKey, Some("key_1"), Some("acme"), "pro")
        );
        let unknown = p.identify(&Credentials {
            api_key: Some("made-up"),
            client_ip: Some("10.0.0.1"),
            ..Default::default()
        });
        assert_eq!(
            (unknown.kind, unknown.user.as_deref(), &*unknown.plan),
            (IdentityKind::ClientIp, Some("ip:10.0.0.1"), "anonymous")
        );
        let nobody = p.identify(&Credentials::default());
        assert_eq!((nobody.kind, nobody.user), (IdentityKind::Anonymous, None));
    }

    #[test]
    fn claims_with_unknown_plan_get_the_default() {
        let p = policy();
        let creds = Credentials {
            claims: Some(Claims {
                sub: Some("u1"),
                org: Some("o1"),
                plan: Some("platinum"),
            }),
            ..Default::default()
        };
        let id = p.identify(&creds);
        assert_eq!((id.kind, &*id.plan), (IdentityKind::Jwt, "free"));
    }
}
