//! The hub's source keeps the shape `docs/` promise: no module imports a
//! module that imports it back (types shared by both live in a leaf), and
//! no file grows past ~400 lines of code (tests apart) without saying why.
//!
//! A module is a file (`a/b.rs` or `a/b/mod.rs` is `a::b`); an import is a
//! `crate::…` or `super::…` path outside comments and `#[cfg(test)]` code. A
//! parent and its own children do not count (a parent declares them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of code (before a file's `#[cfg(test)]`) a file may have without
/// a `//! Longer than ~400 lines because …` note.
const MAX_LINES: usize = 420;

fn hub_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/src")
}

/// Every module of `hub/src`, by path (`fanout::presence`), with its file.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("hub/src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = hub_src();
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .map(|file| {
            let relative = file.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            (parts.join("::"), file)
        })
        .collect()
}

/// The code of a file: its lines before `#[cfg(test)]`, comments dropped.
fn code_lines(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("a source file");
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(str::to_owned)
        .collect()
}

fn related(a: &str, b: &str) -> bool {
    a == b || b.starts_with(&format!("{a}::")) || a.starts_with(&format!("{b}::")) || a.is_empty() || b.is_empty()
}

/// The modules each module imports.
fn imports(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |path: &str| {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|candidate| modules.contains_key(candidate))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in modules {
        if module.ends_with("tests") {
            continue;
        }
        let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
        for line in code_lines(file) {
            for (prefix, base) in [("crate::", ""), ("super::", parent)] {
                for (at, _) in line.match_indices(prefix) {
                    if prefix == "super::" && module.is_empty() {
                        continue;
                    }
                    let rest: String = line[at + prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':')
                        .collect();
                    let full = if base.is_empty() { rest } else { format!("{base}::{rest}") };
                    if let Some(target) = resolve(&full)
                        && !related(module, &target)
                    {
                        edges.entry(module.clone()).or_default().insert(target);
                    }
                }
            }
        }
    }
    edges
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let modules = modules();
    assert!(modules.contains_key("fanout::presence"), "the walk found the hub's modules: {modules:?}");
    let edges = imports(&modules);
    assert!(edges.get("listing").is_some_and(|to| to.contains("conversations")), "{edges:?}");
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that import each other: {cycles:?}");
}

#[test]
fn no_file_is_longer_than_about_400_lines_of_code_without_a_stated_reason() {
    let long: Vec<String> = modules()
        .values()
        .filter_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            let lines = text.lines().take_while(|line| line.trim() != "#[cfg(test)]").count();
            let reason = text.lines().any(|line| line.starts_with("//! Longer than ~400 lines because"));
            (lines > MAX_LINES && !reason).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these or state why they are long: {long:?}");
}
