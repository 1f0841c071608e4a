//! The documentation, checked like code: README.md is the front page, `docs/` the
//! reference (issue #28), and both rot silently when a page moves, a key or a metric
//! is added, or a command changes. Each test fails naming what is wrong:
//!
//! - links: every relative link in README.md and `docs/*.md` names a file and, with
//!   `#anchor`, a heading of it (GitHub's slug); every docs page is on both maps.
//! - config keys: every key of `config.toml`, active (parsed with `toml`, flattened) or
//!   a commented-out example (a `# key = value` line that parses as TOML, under
//!   `[section]` or `# [section]`), is on a line of `docs/*.md` as `` `section.key` ``,
//!   as a free-form `` `section.<name>` ``, or in the key tables' shorthand for a row
//!   of several keys: `` `section.other` `` and `` `.key` `` on one line.
//! - metrics: every name a running proxy's `/metrics` exports and every `canarygate_*`
//!   name in a string literal under `src/` (the doctor's and maintenance's too),
//!   histogram suffixes stripped, has its own row in a `docs/` metric table.
//! - commands: README's "Two commands" are `cargo run --release -- demo` and `./test`,
//!   `.ci/run` runs `./test`, `demo --help` works and shows the addresses README
//!   quotes, and README.md has at most 300 lines.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Proxy, client, config_toml, get, two_pools, within};

/// Names with the metric prefix in `src/` that are not metrics: the sticky cookie.
const NOT_METRICS: &[&str] = &["canarygate_id"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `docs/*.md`, sorted.
fn docs_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    pages
}

/// All of `docs/*.md`.
fn docs_text() -> String {
    let pages: Vec<String> = docs_pages().iter().map(|p| read(p)).collect();
    pages.join("\n")
}

/// The lines of a Markdown text outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut keep = |l: &&str| {
        fenced ^= l.trim_start().starts_with("```");
        !fenced && !l.trim_start().starts_with("```")
    };
    text.lines().filter(|l| keep(l)).collect()
}

