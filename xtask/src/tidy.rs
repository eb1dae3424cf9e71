//! `cargo xtask tidy`: structural rules the compiler does not check.
//!
//! - The sans-IO cores (`crates/*/src/core/`, recursively) stay free of I/O
//!   and clocks: no `tokio`, `Instant::now`, `SystemTime::now` or `std::net`
//!   outside comments. Time comes in as an argument; sockets live in the
//!   runtime layer around the core.
//! - Every module under `crates/*/src`, `xtask/src` and `benches/src` opens
//!   with a `//!` doc saying what it holds (before its first item).
//!
//! Each violation is printed as `path:line: rule`; the task fails if there is
//! one. `.ci/run` runs it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Words that must not appear in code under a `core/` directory.
const CORE_FORBIDDEN: [&str; 4] = ["tokio", "Instant::now", "SystemTime::now", "std::net"];

/// Runs every rule over the workspace at `root`; `Ok(false)` when a rule is broken.
pub(crate) fn tidy(root: &Path) -> Result<bool> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask/src", "benches/src"] {
        collect_rs(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in &files {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let rel_text = rel.to_string_lossy().replace('\\', "/");
        // Only library and binary sources: tests, examples and benches of the
        // crates are not modules of the API.
        let is_source = rel_text.starts_with("xtask/src/")
            || rel_text.starts_with("benches/src/")
            || (rel_text.starts_with("crates/") && rel_text.contains("/src/"));
        if !is_source {
            continue;
        }
        checked += 1;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if !has_module_doc(&text) {
            problems.push(format!(
                "{rel_text}:1: module has no `//!` doc before its first item"
            ));
        }
        if rel_text.starts_with("crates/") && rel_text.contains("/src/core/") {
            for (line, word) in core_violations(&text) {
                problems.push(format!(
                    "{rel_text}:{line}: `{word}` in a sans-IO core (time and I/O come from outside)"
                ));
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!("tidy: {checked} files checked, {} problems", problems.len());
    Ok(problems.is_empty())
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            if name != "target" && name != ".git" {
                collect_rs(&path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// True when a `//!` line comes before the first line that is not blank, a
/// comment or an inner attribute.
fn has_module_doc(text: &str) -> bool {
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("//!") {
            return true;
        }
        if line.is_empty() || line.starts_with("//") || line.starts_with("#!") {
            continue;
        }
        return false;
    }
    false
}

/// The (1-based line, word) of every forbidden word outside comments.
fn core_violations(text: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    let mut in_block_comment = false;
    for (i, line) in text.lines().enumerate() {
        let code = strip_comments(line, &mut in_block_comment);
        for word in CORE_FORBIDDEN {
            if code.contains(word) {
                found.push((i + 1, word));
            }
        }
    }
    found
}

/// The code part of a line: without `//` comments and `/* */` blocks (which
/// may span lines). String literals are not parsed: a forbidden word inside a
/// string in a core is reported too, which is what we want.
fn strip_comments(line: &str, in_block: &mut bool) -> String {
    let mut code = String::new();
    let mut rest = line;
    loop {
        if *in_block {
            match rest.find("*/") {
                Some(end) => {
                    *in_block = false;
                    rest = &rest[end + 2..];
                }
                None => return code,
            }
        }
        let line_comment = rest.find("//");
        let block = rest.find("/*");
        match (line_comment, block) {
            (Some(l), Some(b)) if b < l => {
                code.push_str(&rest[..b]);
                *in_block = true;
                rest = &rest[b + 2..];
            }
            (Some(l), _) => {
                code.push_str(&rest[..l]);
                return code;
            }
            (None, Some(b)) => {
                code.push_str(&rest[..b]);
                *in_block = true;
                rest = &rest[b + 2..];
            }
            (None, None) => {
                code.push_str(rest);
                return code;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_docs() {
        assert!(has_module_doc("//! Frames.\n\nuse x;\n"));
        assert!(has_module_doc(
            "// SPDX\n#![forbid(unsafe_code)]\n\n//! Frames.\n"
        ));
        assert!(!has_module_doc("use x;\n//! late\n"));
        assert!(!has_module_doc("/// an item doc\nfn f() {}\n"));
        assert!(!has_module_doc(""));
    }

    #[test]
    fn core_words_outside_comments() {
        let text = "use std::time::Duration;\n\
                    // tokio is mentioned in a comment\n\
                    let now = Instant::now(); // clock\n\
                    /* std::net\n tokio */ let a = 1;\n\
                    use tokio::sync::mpsc;\n";
        assert_eq!(
            core_violations(text),
            vec![(3, "Instant::now"), (6, "tokio")]
        );
    }

    #[test]
    fn the_workspace_is_tidy() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives in the workspace")
            .to_path_buf();
        assert!(
            tidy(&root).expect("tidy runs"),
            "see the problems printed above"
        );
    }
}
