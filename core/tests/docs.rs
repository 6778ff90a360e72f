//! Keeps `docs/policy.md` honest: every ```json block in it must compile as a policy.

use tollgate_core::Policy;

#[test]
fn every_json_example_in_the_policy_docs_compiles() {
    let doc = include_str!("../../docs/policy.md");
    let mut blocks = 0;
    let mut rest = doc;
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("unterminated code block");
        if let Err(e) = Policy::from_json(&body[..end]) {
            panic!(
                "docs/policy.md example #{} does not compile: {e}",
                blocks + 1
            );
        }
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert!(blocks >= 2, "found only {blocks} examples");
}
