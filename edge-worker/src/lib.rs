//! Tollgate as a Cloudflare Worker (filled by the edge-worker issue).
