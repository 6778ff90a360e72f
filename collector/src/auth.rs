//! API keys: generated here, shown once, stored as SHA-256; and the extractor that turns a
//! `Bearer` header into an authenticated, org-scoped [`Caller`] before any handler runs.

use std::fmt;
use std::str::FromStr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::distr::{Alphanumeric, SampleString};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, AppState};

/// The org value of keys that span every org (admin keys, and the edges' ingest keys).
pub const ALL_ORGS: &str = "*";

/// What a key may do.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything: ingest, every org's reports, keys and orgs.
    Admin,
    /// Reports of its own org only.
    Reader,
    /// Only `POST /v1/events`, for events of its own org (or of any org for a `*` key).
    Ingest,
}

impl Role {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
            Role::Ingest => "ingest",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "reader" => Ok(Role::Reader),
            "ingest" => Ok(Role::Ingest),
            other => Err(format!(
                "unknown role '{other}': one of admin, reader, ingest"
            )),
        }
    }
}

/// A freshly generated key: the secret exists only here, to be shown once.
pub struct NewKey {
    /// Public id (`key_<hex>`), safe to log and list.
    pub id: String,
    /// The secret (`tg_<40 alphanumerics>`), never stored.
    pub secret: SecretString,
    /// SHA-256 of the secret, hex: what is stored.
    pub hash: String,
}

impl NewKey {
    /// Generates a key from the OS's RNG.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let id = format!(
            "key_{}",
            Alphanumeric.sample_string(&mut rng, 12).to_lowercase()
        );
        let secret = format!("tg_{}", Alphanumeric.sample_string(&mut rng, 40));
        let hash = hash_secret(&secret);
        Self {
            id,
            secret: SecretString::from(secret),
            hash,
        }
    }

    /// The secret, for the one time it is shown.
    pub fn reveal(&self) -> &str {
        self.secret.expose_secret()
    }
}

/// SHA-256 of a key's secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A stored key, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct KeyRecord {
    /// Public id.
    pub id: String,
    /// Org it belongs to (`*`: every org).
    pub org: String,
    /// `admin`, `reader` or `ingest`.
    pub role: String,
    /// A label.
    pub name: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// An authenticated caller: which key, which org, which role. Handlers receive it only after
/// the key was found, unrevoked, in the database.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The key's public id.
    pub key_id: String,
    /// The key's org ([`ALL_ORGS`] for keys that span orgs).
    pub org: String,
    /// The key's role.
    pub role: Role,
}

impl Caller {
    /// Refuses unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// The org a report runs for: a reader's own org whatever it asks; an admin's choice.
    pub fn report_org(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match self.role {
            Role::Admin => requested
                .map(str::to_owned)
                .ok_or_else(|| ApiError::BadRequest("`org` is required for admin keys".into())),
            Role::Reader => match requested {
                // Not 403: whether another org exists is itself not a reader's to learn.
                Some(org) if org != self.org => Err(ApiError::NotFound),
                _ => Ok(self.org.clone()),
            },
            Role::Ingest => Err(ApiError::Forbidden),
        }
    }

    /// The scope of a `/v1/reports/*` request: a reader's own org (404 for any other); for an
    /// admin, the org it names or, when it names none, every org.
    pub fn report_scope(&self, requested: Option<&str>) -> Result<Option<String>, ApiError> {
        match (self.role, requested) {
            (Role::Admin, None) => Ok(None),
            _ => self.report_org(requested).map(Some),
        }
    }

    /// Whether this caller may ingest events of `org`.
    pub fn may_ingest_for(&self, org: &str) -> bool {
        self.role == Role::Admin || self.org == ALL_ORGS || self.org == org
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let secret = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|s| s.starts_with("tg_"))
            .ok_or(ApiError::Unauthorized)?;
        let key = state
            .storage
            .find_key_by_hash(&hash_secret(secret))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if key.revoked_at.is_some() {
            return Err(ApiError::Unauthorized);
        }
        let role = key.role.parse().map_err(|_| ApiError::Unauthorized)?;
        Ok(Caller {
            key_id: key.id,
            org: key.org,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_hashed() {
        let a = NewKey::generate();
        let b = NewKey::generate();
        assert!(a.reveal().starts_with("tg_") && a.reveal().len() == 43);
        assert_ne!(a.reveal(), b.reveal());
        assert_eq!(a.hash, hash_secret(a.reveal()));
        assert_eq!(a.hash.len(), 64);
        assert!(!format!("{:?}", a.secret).contains(a.reveal()));
    }

    #[test]
    fn reader_scope_is_its_own_org() {
        let reader = Caller {
            key_id: "k".into(),
            org: "acme".into(),
            role: Role::Reader,
        };
        assert_eq!(reader.report_org(None).unwrap(), "acme");
        assert_eq!(reader.report_org(Some("acme")).unwrap(), "acme");
        assert!(reader.report_org(Some("other")).is_err());
        assert!(!reader.may_ingest_for("acme") || reader.org == "acme");
    }
}
