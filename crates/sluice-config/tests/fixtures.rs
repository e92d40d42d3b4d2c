//! Table-driven invalid configurations: every file in
//! `tests/fixtures/config/invalid/` starts with
//!
//! ```text
//! # expect: <a substring of the error line>
//! # line: <the line the error must point at>
//! # path: <the key path the error must name>      (optional)
//! ```
//!
//! and must fail with exactly one diagnostic that matches.

use std::path::PathBuf;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/config/invalid")
        .canonicalize()
        .expect("fixtures dir")
}

fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {key}:")))
        .map(str::trim)
}

#[test]
fn every_invalid_fixture_fails_where_it_says() {
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "only {} fixtures", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("fixture readable");
        let name = path.display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.first().is_some_and(|l| l.starts_with("# expect: "))
                && lines.get(1).is_some_and(|l| l.starts_with("# line: ")),
            "{name}: must start with `# expect:` and `# line:`"
        );
        let expect = header(&text, "expect").unwrap_or_default();
        let line: usize = header(&text, "line")
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("{name}: bad `# line:`"));
        let want_path = header(&text, "path");

        let err = match sluice_config::load_file(path) {
            Ok(_) => {
                failures.push(format!(
                    "{name}: loaded, expected an error containing {expect:?}"
                ));
                continue;
            }
            Err(e) => e,
        };
        let diags = err.diagnostics();
        if diags.len() != 1 {
            failures.push(format!("{name}: expected exactly one error, got:\n{err}"));
            continue;
        }
        let d = &diags[0];
        let rendered = d.to_string();
        if !rendered.contains(expect) {
            failures.push(format!("{name}: expected {expect:?} in:\n  {rendered}"));
        }
        if d.line != Some(line) {
            failures.push(format!(
                "{name}: expected line {line}, got {:?}:\n  {rendered}",
                d.line
            ));
        }
        if d.column.is_none() {
            failures.push(format!("{name}: no column:\n  {rendered}"));
        }
        if d.file != name {
            failures.push(format!("{name}: diagnostic names file {:?}", d.file));
        }
        if let Some(p) = want_path {
            if d.path != p {
                failures.push(format!("{name}: expected path {p:?}, got {:?}", d.path));
            }
        }
        // The line format: FILE:LINE:COL: [PATH: ]MESSAGE, on one line.
        let prefix = format!("{name}:{line}:{}: ", d.column.unwrap_or(0));
        if !rendered.starts_with(&prefix) || rendered.contains('\n') {
            failures.push(format!("{name}: badly formatted: {rendered}"));
        }
        // load_str gives the same answer as load_file.
        let via_str = sluice_config::load_str(&text, &name).expect_err("load_str fails too");
        if via_str.diagnostics() != diags {
            failures.push(format!("{name}: load_str differs:\n  {via_str}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
