//! Policies: the document users write ([`document`]), the built-in plans ([`plans`]), endpoint
//! patterns ([`pattern`]), and the compiled [`Policy`] the engine runs — validated whole and
//! rejected whole, with the failing field named.

pub mod document;
pub mod pattern;
pub mod plans;

mod compile;
mod identity;

pub use compile::{CompiledRule, Policy, PolicyError};
pub use document::PolicyDocument;
pub use identity::{api_key_from_header, Claims, Credentials, Identity, IdentityKind};
