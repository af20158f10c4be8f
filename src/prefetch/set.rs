//! Prefetch sets: files that are read together, named by the publisher, fetched together.
//!
//! A directory D that holds a regular file `.lcfs-prefetch` defines one set: the files below D
//! whose path relative to D matches one of its globs (one a line; blank lines and lines
//! starting with `#` are skipped; `*` stays within a path component, `**` crosses them). The
//! file travels like any other, so publishing a set is writing that file; nothing on the
//! wire changes. On a mount, the first read of any member starts fetching every member in
//! the background at readahead priority: `import email` fetches the rest of what the import
//! will read while Python is still parsing its first module, in the spirit of CernVM-FS
//! file bundles and eStargz landmarks.
//!
//! Bounds, since the file is the publisher's word and a receiver walks by it: the file is
//! read only up to [`MAX_SET_FILE`] bytes and [`MAX_GLOBS`] globs; the walk lists at most
//! [`MAX_SET_DIRS`] directories and keeps at most [`MAX_MEMBERS`] files; only directories
//! that can hold a match are listed (a glob's literal leading components prune the walk).
//! This module is sans-IO but for [`members`], which lists directories through a [`Tree`].

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::fetch::{FetchError, Priority, Tree};
use crate::wire::object::{Content, EntryKind, FileRef, ObjectRef};

/// The name of the file that defines a set.
pub const SET_FILE: &[u8] = b".lcfs-prefetch";
/// The largest set file read.
pub const MAX_SET_FILE: u64 = 64 * 1024;
/// Globs taken from one set file.
pub const MAX_GLOBS: usize = 1024;
/// Directories listed to find a set's members.
pub const MAX_SET_DIRS: usize = 4096;
/// Files a set may hold.
pub const MAX_MEMBERS: usize = 65_536;

/// The globs of one set file.
#[derive(Debug)]
pub struct SetSpec {
    set: GlobSet,
    /// Per glob, its literal leading directory components: the walk needs to list only the
    /// directories on or below one of these paths.
    prefixes: Vec<Vec<String>>,
}

impl SetSpec {
    /// Parses a set file. Lines that are not valid globs are skipped (and counted in the
    /// error of [`SetSpec::parse`] only when none is valid).
    pub fn parse(text: &[u8]) -> Result<SetSpec, String> {
        let text = String::from_utf8_lossy(text);
        let mut builder = GlobSetBuilder::new();
        let mut prefixes = Vec::new();
        let mut bad = 0;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if prefixes.len() == MAX_GLOBS {
                break;
            }
            let pattern = line.trim_start_matches("./").trim_start_matches('/');
            match glob(pattern) {
                Ok(g) => {
                    builder.add(g);
                    prefixes.push(literal_prefix(pattern));
                }
                Err(_) => bad += 1,
            }
        }
        if prefixes.is_empty() {
            return Err(format!("no usable glob ({bad} unparsable lines)"));
        }
        let set = builder.build().map_err(|e| e.to_string())?;
        Ok(SetSpec { set, prefixes })
    }

    /// Whether the file at `rel` (relative to the set's directory) is a member.
    pub fn matches(&self, rel: &str) -> bool {
        self.set.is_match(rel)
    }

    /// Whether the directory at `rel` (components relative to the set's directory) may hold
    /// members: it lies on the way to some glob's literal prefix, or below one.
    pub fn may_hold(&self, rel: &[String]) -> bool {
        self.prefixes.iter().any(|p| {
            let n = p.len().min(rel.len());
            p[..n] == rel[..n]
        })
    }
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// The directory components of `pattern` before the first one with a glob metacharacter.
fn literal_prefix(pattern: &str) -> Vec<String> {
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    let dirs = parts.len().saturating_sub(1);
    parts[..dirs]
        .iter()
        .take_while(|p| !p.contains(['*', '?', '[', '{', '\\']))
        .map(|p| (*p).to_owned())
        .collect()
}

