//! The two hashes the core uses: SHA-256 for secrets (API keys, bypass credentials, which the
//! policy stores only as hashes) and xxh3 for stable, fast, non-secret fingerprints (counter
//! keys, rollout buckets, request fingerprints). Both are fixed algorithms with fixed seeds so
//! every runtime computes the same values.

use sha2::{Digest, Sha256};

/// SHA-256 of a secret.
pub fn sha256(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// `sha256:<hex>`, the form the policy stores secrets in.
pub fn sha256_tagged(secret: &str) -> String {
    format!("sha256:{}", hex::encode(sha256(secret.as_bytes())))
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_sha256_tagged(text: &str) -> Option<[u8; 32]> {
    let hex_digits = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

/// A stable 64-bit fingerprint (xxh3, seed 0).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_round_trip() {
        let tagged = sha256_tagged("s3cret");
        assert_eq!(parse_sha256_tagged(&tagged), Some(sha256(b"s3cret")));
        assert_eq!(parse_sha256_tagged("md5:abcd"), None);
        assert_eq!(parse_sha256_tagged("sha256:zz"), None);
    }

    #[test]
    fn fingerprint_is_stable_across_builds() {
        // Pinned: runtimes and stored counters depend on this value never changing.
        assert_eq!(fingerprint(b"tollgate"), 0xe0d8_8aa9_97c1_1345);
    }
}
