//! `docs/failure-semantics.md` is checked against the suite: every test it
//! cites exists, so the page cannot silently drift from what is proven.

#[test]
fn every_test_the_failure_semantics_page_cites_exists() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let page = std::fs::read_to_string(format!("{root}/docs/failure-semantics.md"))
        .expect("docs/failure-semantics.md");
    let mut cited = 0;
    for quoted in page.split('`').skip(1).step_by(2) {
        let Some((module, name)) = quoted.split_once("::") else {
            continue;
        };
        if !module.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let file = format!("{root}/tests/integration/{module}.rs");
        let Ok(source) = std::fs::read_to_string(&file) else {
            panic!("the page cites {quoted}, but there is no {file}");
        };
        assert!(
            source.contains(&format!("async fn {name}()"))
                || source.contains(&format!("fn {name}()")),
            "the page cites {quoted}, which is not a test in {file}"
        );
        cited += 1;
    }
    assert!(cited >= 15, "only {cited} tests cited");
}
