//! `.lcfsignore`: paths of the served tree that no generation publishes (issue 10).
//!
//! The file sits at the tree's root and uses gitignore syntax (`build/`, `*.tmp`, `/secret`,
//! `!keep.tmp`); patterns match paths relative to the root. It is read through the tree's
//! descriptor like everything else (`O_NOFOLLOW`: a symlink named `.lcfsignore` is refused),
//! and only matching comes from the `ignore` crate: its directory walker follows paths and is
//! never used. The walk does not descend into an ignored directory, so, as in git, a `!`
//! pattern cannot bring back a path below one.
//!
//! The ignore file is never published itself. It fails closed: one that exists but cannot be
//! read, is not UTF-8, is larger than [`IGNORE_FILE_MAX`] or holds a pattern that does not
//! parse stops the index (the server keeps serving the generation before), because publishing
//! without it would publish exactly what the administrator meant to keep out.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::beneath::{self, Kind, Tree};
use super::IndexError;

/// The ignore file's name, at the tree's root.
pub const IGNORE_FILE: &str = ".lcfsignore";
/// The largest ignore file read.
pub const IGNORE_FILE_MAX: u64 = 1 << 20;

/// The patterns of one tree's ignore file (none when there is no such file).
#[derive(Clone, Debug)]
pub struct IgnoreRules {
    matcher: Gitignore,
}

impl IgnoreRules {
    /// Rules that ignore nothing but the ignore file.
    pub fn none() -> IgnoreRules {
        IgnoreRules {
            matcher: Gitignore::empty(),
        }
    }

    /// Reads the tree's ignore file, if it has one; a single-file tree has none.
    pub fn load(tree: &Tree) -> Result<IgnoreRules, IndexError> {
        if tree.single_file().is_some() {
            return Ok(IgnoreRules::none());
        }
        let path = tree.display(Path::new(IGNORE_FILE));
        let fail = |why: String| IndexError::IgnoreFile {
            path: path.clone(),
            why,
        };
        let text = match read_ignore_file(tree) {
            Ok(None) => return Ok(IgnoreRules::none()),
            Ok(Some(bytes)) => String::from_utf8(bytes).map_err(|_| fail("not UTF-8".into()))?,
            Err(e) => return Err(fail(e.to_string())),
        };
        let mut builder = GitignoreBuilder::new("");
        for (n, line) in (1..).zip(text.lines()) {
            builder
                .add_line(None, line)
                .map_err(|e| fail(format!("line {n}: {e}")))?;
        }
        let matcher = builder.build().map_err(|e| fail(e.to_string()))?;
        Ok(IgnoreRules { matcher })
    }

    /// Whether the walk leaves out `rel` (relative to the tree), a directory if `is_dir`.
    pub fn is_ignored(&self, rel: &Path, is_dir: bool) -> bool {
        rel == Path::new(IGNORE_FILE) || self.matcher.matched(rel, is_dir).is_ignore()
    }

    /// Whether a change notified at `rel` can only concern ignored paths: `rel` or one of
    /// its parents is ignored. A change of the ignore file itself matters.
    pub fn change_is_ignored(&self, rel: &Path) -> bool {
        if rel == Path::new(IGNORE_FILE) || rel.as_os_str().is_empty() || rel.has_root() {
            return false;
        }
        self.matcher
            .matched_path_or_any_parents(rel, false)
            .is_ignore()
    }
}

/// The ignore file's bytes, `None` if there is none. Opened without following a symlink.
fn read_ignore_file(tree: &Tree) -> std::io::Result<Option<Vec<u8>>> {
    let name = c".lcfsignore";
    let file = match beneath::open_file_at(tree.dir().as_fd(), name) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    };
    let attrs = beneath::stat_fd(&file)?;
    if attrs.kind != Kind::File {
        return Err(std::io::Error::other("not a regular file"));
    }
    if attrs.size > IGNORE_FILE_MAX {
        return Err(std::io::Error::other(format!(
            "larger than {IGNORE_FILE_MAX} bytes"
        )));
    }
    let mut bytes = Vec::new();
    file.take(IGNORE_FILE_MAX + 1).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}
