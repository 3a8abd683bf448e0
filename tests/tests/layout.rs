//! The crates' modules import each other without cycles: no module uses, directly or through
//! others, a module that uses it. Read from the sources (no privileges needed): a file's
//! `crate::<module>` and `super::<module>` paths and the submodule paths it names
//! (`hbone::server`), with comments left out (a doc link is not an import) and test modules
//! too (a test may use any module).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`hbone::server`, `crate` for lib.rs/main.rs) → its source without comments.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut name = rel.to_string_lossy().replace('/', "::");
            if let Some(parent) = name.strip_suffix("::mod") {
                name = parent.to_owned();
            }
            if name == "lib" || name == "main" {
                name = "crate".into();
            }
            // Test modules may use anything: a `tests.rs` is skipped, an inline
            // `#[cfg(test)] mod tests` (at the end of its file, by house style) cut off.
            if name.ends_with("::tests") {
                continue;
            }
            let source = std::fs::read_to_string(&p).unwrap();
            let source = source.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let text: String = source
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.entry(name)
                .and_modify(|t: &mut String| t.push_str(&text))
                .or_insert(text);
        }
    }
    out
}

/// Identifiers in `text` that follow `prefix` (`crate::` → the module names used).
fn after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.match_indices(prefix)
        .filter(|(i, _)| {
            // Not the tail of a longer identifier (`ambit_crate::`).
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    for (m, text) in mods {
        let mut deps = BTreeSet::new();
        for top in after(text, "crate::") {
            // `crate::hbone::server::…` names the submodule; `crate::hbone::X` the module.
            let sub = after(text, &format!("crate::{top}::"))
                .into_iter()
                .map(|s| format!("{top}::{s}"))
                .filter(|s| mods.contains_key(s));
            deps.extend(sub);
            if mods.contains_key(top) {
                deps.insert(top.to_owned());
            }
        }
        if let Some((parent, _)) = m.rsplit_once("::") {
            for (i, _) in text.match_indices("super::") {
                let rest = &text[i + "super::".len()..];
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let s = format!("{parent}::{}", &rest[..end]);
                if mods.contains_key(&s) {
                    deps.insert(s);
                } else if mods.contains_key(parent) {
                    deps.insert(parent.to_owned());
                }
            }
        }
        // Submodules named by a relative path (`hbone::server::serve` after `use crate::hbone`).
        for other in mods.keys().filter(|o| o.contains("::")) {
            if after(text, &format!("{other}::")).len() + text.matches(&format!("{other}(")).count()
                > 0
            {
                deps.insert(other.clone());
            }
        }
        deps.remove(m);
        deps.remove("crate");
        g.insert(m.clone(), deps);
    }
    g
}

/// One cycle of the graph, if it has any.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    for krate in ["proxy", "cni-plugin", "node-agent", "common", "install"] {
        let mods = modules(&workspace().join(krate).join("src"));
        assert!(mods.len() > 2, "{krate}: no modules found");
        let g = graph(&mods);
        assert_eq!(cycle(&g), None, "{krate}: an import cycle; graph {g:#?}");
    }
}

#[test]
fn the_reader_sees_direct_and_indirect_cycles_but_not_doc_links() {
    let dir = ambit_tests::TempDir::new("layout");
    let src = dir.0.join("src");
    std::fs::create_dir_all(src.join("net")).unwrap();
    let write = |p: &str, t: &str| std::fs::write(src.join(p), t).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod net;\n");
    write("a.rs", "use crate::b::Thing;\n");
    write("b.rs", "//! See [`crate::a`].\npub struct Thing;\n");
    write("net/mod.rs", "pub mod server;\n");
    write("net/server.rs", "use super::Stuff;\n");
    let g = graph(&modules(&src));
    assert_eq!(cycle(&g), None, "a doc link is not an import: {g:#?}");
    // b → net::server (by a relative submodule path) → net (super) → a → b.
    write(
        "b.rs",
        "use crate::net;\npub fn f() { net::server::go(); }\n",
    );
    write("net/mod.rs", "pub mod server;\nuse crate::a;\n");
    let g = graph(&modules(&src));
    let c = cycle(&g).unwrap_or_else(|| panic!("no cycle found in {g:#?}"));
    assert_eq!(c.first(), c.last(), "{c:?}");
    assert!(c.len() >= 4, "{c:?}");
}
