//! Endpoint matching: a method set and a path pattern of `/`-separated segments, where a segment
//! is a literal, `{param}` (any one segment), `*` (any one segment) or, last only, `**` (any
//! number of segments, none included). Patterns are parsed once, at policy compile time.

use std::fmt;

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Patterns are absolute paths.
    #[error("must start with '/'")]
    NotAbsolute,
    /// `**` would make the segments after it unreachable.
    #[error("'**' may only be the last segment")]
    RestNotLast,
    /// A `{` without its `}`, or a brace inside a literal.
    #[error("segment '{0}' is malformed: use '{{name}}' for a whole segment")]
    BadParam(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}` or `*`.
    One,
    /// `**`.
    Rest,
}

/// A compiled path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Parses `/v1/users/{id}/**`.
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        let rest = source.strip_prefix('/').ok_or(PatternError::NotAbsolute)?;
        let mut segments = Vec::new();
        let parts: Vec<&str> = trim_trailing_slash(rest).split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return Err(PatternError::RestNotLast),
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    if p[1..p.len() - 1].contains(['{', '}']) {
                        return Err(PatternError::BadParam((*p).to_string()));
                    }
                    Segment::One
                }
                p if p.contains(['{', '}']) => return Err(PatternError::BadParam(p.to_string())),
                p => Segment::Literal(p.to_string()),
            };
            segments.push(segment);
        }
        Ok(Self {
            source: source.to_string(),
            segments,
        })
    }

    /// Whether `path` (no query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = trim_trailing_slash(rest).split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The pattern as written: the route template reported in usage events.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn trim_trailing_slash(s: &str) -> &str {
    s.strip_suffix('/').unwrap_or(s)
}

/// Methods and a path: what an endpoint rule or a route applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMatcher {
    /// Upper-case methods; empty means any.
    methods: Vec<String>,
    path: PathPattern,
}

impl EndpointMatcher {
    /// A matcher for `methods` (any when empty) on `path`.
    pub fn new(methods: &[String], path: PathPattern) -> Self {
        let methods = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        Self { methods, path }
    }

    /// Whether a request with `method` and `path` matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && self.path.matches(path)
    }

    /// The path pattern.
    pub fn path(&self) -> &PathPattern {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, path: &str, expected: bool) {
        let p = PathPattern::parse(pattern).unwrap();
        assert_eq!(p.matches(path), expected, "{pattern} vs {path}");
    }

    #[test]
    fn matching_table() {
        check("/v1/users/{id}", "/v1/users/42", true);
        check("/v1/users/{id}", "/v1/users/42/", true);
        check("/v1/users/{id}", "/v1/users", false);
        check("/v1/users/{id}", "/v1/users/", false);
        check("/v1/users/{id}", "/v1/users/42/posts", false);
        check("/v1/*/posts", "/v1/7/posts", true);
        check("/v1/**", "/v1", true);
        check("/v1/**", "/v1/a/b/c", true);
        check("/v1/**", "/v2/a", false);
        check("/", "/", true);
        check("/", "/x", false);
        check("/**", "/anything/at/all", true);
        check("/healthz", "healthz", false);
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(PathPattern::parse("v1"), Err(PatternError::NotAbsolute));
        assert_eq!(PathPattern::parse("/**/x"), Err(PatternError::RestNotLast));
        assert!(matches!(
            PathPattern::parse("/a{b}"),
            Err(PatternError::BadParam(_))
        ));
        assert!(matches!(
            PathPattern::parse("/{a{b}}"),
            Err(PatternError::BadParam(_))
        ));
    }

    #[test]
    fn methods() {
        let m = EndpointMatcher::new(&["post".into()], PathPattern::parse("/x").unwrap());
        assert!(m.matches("POST", "/x"));
        assert!(!m.matches("GET", "/x"));
        let any = EndpointMatcher::new(&[], PathPattern::parse("/x").unwrap());
        assert!(any.matches("DELETE", "/x"));
    }
}
