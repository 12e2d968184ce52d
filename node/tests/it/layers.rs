//! The node's module graph: which top-level module of `node/src` refers to which
//! (`crate::MODULE` outside comments), read from the sources. It must have no cycle, and no
//! module may reach up into the daemon, the one module that knows every other.
//!
//! `cargo nextest run --workspace -E 'test(layers::)'` shows it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file beneath `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read a source directory")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src` belongs to (`None` for `lib.rs` and the binaries).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("beneath src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    if first == "lib.rs" || first == "bin" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// The modules `text` refers to as `crate::NAME` or `crate::{NAME, ...}` (over several lines
/// too), outside comments.
fn references(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let name_of = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.insert(name_of(rest));
            continue;
        };
        // A grouped import: the first name of every item at the group's own depth.
        let mut depth = 0;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    found.insert(name_of(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    found.remove("");
    found
}

/// The import graph of the node crate: module → the modules it refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for to in references(&text) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).expect("known").insert(to);
            }
        }
    }
    graph
}

/// A cycle of `graph`, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_node_modules_import_each_other_without_a_cycle() {
    let graph = graph();
    assert!(graph.contains_key("daemon") && graph.contains_key("replica"));
    for (module, uses) in &graph {
        println!(
            "{module} -> {}",
            Vec::from_iter(uses.iter().cloned()).join(", ")
        );
    }
    assert_eq!(
        find_cycle(&graph),
        None,
        "the node's modules import in a circle"
    );
    let upward: Vec<&String> = graph
        .iter()
        .filter(|(_, uses)| uses.contains("daemon"))
        .map(|(m, _)| m)
        .collect();
    assert!(upward.is_empty(), "{upward:?} reach up into the daemon");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(m, uses)| (m.to_string(), uses.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let text = "use crate::{a, b::{C, D},\n    g::H};\n// crate::d\nlet x = crate::e::f();";
    assert_eq!(
        references(text),
        ["a", "b", "e", "g"].into_iter().map(String::from).collect()
    );
}
