//! No cycles between sibling modules.
//!
//! Sibling modules are the modules of one parent: the files and folders of
//! one directory of a crate's `src/` (and any `mod name { … }` written
//! inline). One sibling depends on another when its code names a path into
//! it: `use crate::a::…`, `use super::a::…`, `crate::a::f()`,
//! `super::super::a::X`, and each name of a group such as
//! `use crate::{a, b::C}` or `use super::{a::X, b}`. A name that the parent
//! re-exports (`pub use a::X;` in `mod.rs`, then `super::X` in a sibling)
//! counts as a dependency on the sibling it comes from. Left out, each for
//! its reason:
//!
//! - The parent itself, and paths from a module into its own children: a
//!   parent declares, re-exports and uses its children, and its children use
//!   the parent's items (`db/mod.rs`'s `Database`, for every table's
//!   module). That is the tree, not a cycle; only sibling ↔ sibling counts.
//! - `#[cfg(test)]` items (a module's `mod tests`, inline or in its own
//!   file): they are built only for the module's own unit tests, and such a
//!   test may set up its state through whatever sibling it likes without the
//!   module's code depending on it.
//! - Comments, doc comments (intra-doc links are not dependencies) and
//!   string literals, which are blanked before the paths are read.
//! - Paths that start with a plain name (`nars::Chunk` after `use
//!   super::nars;`): the `use` that brought the name in is what counts.
//!
//! Crates are found by walking the workspace for `src/` directories (a
//! package's `src/bin/NAME.rs` is a crate of its own), so that a crate split
//! out of another is checked without being listed here, and for the
//! directories beside a package's `Cargo.toml` holding a `main.rs` (the
//! integration tests' crate, `tests/it/`). The fuzz targets are single
//! files and have no modules to check.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::{rust_files, workspace};

#[test]
fn sibling_modules_depend_on_each_other_one_way() {
    let workspace = workspace();
    let trees = source_trees(workspace);
    let files = trees.iter().map(|tree| tree.files.len()).sum::<usize>();
    assert!(
        files > 100,
        "found only {files} Rust files, in these module trees: {:?}",
        trees.iter().map(|tree| &tree.root).collect::<Vec<_>>()
    );
    let cycles = trees
        .iter()
        .flat_map(|tree| sibling_cycles(tree, workspace))
        .collect::<Vec<_>>();
    assert!(
        cycles.is_empty(),
        "sibling modules depend on each other in a cycle; move what they share down into a \
         lower module, or the code that joins them up into the module that uses both:\n\n{}",
        cycles.join("\n\n")
    );
}

/// One crate's modules: its `.rs` files, each with its module path
/// (`["db", "objects"]` for `src/db/objects.rs`, empty for the crate root).
#[derive(Debug)]
struct SourceTree {
    /// The directory the module paths start from.
    root: PathBuf,
    files: Vec<(PathBuf, Vec<String>)>,
}

/// The module trees of every crate under `dir`: each `src/` directory
/// with a `lib.rs` or `main.rs`, less its `bin/`, whose files are crates of
/// their own.
fn source_trees(dir: &Path) -> Vec<SourceTree> {
    let mut trees = Vec::new();
    for path in sorted_entries(dir) {
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if !path.is_dir() || name == "target" || name.starts_with('.') {
            continue;
        }
        if name == "src" && (path.join("lib.rs").is_file() || path.join("main.rs").is_file()) {
            let bin = path.join("bin");
            trees.push(SourceTree {
                files: module_files(&path, Some(&bin)),
                root: path,
            });
            for entry in sorted_entries(&bin) {
                if entry.is_dir() {
                    if entry.join("main.rs").is_file() {
                        trees.push(SourceTree {
                            files: module_files(&entry, None),
                            root: entry,
                        });
                    }
                } else if entry.extension().is_some_and(|extension| extension == "rs") {
                    // `bin/NAME.rs`, whose modules live in `bin/NAME/`.
                    let root = entry.with_extension("");
                    let mut files = vec![(entry, Vec::new())];
                    if root.is_dir() {
                        files.extend(module_files(&root, None));
                    }
                    trees.push(SourceTree { root, files });
                }
            }
        } else if path.join("main.rs").is_file() && dir.join("Cargo.toml").is_file() {
            // A package's integration-test target (`tests/it/main.rs`).
            trees.push(SourceTree {
                files: module_files(&path, None),
                root: path,
            });
        } else {
            trees.extend(source_trees(&path));
        }
    }
    trees
}

