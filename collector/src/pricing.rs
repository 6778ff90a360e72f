//! The collector's policy file: the core's policy document (the very file the edges load) plus
//! a `pricing` section keyed by plan. The core's document refuses unknown fields, so `pricing`
//! is taken out first and the rest goes to [`Policy::from_json`] unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::Policy;

/// One plan's price.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanPrice {
    /// ISO 4217 currency code.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Fixed fee per month, in minor units (cents).
    #[serde(default)]
    pub monthly_fee: u64,
    /// Cost units included in the fee each month.
    #[serde(default)]
    pub included_units: u64,
    /// Price per 1,000 units beyond the included ones, in minor units.
    #[serde(default)]
    pub price_per_1000_units: u64,
}

fn default_currency() -> String {
    "USD".into()
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Not JSON, or not an object.
    #[error("policy file is not a JSON object: {0}")]
    NotJson(String),
    /// The core's document is invalid (the field is named).
    #[error(transparent)]
    Policy(#[from] tollgate_core::PolicyError),
    /// The custom dimensions the rollups keep are declared wrongly.
    #[error("invalid policy at `dimensions{field}`: {message}")]
    Dimensions {
        /// Where (`[index]`, or empty for the whole list).
        field: String,
        /// What.
        message: String,
    },
    /// The pricing section is invalid.
    #[error("invalid policy at `pricing{field}`: {message}")]
    Pricing {
        /// Where.
        field: String,
        /// What.
        message: String,
    },
}

/// The compiled policy and the prices of its plans.
#[derive(Clone, Debug)]
pub struct PolicyFile {
    /// What the edges enforce.
    pub policy: Policy,
    /// Prices by plan.
    pub pricing: BTreeMap<String, PlanPrice>,
    /// Custom event dimensions the rollups keep, so reports can group by them (`group_by=model`).
    /// Events may carry other dimensions; those stay in the raw events only.
    pub dimensions: Vec<String>,
}

/// Most custom dimensions a policy may declare for the rollups: each adds a row per event per
/// hour, day and week bucket.
pub const MAX_ROLLED_DIMENSIONS: usize = 8;

fn rolled_dimensions(value: serde_json::Value) -> Result<Vec<String>, PolicyFileError> {
    let bad = |field: String, message: String| PolicyFileError::Dimensions { field, message };
    if value.is_null() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = serde_json::from_value(value)
        .map_err(|e| bad(String::new(), format!("a list of dimension names: {e}")))?;
    if names.len() > MAX_ROLLED_DIMENSIONS {
        return Err(bad(
            String::new(),
            format!("{} names; at most {MAX_ROLLED_DIMENSIONS}", names.len()),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        let field = format!("[{i}]");
        let valid = !name.is_empty()
            && name.len() <= tollgate_core::event::MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(bad(
                field,
                format!(
                    "'{name}': 1–{} of A–Z, a–z, 0–9, '_', '.', '-' (an event dimension's name)",
                    tollgate_core::event::MAX_NAME_LEN
                ),
            ));
        }
        if crate::reports::is_reserved(name) {
            return Err(bad(field, format!("'{name}' is a built-in dimension")));
        }
        if names[..i].contains(name) {
            return Err(bad(field, format!("'{name}' is declared twice")));
        }
    }
    Ok(names)
}

impl PolicyFile {
    /// Parses and validates the whole file; the error names the field.
    pub fn from_json(text: &str) -> Result<Self, PolicyFileError> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PolicyFileError::NotJson(e.to_string()))?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| PolicyFileError::NotJson("the top level must be an object".into()))?;
        let pricing_value = object.remove("pricing").unwrap_or_default();
        let dimensions = rolled_dimensions(object.remove("dimensions").unwrap_or_default())?;
        let policy = Policy::from_json(&value.to_string())?;
        let pricing: BTreeMap<String, PlanPrice> = if pricing_value.is_null() {
            BTreeMap::new()
        } else {
            serde_path_to_error::deserialize(pricing_value).map_err(|e| {
                PolicyFileError::Pricing {
                    field: format!(".{}", e.path()),
                    message: e.into_inner().to_string(),
                }
            })?
        };
        for (plan, price) in &pricing {
            if !policy.has_plan(plan) {
                return Err(PolicyFileError::Pricing {
                    field: format!(".{plan}"),
                    message: format!("no plan named '{plan}' in the policy"),
                });
            }
            if price.currency.len() != 3 || !price.currency.bytes().all(|b| b.is_ascii_uppercase())
            {
                return Err(PolicyFileError::Pricing {
                    field: format!(".{plan}.currency"),
                    message: "must be an ISO 4217 code such as USD".into(),
                });
            }
        }
        Ok(Self {
            policy,
            pricing,
            dimensions,
        })
    }

    /// The charge, in minor units, for `units` used in one month on `plan`.
    pub fn monthly_charge(&self, plan: &str, units: u64) -> Option<u64> {
        let p = self.pricing.get(plan)?;
        let over = units.saturating_sub(p.included_units);
        Some(p.monthly_fee + (over * p.price_per_1000_units).div_ceil(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pricing_is_validated_with_the_field_named() {
        let ok = r#"{"version":1,"pricing":{"pro":{"monthly_fee":4900,"included_units":100000,"price_per_1000_units":50}}}"#;
        let file = PolicyFile::from_json(ok).unwrap();
        assert_eq!(file.monthly_charge("pro", 100_000), Some(4900));
        assert_eq!(file.monthly_charge("pro", 102_000), Some(5000));
        assert_eq!(file.monthly_charge("free", 1), None);

        let check = |text: &str, expected: &str| {
            let err = PolicyFile::from_json(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        };
        check(r#"{"version":1,"pricing":{"gold":{}}}"#, "pricing.gold");
        check(
            r#"{"version":1,"pricing":{"pro":{"monthly_fe":1}}}"#,
            "unknown field `monthly_fe`",
        );
        check(r#"{"version":1,"planz":{}}"#, "planz");
        check("[1]", "object");
    }

    #[test]
    fn rolled_dimensions_are_validated_with_the_entry_named() {
        let file =
            PolicyFile::from_json(r#"{"version":1,"dimensions":["model","feature"]}"#).unwrap();
        assert_eq!(file.dimensions, ["model", "feature"]);
        assert!(PolicyFile::from_json(r#"{"version":1}"#)
            .unwrap()
            .dimensions
            .is_empty());
        for (dims, expected) in [
            (
                r#"["model","route"]"#,
                "dimensions[1]`: 'route' is a built-in",
            ),
            (
                r#"["model","model"]"#,
                "dimensions[1]`: 'model' is declared twice",
            ),
            (r#"["a b"]"#, "dimensions[0]`: 'a b'"),
            (r#""model""#, "a list of dimension names"),
            (
                r#"["a","b","c","d","e","f","g","h","i"]"#,
                "9 names; at most 8",
            ),
        ] {
            let err = PolicyFile::from_json(&format!(r#"{{"version":1,"dimensions":{dims}}}"#))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }
}
