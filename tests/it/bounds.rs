//! Every test of this binary and of `tests/logs.rs` runs its whole body
//! under a bound of its own (`common::bounded`, `bounded_for`, or a file's
//! `within` wrapper over the whole body), so that a hang fails the test that
//! hung, by name, under plain `cargo test` as under nextest. Read from the
//! sources: a test added without one fails here.

use crate::common;

/// What a test's body may be: one call of these, and nothing else.
const BOUNDING: [&str; 5] = [
    "common::bounded(",
    "common::bounded_for(",
    "common::within(",
    "within(",
    "within_bound(",
];

/// The test functions of `src` whose body is not one bounding call, by
/// name, with why.
fn unbounded(src: &str) -> Vec<String> {
    let lines: Vec<&str> = src.lines().collect();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "#[test]" {
            continue;
        }
        let Some(f) = (i + 1..lines.len()).find(|&j| !lines[j].trim().starts_with("#[")) else {
            bad.push(format!("line {}: no function after #[test]", i + 1));
            continue;
        };
        let header = lines[f];
        let indent = header.len() - header.trim_start().len();
        let name = header
            .trim()
            .strip_prefix("fn ")
            .and_then(|r| r.split('(').next())
            .unwrap_or(header.trim());
        // The body: up to the closing brace at the header's indentation.
        let close = format!("{}}}", " ".repeat(indent));
        let Some(end) = (f + 1..lines.len()).find(|&j| lines[j] == close) else {
            bad.push(format!("{name}: no end of its body"));
            continue;
        };
        let body: Vec<&str> = lines[f + 1..end]
            .iter()
            .copied()
            .filter(|l| !l.trim().is_empty() && !l.trim().starts_with("//"))
            .collect();
        let Some(first) = body.first() else {
            bad.push(format!("{name}: an empty body"));
            continue;
        };
        if !BOUNDING.iter().any(|b| first.trim().starts_with(b)) {
            bad.push(format!("{name}: begins with {:?}", first.trim()));
            continue;
        }
        // One statement: no other line at the first one's indentation but
        // its end.
        let at = first.len() - first.trim_start().len();
        let top = body[1..]
            .iter()
            .filter(|l| l.len() - l.trim_start().len() == at)
            .count();
        let last = body.last().unwrap().trim();
        let one_line = body.len() == 1;
        if !(one_line || top == 1 && last.starts_with(['}', ')'])) {
            bad.push(format!("{name}: more than the bounding call"));
        }
    }
    bad
}

#[test]
fn every_test_body_runs_under_a_bound_of_its_own() {
    common::bounded(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("it"))
            .expect("reading tests/it")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        files.push(root.join("logs.rs"));
        let mut tests = 0;
        let mut bad = Vec::new();
        for file in &files {
            let src = std::fs::read_to_string(file).expect("reading a test file");
            tests += src.lines().filter(|l| l.trim() == "#[test]").count();
            for b in unbounded(&src) {
                bad.push(format!("{}: {b}", file.display()));
            }
        }
        assert!(tests > 300, "only {tests} tests found under {root:?}");
        assert!(bad.is_empty(), "tests without a bound:\n{}", bad.join("\n"));
    })
}

#[test]
fn the_check_finds_a_test_without_a_bound() {
    common::bounded(|| {
        let src = "#[test]\nfn a() {\n    let x = 1;\n    assert_eq!(x, 1);\n}\n\
                   #[test]\n#[ignore]\nfn b() {\n    common::bounded(|| {\n        f();\n    })\n}\n\
                   #[test]\nfn c() {\n    common::bounded(|| f());\n    g();\n}\n";
        let bad = unbounded(src);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].starts_with("a: begins with"), "{bad:?}");
        assert!(bad[1].starts_with("c: more than"), "{bad:?}");
    })
}