/// The entries of `dir` in name order; none when it is missing.
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|entry| entry.expect("a directory entry").path())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}

/// The `.rs` files under `root` (but not under `skip`), each with the
/// module path it holds.
fn module_files(root: &Path, skip: Option<&Path>) -> Vec<(PathBuf, Vec<String>)> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files
        .into_iter()
        .filter(|file| skip.is_none_or(|skip| !file.starts_with(skip)))
        .map(|file| {
            let relative = file.strip_prefix(root).expect("found under the root");
            let mut module = relative
                .iter()
                .map(|part| part.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect::<Vec<_>>();
            let crate_root = module.len() == 1 && (module[0] == "lib" || module[0] == "main");
            if crate_root || module.last().is_some_and(|last| last == "mod") {
                module.pop();
            }
            (file, module)
        })
        .collect()
}

/// Each cycle among the sibling modules of `tree`, described for a reader:
/// the directory, the modules in the cycle, and where each step is named.
fn sibling_cycles(tree: &SourceTree, workspace: &Path) -> Vec<String> {
    let mut cycles = Vec::new();
    for (parent, edges) in &sibling_graph(tree, workspace) {
        for component in strongly_connected(edges) {
            let cycle = shortest_cycle(edges, &component);
            let mut place = tree.root.clone();
            place.extend(parent);
            let mut text = format!(
                "{} (the modules of {}): {}",
                place.strip_prefix(workspace).unwrap_or(&place).display(),
                ["crate"]
                    .into_iter()
                    .chain(parent.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join("::"),
                cycle.join(" -> ")
            );
            for step in cycle.windows(2) {
                let edge = &edges[&(step[0].clone(), step[1].clone())];
                text.push_str(&format!("\n  {} -> {}: {edge}", step[0], step[1]));
            }
            if component.len() + 1 > cycle.len() {
                text.push_str(&format!(
                    "\n  (and more cycles among {})",
                    component.join(", ")
                ));
            }
            cycles.push(text);
        }
    }
    cycles
}

/// For each module of `tree` with children: which of its children depend
/// on which (the sibling → sibling steps), each with where it is named.
fn sibling_graph(tree: &SourceTree, workspace: &Path) -> BTreeMap<Vec<String>, Edges> {
    let all = tree
        .files
        .iter()
        .map(|(file, module)| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|error| panic!("reading {}: {error}", file.display()));
            (file, module, module_facts(&text, module))
        })
        .collect::<Vec<_>>();
    // Files of out-of-line test modules (`#[cfg(test)] mod tests;`) and
    // their children are test code too.
    let test_only = all
        .iter()
        .flat_map(|(_, _, facts)| facts.test_modules.clone())
        .collect::<Vec<_>>();
    let files = all
        .iter()
        .filter(|(_, module, _)| !test_only.iter().any(|test| module.starts_with(test)))
        .collect::<Vec<_>>();

    let mut modules = BTreeSet::new();
    for (_, module, facts) in &files {
        modules.insert((*module).clone());
        modules.extend(facts.inline_modules.iter().cloned());
    }
    // The names each module imports, with the absolute paths they stand for.
    let mut imports = HashMap::<Vec<String>, Vec<(String, Vec<String>)>>::new();
    for (_, _, facts) in &files {
        for (module, name, written) in &facts.imports {
            let target = absolute(module, written).or_else(|| {
                // `use child::X;`: a path from the module's own child.
                let mut target = module.clone();
                target.extend(written.iter().cloned());
                modules.contains(&target[..=module.len()]).then_some(target)
            });
            if let Some(target) = target {
                imports
                    .entry(module.clone())
                    .or_default()
                    .push((name.clone(), target));
            }
        }
    }
    // The path a name stands for once the re-exports on its way are
    // followed (a few steps at most: a re-export of a re-export).
    let resolve = |mut target: Vec<String>| {
        for _ in 0..8 {
            let known = (0..=target.len())
                .rev()
                .find(|&length| modules.contains(&target[..length]))
                .unwrap_or(0);
            let Some(name) = target.get(known) else {
                break;
            };
            let Some((_, to)) = imports
                .get(&target[..known])
                .and_then(|names| names.iter().find(|(bound, _)| bound == name))
            else {
                break;
            };
            if to[..] == target[..=known] {
                break;
            }
            let mut next = to.clone();
            next.extend(target[known + 1..].iter().cloned());
            target = next;
        }
        target
    };

    // For each parent module: (from sibling, to sibling) → where the first
    // path that makes the step is named.
    let mut graph = BTreeMap::<Vec<String>, Edges>::new();
    for (file, _, facts) in &files {
        for (here, written) in &facts.references {
            let Some(target) = absolute(here, written) else {
                continue;
            };
            // The parent and the two siblings of a step from `here` to
            // `target`; none for a path into an ancestor or a descendant,
            // or to an item of the common parent rather than one of its
            // modules.
            let step = |target: &[String]| {
                let shared = here.iter().zip(target).take_while(|(a, b)| a == b).count();
                (shared < here.len()
                    && shared < target.len()
                    && modules.contains(&target[..=shared]))
                .then(|| {
                    (
                        here[..shared].to_vec(),
                        here[shared].clone(),
                        target[shared].clone(),
                    )
                })
            };
            // An item of the parent may be one it re-exports from a sibling.
            let Some((parent, from, to)) = step(&target).or_else(|| step(&resolve(target.clone())))
            else {
                continue;
            };
            let place = file.strip_prefix(workspace).unwrap_or(file);
            graph
                .entry(parent)
                .or_default()
                .entry((from, to))
                .or_insert_with(|| format!("{} names {}", place.display(), written.join("::")));
        }
    }

    graph
}

