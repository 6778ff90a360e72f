//! Tollgate usage collector (filled by the collector issue).