/// The anchors GitHub gives a file's headings: lowercase, spaces to `-`, other
/// punctuation dropped, `-1`, `-2` for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let (mut seen, mut out) = (HashMap::<String, usize>::new(), BTreeSet::new());
    for line in prose(text).into_iter().filter(|l| l.starts_with('#')) {
        let Some(heading) = line.trim_start_matches('#').strip_prefix(' ') else {
            continue;
        };
        let slug: String = (heading.trim().to_lowercase().chars())
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 { slug } else { format!("{slug}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of the `[text](target)` links of a Markdown text.
fn link_targets(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for mut rest in prose(text) {
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_resolves_and_every_page_is_on_the_maps() {
    let readme = root().join("README.md");
    let (mut broken, mut checked) = (Vec::new(), 0);
    for file in std::iter::once(readme.clone()).chain(docs_pages()) {
        let text = read(&file);
        for target in link_targets(&text) {
            if target.contains("://") {
                continue;
            }
            checked += 1;
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let dest = file.parent().unwrap().join(path);
            let dest = if path.is_empty() { file.clone() } else { dest };
            let at = format!("{}: ({target})", file.display());
            if !dest.exists() {
                broken.push(format!("{at}: no file {}", dest.display()));
            } else if !anchor.is_empty() && !anchors(&read(&dest)).contains(anchor) {
                broken.push(format!("{at}: no heading #{anchor} there"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 50, "{checked} relative links: parser broken?");
    let (readme, index) = (read(&readme), read(&root().join("docs/README.md")));
    for page in docs_pages() {
        let name = page.file_name().unwrap().to_str().unwrap();
        let on_index = name == "README.md" || index.contains(&format!("]({name})"));
        assert!(on_index, "docs/README.md does not link {name}");
        let on_map = readme.contains(&format!("](docs/{name})"));
        assert!(on_map, "README.md's map does not link docs/{name}");
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        if let toml::Value::Table(t) = value {
            flatten(&format!("{path}."), t, out);
        } else {
            out.insert(path);
        }
    }
}

/// Every key of `config.toml`, active or commented out, as `section.key`.
fn config_keys() -> BTreeSet<String> {
    let text = read(&root().join("config.toml"));
    let mut keys = BTreeSet::new();
    let table = text.parse().expect("config.toml is valid TOML");
    flatten("", &table, &mut keys);
    let mut section = String::new();
    for line in text.lines() {
        let bare = line.strip_prefix('#').unwrap_or(line).trim();
        let header = bare.strip_prefix('[').and_then(|b| b.strip_suffix(']'));
        if let Some(name) = header.filter(|n| !n.contains([' ', '"', '='])) {
            section = name.to_owned();
        } else if line.starts_with('#')
            && let Ok(example) = bare.parse::<toml::Table>()
        {
            keys.extend(example.keys().map(|k| format!("{section}.{k}")));
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented() {
    let keys = config_keys();
    for sure in ["server.tls.cert_path", "alerts.webhook.headers"] {
        assert!(keys.contains(sure), "lost {sure}: {keys:?}");
    }
    let docs = docs_text();
    let documented = |key: &&String| {
        let (section, name) = key.rsplit_once('.').unwrap();
        let (full, free) = (format!("`{key}`"), format!("`{section}.<"));
        let (same, short) = (format!("`{section}."), format!("`.{name}`"));
        docs.lines().any(|l| {
            l.contains(&full) || l.contains(&free) || (l.contains(&same) && l.contains(&short))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !documented(k)).collect();
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
}

/// The string literals of a Rust source file (comments and char literals skipped).
fn string_literals(src: &str) -> Vec<&str> {
    let (b, mut out, mut i) = (src.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        let skip_to = |at: usize, end: &str| src[at..].find(end).map_or(b.len(), |n| at + n);
        match (b[i], b.get(i + 1).copied()) {
            (b'/', Some(b'/')) => i = skip_to(i, "\n"),
            (b'/', Some(b'*')) => i = skip_to(i, "*/") + 2,
            (b'\'', Some(b'\\')) => i = skip_to(i + 3, "'") + 1,
            (b'\'', _) if b.get(i + 2) == Some(&b'\'') => i += 3,
            (b'"', _) => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                out.push(&src[start..i.min(b.len())]);
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

fn strip_suffix(name: &str) -> String {
    let suffixes = ["_bucket", "_sum", "_count"];
    let base = suffixes.iter().find_map(|s| name.strip_suffix(s));
    base.unwrap_or(name).to_owned()
}

/// `canarygate_*` metric names in the string literals of the `.rs` files under `dir`.
fn source_metric_names(dir: &Path, out: &mut BTreeSet<String>) {
    for path in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        if path.is_dir() {
            source_metric_names(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            for literal in string_literals(&read(&path)) {
                for (i, _) in literal.match_indices("canarygate_") {
                    let metric =
                        |c: &char| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_';
                    let name: String = literal[i..].chars().take_while(metric).collect();
                    if !name.ends_with('_') && !NOT_METRICS.contains(&&*name) {
                        out.insert(strip_suffix(&name));
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn every_metric_is_documented() {
    let scraped = within(30, async {
        let (production, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(&[production.addr], &[canary.addr], "")).await;
        let c = client();
        get(&c, &proxy.url("/"), &[]).await;
        let metrics = get(&c, &format!("http://{}/metrics", proxy.admin_addr), &[]).await;
        metrics.text().to_owned()
    })
    .await;
    let mut names = BTreeSet::new();
    for line in scraped
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        names.insert(strip_suffix(line.split(['{', ' ']).next().unwrap()));
    }
    assert!(names.contains("canarygate_requests_total"), "{scraped}");
    source_metric_names(&root().join("src"), &mut names);
    let sure = "canarygate_maintenance_deferred_total";
    assert!(names.contains(sure), "the src/ scan lost {sure}");
    let docs = docs_text();
    let first_cells: Vec<&str> = (docs.lines())
        .filter_map(|l| l.strip_prefix('|')?.split('|').next())
        .collect();
    let has_row = |n: &&String| first_cells.iter().any(|c| c.contains(&format!("`{n}`")));
    let missing: Vec<&String> = names.iter().filter(|n| !has_row(n)).collect();
    assert!(missing.is_empty(), "undocumented metrics: {missing:?}");
    for name in NOT_METRICS {
        assert!(!scraped.contains(name), "{name} is a metric now");
    }
}

#[test]
fn readme_two_commands_are_the_ones_used() {
    let readme = read(&root().join("README.md"));
    assert!(readme.lines().count() <= 300, "README.md is over 300 lines");
    let block: Vec<&str> = (readme.split("## Two commands").nth(1))
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("README.md has a ## Two commands section with a sh block")
        .lines()
        .collect();
    let [demo, test] = block[..] else {
        panic!("README's Two commands block is not two lines: {block:?}")
    };
    assert!(demo.starts_with("cargo run --release -- demo "), "{demo}");
    assert!(test.starts_with("./test "), "{test}");
    let ci = read(&root().join(".ci/run"));
    let code = ci.lines().filter(|l| !l.trim_start().starts_with('#'));
    let runs_test = code.into_iter().any(|l| l.contains("./test "));
    assert!(runs_test, ".ci/run does not run ./test");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_canarygate"));
    let out = demo.args(["demo", "--help"]).output().unwrap();
    assert!(out.status.success(), "demo --help: {out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for addr in ["127.0.0.1:8080", "127.0.0.1:9090"] {
        let both = help.contains(addr) && readme.contains(addr);
        assert!(both, "demo default {addr}: {help}");
    }
}