/// Sibling → sibling steps, each with where it is named.
type Edges = BTreeMap<(String, String), String>;

/// The groups of two or more modules that each reach all the others.
fn strongly_connected(edges: &Edges) -> Vec<Vec<String>> {
    let reaches = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(node) = todo.pop() {
            for (_, to) in edges.keys().filter(|(edge_from, _)| *edge_from == node) {
                if seen.insert(to.clone()) {
                    todo.push(to.clone());
                }
            }
        }
        seen
    };
    let nodes = edges
        .keys()
        .flat_map(|(from, to)| [from.clone(), to.clone()])
        .collect::<BTreeSet<_>>();
    let reach = nodes
        .iter()
        .map(|node| (node.clone(), reaches(node)))
        .collect::<BTreeMap<_, _>>();
    let mut components = Vec::new();
    let mut placed = BTreeSet::new();
    for node in &nodes {
        if placed.contains(node) || !reach[node].contains(node) {
            continue;
        }
        let component = nodes
            .iter()
            .filter(|other| reach[node].contains(*other) && reach[*other].contains(node))
            .cloned()
            .collect::<Vec<_>>();
        placed.extend(component.iter().cloned());
        components.push(component);
    }
    components
}

/// The shortest cycle in `component`, as the modules on it, the first
/// repeated at the end.
fn shortest_cycle(edges: &Edges, component: &[String]) -> Vec<String> {
    component
        .iter()
        .map(|start| shortest_cycle_through(edges, component, start))
        .min_by_key(Vec::len)
        .expect("a component has modules")
}

/// The shortest cycle through `start` within `component`.
fn shortest_cycle_through(edges: &Edges, component: &[String], start: &String) -> Vec<String> {
    let mut came_from = BTreeMap::<String, String>::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(node) = queue.pop_front() {
        for (_, to) in edges.keys().filter(|(from, _)| *from == node) {
            if !component.contains(to) || came_from.contains_key(to) {
                continue;
            }
            came_from.insert(to.clone(), node.clone());
            if to == start {
                let mut cycle = vec![start.clone()];
                let mut at = came_from[start].clone();
                while at != *start {
                    cycle.push(at.clone());
                    at = came_from[&at].clone();
                }
                cycle.push(start.clone());
                cycle.reverse();
                return cycle;
            }
            queue.push_back(to.clone());
        }
    }
    unreachable!("a strongly connected component has a cycle through each module")
}

/// What one file says about modules.
#[derive(Debug, Default)]
struct ModuleFacts {
    /// The modules written inline (`mod name { … }`), by path.
    inline_modules: Vec<Vec<String>>,
    /// Out-of-line `#[cfg(test)] mod name;` modules, by path.
    test_modules: Vec<Vec<String>>,
    /// Each path that starts with `crate`, `super` or `self`, as written,
    /// with the module it is written in.
    references: Vec<(Vec<String>, Vec<String>)>,
    /// Each name a `use` binds: the module, the name, and the path as
    /// written.
    imports: Vec<(Vec<String>, String, Vec<String>)>,
}