/// The set file's text, when `entry` is a set file small enough to read.
pub async fn read_set_file(tree: &Tree, f: &FileRef) -> Result<Option<Vec<u8>>, FetchError> {
    if f.size > MAX_SET_FILE {
        return Ok(None);
    }
    match &f.content {
        Content::Inline(bytes) => Ok(Some(bytes.clone())),
        Content::Block(h) => {
            let r = ObjectRef {
                hash: *h,
                len: f.size as u32,
            };
            Ok(Some(
                tree.fetcher().fetch(r, Priority::Readahead).await?.to_vec(),
            ))
        }
        // More than one block: larger than any set file we read.
        Content::Index { .. } => Ok(None),
    }
}

/// The members of the set `spec` of directory `dir`, walking only what may hold them.
pub async fn members(
    tree: &Tree,
    dir: ObjectRef,
    spec: &SetSpec,
) -> Result<Vec<FileRef>, FetchError> {
    let mut out = Vec::new();
    let mut todo = vec![(dir, Vec::<String>::new())];
    let mut listed = 0;
    while let Some((r, rel)) = todo.pop() {
        listed += 1;
        if listed > MAX_SET_DIRS {
            break;
        }
        let d = tree.directory(r, Priority::Readahead).await?;
        for e in d.entries {
            let Ok(name) = String::from_utf8(e.name) else {
                continue;
            };
            match e.kind {
                EntryKind::File(f) if name.as_bytes() != SET_FILE => {
                    let path = join(&rel, &name);
                    if spec.matches(&path) && out.len() < MAX_MEMBERS {
                        out.push(f);
                    }
                }
                EntryKind::Dir(sub) => {
                    let mut below = rel.clone();
                    below.push(name);
                    if spec.may_hold(&below) {
                        todo.push((sub, below));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn join(rel: &[String], name: &str) -> String {
    let mut p = rel.join("/");
    if !p.is_empty() {
        p.push('/');
    }
    p.push_str(name);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(p: &str) -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn globs_match_paths_relative_to_the_set() {
        let spec = SetSpec::parse(
            b"# python's email and json\nemail/**\n\njson/*.py\n./http/client.py\n/encodings/utf_8.py\n",
        )
        .unwrap();
        for yes in [
            "email/__init__.py",
            "email/mime/text.py",
            "json/decoder.py",
            "http/client.py",
            "encodings/utf_8.py",
        ] {
            assert!(spec.matches(yes), "{yes}");
        }
        for no in ["json/tests/x.py", "http/server.py", "emailx/a.py", "email"] {
            assert!(!spec.matches(no), "{no}");
        }
    }

    #[test]
    fn the_walk_is_pruned_to_what_may_hold_members() {
        let spec = SetSpec::parse(b"lib/python3/email/**\nshare/*/x.txt\n").unwrap();
        assert!(spec.may_hold(&dirs("lib")));
        assert!(spec.may_hold(&dirs("lib/python3")));
        assert!(spec.may_hold(&dirs("lib/python3/email/mime")));
        assert!(!spec.may_hold(&dirs("lib/python2")));
        assert!(!spec.may_hold(&dirs("bin")));
        assert!(spec.may_hold(&dirs("share/doc")), "a wildcard component");
        let everywhere = SetSpec::parse(b"**/*.h\n").unwrap();
        assert!(everywhere.may_hold(&dirs("a/b/c")));
    }

    #[test]
    fn hostile_set_files_give_errors_or_bounded_sets() {
        assert!(SetSpec::parse(b"").is_err());
        assert!(SetSpec::parse(b"# only a comment\n\n").is_err());
        assert!(SetSpec::parse(b"[unclosed\n").is_err());
        assert!(
            SetSpec::parse(&[0xff, 0xfe, b'\n', b'*']).is_ok(),
            "invalid UTF-8 is lossy"
        );
        let many: Vec<u8> = (0..5000)
            .flat_map(|i| format!("d{i}/*\n").into_bytes())
            .collect();
        assert_eq!(SetSpec::parse(&many).unwrap().prefixes.len(), MAX_GLOBS);
        // a seeded pile of random bytes never panics
        let mut x: u64 = 0x5eed;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let alphabet = b"*?[]{}/\\\n.a!";
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            if let Ok(s) = SetSpec::parse(&bytes) {
                let _ = s.matches("a/b.c");
                let _ = s.may_hold(&dirs("a/b"));
            }
        }
    }
}
