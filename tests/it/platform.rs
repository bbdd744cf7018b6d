//! The crate builds on Linux only, and anywhere else stops with one clear
//! `compile_error!`. No other target's standard library is installed here,
//! so the test builds a copy of `src/lib.rs` in which "linux" names another
//! OS: the cfg gates then behave exactly as on a foreign target.

use crate::common;

use std::path::Path;
use std::process::Command;

#[test]
fn another_os_gets_one_clear_compile_error() {
    common::bounded(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("reading src/lib.rs");
        assert!(
            lib.contains("compile_error!"),
            "src/lib.rs has no compile_error!"
        );
        let foreign = lib.replace("target_os = \"linux\"", "target_os = \"not-this-os\"");
        let dir = std::env::temp_dir().join(format!("procpool-platform-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lib.rs"), foreign).unwrap();
        std::fs::copy(root.join("src/tutorial.md"), dir.join("tutorial.md")).unwrap();
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let out = Command::new(rustc)
            .args([
                "--edition",
                "2024",
                "--crate-type",
                "lib",
                "--crate-name",
                "procpool",
            ])
            .arg("--out-dir")
            .arg(&dir)
            .arg(dir.join("lib.rs"))
            .output()
            .expect("running rustc");
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a foreign build succeeded:\n{stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        // The compile_error! and rustc's "aborting due to 1 previous error".
        assert_eq!(errors.len(), 2, "expected one error:\n{stderr}");
        assert!(
            errors[0].contains("procpool supports Linux only"),
            "{stderr}"
        );
        assert!(errors[1].contains("1 previous error"), "{stderr}");
        for needed in ["memfd", "eventfd", "PR_SET_PDEATHSIG", "macOS"] {
            assert!(
                stderr.contains(needed),
                "the message does not name {needed}:\n{stderr}"
            );
        }
    })
}

#[test]
fn every_module_and_export_is_gated_on_linux() {
    common::bounded(|| {
        // A module added without the gate would make a foreign build fail with
        // errors from inside it, after the compile_error!.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
        let lines: Vec<&str> = lib.lines().collect();
        let mut items = 0;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub use ") {
                items += 1;
                let prev = if i > 0 { lines[i - 1].trim() } else { "" };
                assert!(
                    prev.starts_with("#[cfg(") && prev.contains("target_os = \"linux\""),
                    "src/lib.rs line {}: `{t}` is not gated on target_os = \"linux\"",
                    i + 1
                );
            }
        }
        assert!(items > 5, "found only {items} items in src/lib.rs");
    })
}