/// The facts of the file of module `module`, from its text.
fn module_facts(text: &str, module: &[String]) -> ModuleFacts {
    let mut facts = ModuleFacts::default();
    let code = without_test_items(&code_only(text), |name| {
        let mut path = module.to_vec();
        path.push(name.to_owned());
        facts.test_modules.push(path);
    });
    let tokens = tokens(&code);
    // The inline modules we are in, each with the brace depth of its body.
    let mut inline = Vec::<(String, usize)>::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let here = || {
            let mut here = module.to_vec();
            here.extend(inline.iter().map(|(name, _)| name.clone()));
            here
        };
        match &tokens[i] {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, body)| *body == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Token::Ident(word) if word == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Punct('{'))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    let mut path = here();
                    path.push(name.clone());
                    facts.inline_modules.push(path);
                    depth += 1;
                    inline.push((name.clone(), depth));
                    i += 3;
                    continue;
                }
            }
            Token::Ident(word) if word == "use" => {
                let mut paths = Vec::new();
                i = use_tree(&tokens, i + 1, Vec::new(), &mut paths);
                let here = here();
                for (written, bound) in paths {
                    if written.is_empty() {
                        continue;
                    }
                    if let Some(name) = bound {
                        facts.imports.push((here.clone(), name, written.clone()));
                    }
                    if ["crate", "super", "self"].contains(&written[0].as_str()) {
                        facts.references.push((here.clone(), written));
                    }
                }
                continue;
            }
            Token::Ident(word)
                if ["crate", "super", "self"].contains(&word.as_str())
                    && tokens.get(i + 1) == Some(&Token::PathSep)
                    && (i == 0 || tokens[i - 1] != Token::PathSep) =>
            {
                let mut paths = Vec::new();
                i = use_tree(&tokens, i, Vec::new(), &mut paths);
                let here = here();
                facts.references.extend(
                    paths
                        .into_iter()
                        .map(|(written, _)| (here.clone(), written)),
                );
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    facts
}

/// The absolute module path of a path written in module `here`, when it
/// starts with `crate`, `super` or `self` (`None` otherwise, or when it
/// climbs above the crate root).
fn absolute(here: &[String], written: &[String]) -> Option<Vec<String>> {
    let (mut path, mut rest) = match written.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &written[1..]),
        Some("super" | "self") => (here.to_vec(), written),
        _ => return None,
    };
    while let Some(first) = rest.first() {
        match first.as_str() {
            "self" => {}
            "super" => {
                path.pop()?;
            }
            _ => break,
        }
        rest = &rest[1..];
    }
    path.extend(rest.iter().cloned());
    Some(path)
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of code that `code_only` left: words, `::` and single
/// characters (numbers come out as one `0` each).
fn tokens(code: &str) -> Vec<Token> {
    let chars = code.chars().collect::<Vec<_>>();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word = |i: &mut usize| {
            let start = *i;
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
            chars[start..*i].iter().collect::<String>()
        };
        if c.is_alphabetic() || c == '_' {
            tokens.push(Token::Ident(word(&mut i)));
        } else if c.is_ascii_digit() {
            word(&mut i);
            tokens.push(Token::Punct('0'));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(Token::PathSep);
            i += 2;
        } else {
            if !c.is_whitespace() {
                tokens.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    tokens
}

/// Reads the path, or `use` tree, at `tokens[i..]` whose segments so far
/// are `prefix`: pushes each whole path it spells with the name it binds
/// (none for a glob or a path that ends in `::<…>`), and returns where it
/// ends.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    mut prefix: Vec<String>,
    paths: &mut Vec<(Vec<String>, Option<String>)>,
) -> usize {
    loop {
        match tokens.get(i) {
            Some(Token::Ident(name)) => {
                i += 1;
                // `{self, …}` stands for the path so far.
                if name != "self" || prefix.is_empty() {
                    prefix.push(name.clone());
                }
                if tokens.get(i) == Some(&Token::PathSep) {
                    i += 1;
                    continue;
                }
                let mut bound = prefix.last().cloned();
                if tokens.get(i) == Some(&Token::Ident("as".to_owned())) {
                    if let Some(Token::Ident(alias)) = tokens.get(i + 1) {
                        bound = Some(alias.clone());
                        i += 2;
                    }
                }
                paths.push((prefix, bound));
                return i;
            }
            Some(Token::Punct('{')) => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        None => return i,
                        Some(Token::Punct('}')) => return i + 1,
                        Some(Token::Punct(',')) => i += 1,
                        Some(_) => {
                            let end = use_tree(tokens, i, prefix.clone(), paths);
                            i = end.max(i + 1);
                        }
                    }
                }
            }
            Some(Token::Punct('*')) => {
                paths.push((prefix, None));
                return i + 1;
            }
            _ => {
                paths.push((prefix, None));
                return i;
            }
        }
    }
}

