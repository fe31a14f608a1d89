//! The import rule of ARCHITECTURE.md, checked on the source: a module imports only from modules
//! before it in the data flow (foundation → camera → vision → llm → generate → pipeline → worker
//! → mqtt → config → eval, daemon), so there are no back-references and no cycles between them.

mod common;

use std::path::Path;

/// The top-level modules in the order they may import each other: each may use only those before
/// it. The foundation first (plain values and one module per external system), then the framework's
/// parts in the order data flows through them, then what wires them together.
const ORDER: &[&str] = &[
    "util", "ffi", "cache", "frame", "manifest", "onnx", // foundation
    "camera", "vision", "llm", "generate", // frame → features → tokens → text → image
    "pipeline", "worker", "mqtt", // the stack, the thread that runs it, the transport
    "config", "eval", "daemon", // around them
];

fn rank(module: &str) -> Option<usize> {
    ORDER.iter().position(|m| *m == module)
}

/// The top-level module a source file belongs to (`src/llm/backbone.rs` → `llm`).
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

/// Every `crate::<module>` a file names outside comments.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push(name);
        }
    }
    found
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_module_imports_from_a_module_after_it() {
    let src = common::repo().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = owner(&src, file) else { continue };
        // The crate root (the facade) and the binary sit above everything.
        if module == "lib" || module == "bin" {
            continue;
        }
        let Some(own) = rank(&module) else {
            violations
                .push(format!("{}: module `{module}` is not in the import order of tests/layers.rs", file.display()));
            continue;
        };
        for used in imports(&std::fs::read_to_string(file).unwrap()) {
            checked += 1;
            match rank(&used) {
                Some(r) if r < own || used == module => {}
                Some(_) => violations
                    .push(format!("{}: `{module}` imports `crate::{used}`, which comes after it", file.display())),
                None => {
                    violations.push(format!("{}: `crate::{used}` is not a module in the import order", file.display()))
                }
            }
        }
    }
    assert!(checked > 50, "the check saw only {checked} imports; is it reading the sources?");
    assert!(violations.is_empty(), "import rule broken:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_finds_a_back_reference() {
    // The parser sees through `use` lists and paths, and ignores comments.
    let text = "use crate::mqtt::Outgoing;\n// crate::daemon in a comment\nlet x = crate::llm::check_question(q, 3);";
    assert_eq!(imports(text), ["mqtt", "llm"]);
    assert!(rank("mqtt") > rank("worker"), "mqtt comes after the worker");
}
