//! The store's source files depend on each other one way only.
//!
//! Reads `src/**/*.rs` as text and finds every path that names a module of
//! this crate: `crate::a::b`, `super::x`, `self::x` and a child module's
//! name (`writer::Log` in `journal/mod.rs`), `use` groups included. Each
//! such path is an edge from the file's module to the deepest module it
//! names (an item of the crate root counts as the root, `lib.rs`).
//! Comments, strings and `#[cfg(test)]` items are left out: tests may
//! reach anywhere.
//!
//! Fails on any cycle, first between files, then between top-level
//! modules (`journal::writer` counted as `journal`), and on any path from
//! the journal back to the image or the store. Run with `--no-capture` to
//! see the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

const ROOT: &str = "crate";

#[test]
fn modules_do_not_import_each_other() {
    let files = sources();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut files_graph = Graph::new();
    for (m, text) in &files {
        let deps = files_graph.entry(m.clone()).or_default();
        for path in paths_in(&strip(text)) {
            if let Some(to) = resolve(m, &path, &modules)
                && to != *m
            {
                deps.insert(to);
            }
        }
    }
    let mut top = Graph::new();
    for (m, deps) in &files_graph {
        let entry = top.entry(top_of(m)).or_default();
        entry.extend(deps.iter().map(|d| top_of(d)).filter(|d| *d != top_of(m)));
    }

    println!("files and what they import:");
    print_graph(&files_graph);
    println!("\ntop-level modules and what they import:");
    print_graph(&top);

    // The scanner must see something, or an empty graph would pass.
    assert!(
        files_graph["image"].contains("journal"),
        "the scanner no longer sees image -> journal"
    );

    let mut problems = Vec::new();
    for (what, g) in [("files", &files_graph), ("top-level modules", &top)] {
        for cycle in cycles(g) {
            problems.push(format!("cycle between {what}: {}", cycle.join(" -> ")));
        }
    }
    for (m, deps) in &files_graph {
        if top_of(m) == "journal" {
            for d in deps {
                if ["image", "store", "snap", "replay", "features", ROOT]
                    .contains(&top_of(d).as_str())
                {
                    problems.push(format!("the journal calls back: {m} -> {d}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

fn print_graph(g: &Graph) {
    for (m, deps) in g {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("  {m} -> {}", deps.join(", "));
    }
}

fn top_of(m: &str) -> String {
    m.split("::").next().unwrap_or(m).to_string()
}

/// Every source file as (module path, text).
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).expect("under src");
            let text = std::fs::read_to_string(&p).expect("readable source");
            (module_of(rel), text)
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable src dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `lib.rs` -> "crate", `a.rs` and `a/mod.rs` -> "a", `a/b.rs` -> "a::b".
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    if parts.is_empty() {
        ROOT.to_string()
    } else {
        parts.join("::")
    }
}

fn segs(m: &str) -> Vec<String> {
    if m == ROOT {
        Vec::new()
    } else {
        m.split("::").map(str::to_string).collect()
    }
}

fn join(s: &[String]) -> String {
    if s.is_empty() {
        ROOT.to_string()
    } else {
        s.join("::")
    }
}

/// The deepest module of the crate that `path`, written in module `from`,
/// names; `None` if it names none (`std::…`, a type's `Vec::new`).
fn resolve(from: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let here = segs(from);
    let (mut base, rest) = match path.first()?.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (here.clone(), &path[1..]),
        "super" => {
            let ups = path.iter().take_while(|s| *s == "super").count();
            let keep = here.len().checked_sub(ups)?;
            (here[..keep].to_vec(), &path[ups..])
        }
        first => {
            let mut child = here.clone();
            child.push(first.to_string());
            if !modules.contains(&join(&child)) {
                return None;
            }
            (child, &path[1..])
        }
    };
    for s in rest {
        base.push(s.clone());
        if !modules.contains(&join(&base)) {
            base.pop();
            break;
        }
    }
    Some(join(&base))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Other,
}

fn tokens(s: &str) -> Vec<Tok> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
            continue;
        }
        i += 1;
        out.push(match ch {
            ':' if c.get(i) == Some(&':') => {
                i += 1;
                Tok::PathSep
            }
            '{' => Tok::Open,
            '}' => Tok::Close,
            ',' => Tok::Comma,
            '*' => Tok::Star,
            c if c.is_whitespace() => continue,
            _ => Tok::Other,
        });
    }
    out
}

/// Every path in the (stripped) source whose first segment could be a
/// module, with `use` groups expanded.
fn paths_in(s: &str) -> Vec<Vec<String>> {
    let t = tokens(s);
    let mut out = Vec::new();
    for i in 0..t.len() {
        let starts = matches!(t[i], Tok::Ident(_))
            && t.get(i + 1) == Some(&Tok::PathSep)
            && (i == 0 || t[i - 1] != Tok::PathSep);
        if starts {
            let mut at = i;
            tree(&t, &mut at, Vec::new(), &mut out);
        }
    }
    out
}

/// Reads one use tree (or plain path) at `*at`, pushing each full path.
fn tree(t: &[Tok], at: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        match t.get(*at) {
            Some(Tok::Ident(id)) => {
                prefix.push(id.clone());
                *at += 1;
            }
            Some(Tok::Open) => {
                *at += 1;
                loop {
                    match t.get(*at) {
                        Some(Tok::Close) | None => {
                            *at += 1;
                            return;
                        }
                        Some(Tok::Comma) => *at += 1,
                        _ => {
                            let before = *at;
                            tree(t, at, prefix.clone(), out);
                            if *at == before {
                                *at += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Star) => {
                *at += 1;
                break;
            }
            _ => break,
        }
        if t.get(*at) == Some(&Tok::PathSep) {
            *at += 1;
        } else {
            break;
        }
    }
    if !prefix.is_empty() {
        out.push(prefix);
    }
}

/// The source without comments, string and char literals, and
/// `#[cfg(test)]` items.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied();
        let rest = |k: usize| at(i + k);
        match c[i] {
            '/' if rest(1) == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if rest(1) == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && at(i + 1) == Some('*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && at(i + 1) == Some('/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            'r' if (rest(1) == Some('"') || rest(1) == Some('#'))
                && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_')) =>
            {
                let mut hashes = 0;
                let mut j = i + 1;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                'raw: while j < c.len() {
                    if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break 'raw;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            '"' => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            '\'' => {
                // A char literal ('x', '\n', '\u{..}'); otherwise a lifetime.
                let close = if rest(1) == Some('\\') {
                    (i + 2..c.len().min(i + 12)).find(|&k| c[k] == '\'')
                } else if rest(2) == Some('\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match close {
                    Some(k) => {
                        out.push_str("' '");
                        i = k + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    drop_test_items(&out)
}

fn drop_test_items(s: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let item = &rest[at + MARK.len()..];
        let b = item.as_bytes();
        let mut k = 0;
        let mut depth = 0usize;
        while k < b.len() {
            match b[k] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        k += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    k += 1;
                    break;
                }
                _ => {}
            }
            k += 1;
        }
        rest = &item[k..];
    }
    out.push_str(rest);
    out
}

/// One cycle through each strongly connected group of `g` that has more
/// than one member, as a list of modules ending where it started.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for start in g.keys() {
        if reported.contains(start) {
            continue;
        }
        // Shortest way back to `start`, breadth first.
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.as_str()]);
        let mut back = None;
        while let Some(m) = queue.pop_front() {
            for d in g.get(m).into_iter().flatten() {
                if d == start {
                    back = Some(m);
                    queue.clear();
                    break;
                }
                if !prev.contains_key(d.as_str()) {
                    prev.insert(d, m);
                    queue.push_back(d);
                }
            }
        }
        let Some(mut m) = back else { continue };
        let mut middle = Vec::new();
        while m != start {
            middle.push(m.to_string());
            m = prev[m];
        }
        middle.reverse();
        let mut cycle = vec![start.clone()];
        cycle.extend(middle);
        cycle.push(start.clone());
        reported.extend(cycle.iter().cloned());
        found.push(cycle);
    }
    found
}

#[test]
fn the_scanner_reads_paths_as_rust_does() {
    let src = r#"
//! Docs naming crate::image are not code.
use crate::journal::{self, format::{JournalOp, SEG}, Journal};
use super::state;
use writer::Log;
const S: &str = "crate::store::Store";
fn f<'a>(x: &'a str) -> char { crate::object::fsync_dir(); 'c' }
#[cfg(test)]
mod tests {
    use crate::snap::Snap;
}
"#;
    let modules: BTreeSet<String> = [
        "crate",
        "image",
        "journal",
        "journal::format",
        "journal::state",
        "journal::writer",
        "object",
        "snap",
        "store",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let found: BTreeSet<String> = paths_in(&strip(src))
        .iter()
        .filter_map(|p| resolve("journal::reader", p, &modules))
        .collect();
    let want: BTreeSet<String> = ["journal", "journal::format", "journal::state", "object"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
    let found: BTreeSet<String> = paths_in(&strip("use writer::Log;"))
        .iter()
        .filter_map(|p| resolve("journal", p, &modules))
        .collect();
    assert_eq!(found, BTreeSet::from(["journal::writer".to_string()]));
}