/// `text` with its comments and the insides of its string and character
/// literals blanked (newlines kept), so that only code is left to read.
fn code_only(text: &str) -> String {
    let chars = text.chars().collect::<Vec<_>>();
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let word_char = |c: Option<&char>| c.is_some_and(|c| c.is_alphanumeric() || *c == '_');
    let mut code = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                code.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest.
            let mut depth = 0;
            while i < chars.len() {
                let pair = (chars[i], chars.get(i + 1).copied());
                if pair == ('/', Some('*')) || pair == ('*', Some('/')) {
                    depth += if pair.0 == '/' { 1 } else { -1 };
                    code.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    code.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (!word_char(i.checked_sub(1).and_then(|j| chars.get(j)))
                || (i >= 1
                    && chars[i - 1] == 'b'
                    && !word_char(i.checked_sub(2).and_then(|j| chars.get(j)))))
            && chars[i + 1..]
                .iter()
                .find(|c| **c != '#')
                .is_some_and(|c| *c == '"')
        {
            // A raw string, `r"…"` or `r#"…"#`: it ends at a quote followed
            // by as many `#` as it opened with.
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            let close = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect::<Vec<_>>();
            i += 2 + hashes;
            code.push_str(&" ".repeat(2 + hashes));
            while i < chars.len() && !chars[i..].starts_with(&close) {
                code.push(blank(chars[i]));
                i += 1;
            }
            code.push_str(&" ".repeat(close.len()));
            i += close.len();
        } else if c == '"' {
            code.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    code.push(' ');
                    i += 1;
                }
                if let Some(&c) = chars.get(i) {
                    code.push(blank(c));
                }
                i += 1;
            }
            code.push(' ');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal (a lone `'` starts a lifetime or label).
            code.push(' ');
            i += 1;
            if chars.get(i) == Some(&'\\') {
                code.push(' ');
                i += 1;
            }
            code.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                code.push(' ');
                i += 1;
            }
            code.push(' ');
            i += 1;
        } else {
            code.push(c);
            i += 1;
        }
    }
    code
}

/// `code` with each item under `#[cfg(test)]` blanked, from the attribute
/// to the item's `;` or the end of its `{ … }` body. Calls `test_module`
/// with the name of each `#[cfg(test)] mod name;`, whose file is left out
/// with it.
fn without_test_items(code: &str, mut test_module: impl FnMut(&str)) -> String {
    let mut chars = code.chars().collect::<Vec<_>>();
    let mut i = 0;
    while i < chars.len() {
        let Some(after) = cfg_test_attribute(&chars, i) else {
            i += 1;
            continue;
        };
        let mut end = after;
        let mut depth = 0_usize;
        while end < chars.len() {
            match chars[end] {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' if depth == 0 => break, // the enclosing block's end
                ')' | ']' => depth -= 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end += 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end += 1;
                    break;
                }
                _ => {}
            }
            end += 1;
        }
        let item = chars[after..end].iter().collect::<String>();
        if let [.., Token::Ident(word), Token::Ident(name), Token::Punct(';')] = &tokens(&item)[..]
        {
            if word == "mod" {
                test_module(name);
            }
        }
        for c in &mut chars[i..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = end;
    }
    chars.into_iter().collect()
}

/// Where a `#[cfg(test)]` attribute that starts at `chars[i]` ends.
fn cfg_test_attribute(chars: &[char], i: usize) -> Option<usize> {
    if chars.get(i) != Some(&'#') {
        return None;
    }
    let mut at = i;
    for expected in ["#", "[", "cfg", "(", "test", ")", "]"] {
        while chars.get(at).is_some_and(|c| c.is_whitespace()) {
            at += 1;
        }
        let expected = expected.chars().collect::<Vec<_>>();
        if !chars[at.min(chars.len())..].starts_with(&expected) {
            return None;
        }
        at += expected.len();
    }
    Some(at)
}

/// The cycles `sibling_cycles` finds in the crates under `dir`.
fn cycles_under(dir: &Path) -> Vec<String> {
    source_trees(dir)
        .iter()
        .flat_map(|tree| sibling_cycles(tree, dir))
        .collect()
}

/// A temporary workspace holding `files`, each a path and its text.
fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))
            .expect("creating a folder");
        std::fs::write(&path, text).expect("writing a file");
    }
    dir
}

/// A crate `a` whose `store` modules form a DAG (`objects` and `uploads`
/// use `types`; `uploads` uses `objects`), with every kind of path the
/// check reads and every kind it leaves out; each test adds its
/// `types.rs`.
const ONE_WAY: &[(&str, &str)] = &[
    ("a/src/lib.rs", "mod store;\npub use store::Database;\n"),
    (
        "a/src/store/mod.rs",
        "mod objects;\nmod types;\nmod uploads;\n\
         pub use types::{Phase, IN_FLIGHT as PHASES};\nuse uploads::Upload;\n\
         pub struct Database(Upload);\n",
    ),
    (
        "a/src/store/objects.rs",
        "use super::{types::Phase, Database};\n\
         pub struct Object;\n\
         fn f() -> &'static str { crate::store::PHASES }\n\
         // Not code: crate::store::uploads::Upload\n\
         /* nor /* this */ super::uploads */\n\
         const A: &str = \"super::uploads::Upload\";\n\
         const B: &str = r#\"crate::store::uploads \" \"#;\n\
         const C: char = '\"';\n\
         #[cfg(test)]\nmod tests {\n    use super::super::uploads::Upload;\n}\n",
    ),
    (
        "a/src/store/uploads.rs",
        "use crate::store::{self, objects::{self, Object}};\n\
         pub struct Upload(Object, super::Phase);\n",
    ),
    // A unit-test module in a file of its own, using a module above.
    (
        "a/src/store/types/tests.rs",
        "use crate::store::uploads::Upload;\n",
    ),
    // The first line of a bin crate is `crate` for itself.
    ("a/src/bin/tool.rs", "mod x;\nmod y;\nuse crate::x::X;\n"),
    ("a/src/bin/tool/x.rs", "pub struct X;\n"),
    ("a/src/bin/tool/y.rs", "use crate::x::X;\n"),
];

#[test]
fn the_cycle_check_passes_modules_that_depend_one_way() {
    let mut files = ONE_WAY.to_vec();
    files.push((
        "a/src/store/types.rs",
        "pub enum Phase {}\npub const IN_FLIGHT: &str = \"\";\n#[cfg(test)]\nmod tests;\n",
    ));
    let dir = fixture(&files);
    assert_eq!(cycles_under(dir.path()), Vec::<String>::new());
}

#[test]
fn the_cycle_check_names_each_cycle_and_where_its_steps_are() {
    // `types` now uses `uploads` outside its tests: a cycle through a
    // `use` group and a re-export of the parent.
    let mut files = ONE_WAY.to_vec();
    files.push((
        "a/src/store/types.rs",
        "pub enum Phase {}\npub const IN_FLIGHT: &str = \"\";\n\
         pub fn g(_: super::uploads::Upload) {}\n#[cfg(test)]\nmod tests;\n",
    ));
    // A crate further down the tree (as `common/*/src`), whose top-level
    // modules make a cycle of three through expression paths.
    files.extend([
        (
            "b/parts/c/src/main.rs",
            "mod p;\nmod q;\nmod r;\nfn main() {}\n",
        ),
        ("b/parts/c/src/p.rs", "pub fn f() { crate::q::g() }\n"),
        ("b/parts/c/src/q.rs", "pub fn g() { super::r::h() }\n"),
        ("b/parts/c/src/r.rs", "pub fn h() { crate::p::f() }\n"),
    ]);
    let dir = fixture(&files);
    let cycles = cycles_under(dir.path());
    assert_eq!(
        cycles,
        [
            "a/src/store (the modules of crate::store): types -> uploads -> types\n  \
             types -> uploads: a/src/store/types.rs names super::uploads::Upload\n  \
             uploads -> types: a/src/store/uploads.rs names super::Phase\n  \
             (and more cycles among objects, types, uploads)",
            "b/parts/c/src (the modules of crate): p -> q -> r -> p\n  \
             p -> q: b/parts/c/src/p.rs names crate::q::g\n  \
             q -> r: b/parts/c/src/q.rs names super::r::h\n  \
             r -> p: b/parts/c/src/r.rs names crate::p::f",
        ]
    );
}
