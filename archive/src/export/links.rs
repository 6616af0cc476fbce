//! Hardlinks of a change-list export: which listed inodes have names outside the list, and
//! the cursor that reaches listed paths one after another.

use super::*;

/// How many names of each multiply-linked regular file a change list holds, against its link
/// count.
#[derive(Default)]
pub(crate) struct LinkCounts(HashMap<(u64, u64), (u64, u64)>);

impl LinkCounts {
    /// Counts one (distinct) listed name whose `lstat` is `st`; only regular files with more
    /// than one link are recorded.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn add(&mut self, st: &Stat) {
        if ftype(st) == FileType::RegularFile && st.st_nlink > 1 {
            self.0
                .entry((st.st_dev as u64, st.st_ino as u64))
                .or_insert((0, st.st_nlink as u64))
                .0 += 1;
        }
    }

    /// The inodes with more links than listed names: they may have names outside the list.
    pub(crate) fn wanted(&self) -> HashSet<(u64, u64)> {
        self.0
            .iter()
            .filter(|(_, (names, nlink))| names < nlink)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Reaches listed paths below a root one after another, moving a [`DirStack`] from the parent
/// of one path to the parent of the next: a sorted list costs one `openat` per directory
/// entered, whatever its depth, and no path is ever resolved from the root as a whole.
pub(crate) struct ListCursor {
    pub(crate) stack: DirStack,
    /// The root as the caller named it, for error messages only.
    pub(crate) root: PathBuf,
}

impl ListCursor {
    /// A cursor at `root`, opened as the caller's own path.
    pub(crate) fn open(root: &Path) -> Result<ListCursor> {
        let fd = fs::open_root_dir(root).map_err(|e| Error::io("open directory", root, e))?;
        Self::new(fd, root)
    }

    pub(crate) fn new(fd: OwnedFd, root: &Path) -> Result<ListCursor> {
        Ok(ListCursor {
            stack: DirStack::new(fd).map_err(|e| Error::io("open directory", root, e))?,
            root: root.to_path_buf(),
        })
    }

    /// Opens the parent directories of `rel` (a non-empty path of normal components relative
    /// to the root) one at a time, never following a symlink, and returns the parent's
    /// descriptor with the last component's name.
    ///
    /// The stack first returns to the deepest directory it holds that is an ancestor of `rel`
    /// (compared as bytes with the stack's own path), then descends: the work is proportional to
    /// the distance between consecutive paths, not to their depth.
    pub(crate) fn reach(&mut self, rel: &Path) -> Result<(BorrowedFd<'_>, CString)> {
        let root = &self.root;
        let bad = |what: &str| {
            Error::io(
                format!("read listed path ({what})"),
                root.join(rel),
                io::Error::from_raw_os_error(libc::EINVAL),
            )
        };
        if rel.is_absolute() {
            return Err(bad("expected a path below the root"));
        }
        let (Some(last), Some(parent)) = (rel.file_name(), rel.parent()) else {
            return Err(bad("expected a path below the root"));
        };
        let last = CString::new(last.as_bytes()).map_err(|_| bad("NUL byte in a name"))?;
        let parent = parent.as_os_str().as_bytes();
        loop {
            let s = self.stack.rel();
            if s.is_empty()
                || (parent.starts_with(s) && parent.get(s.len()).is_none_or(|&b| b == b'/'))
            {
                break;
            }
            self.stack.pop().map_err(|e| {
                Error::io(
                    "return to the parent of",
                    self.root.join(self.stack.rel_path()),
                    e,
                )
            })?;
        }
        let rest = &parent[self.stack.rel().len()..];
        for c in rest.split(|&b| b == b'/') {
            match c {
                b"" | b"." => continue,
                b".." => return Err(bad("expected a path below the root")),
                _ => {}
            }
            let name = CString::new(c).map_err(|_| bad("NUL byte in a name"))?;
            self.stack.push(&name, None).map_err(|e| {
                Error::io(
                    "open directory",
                    self.root
                        .join(self.stack.rel_path())
                        .join(OsStr::from_bytes(c)),
                    e,
                )
            })?;
        }
        Ok((self.stack.top(), last))
    }

    /// `lstat` of the listed path `rel`.
    pub(crate) fn stat(&mut self, rel: &Path) -> Result<Stat> {
        let (dir, name) = self.reach(rel)?;
        match fs::stat_at(dir, &name) {
            Ok(st) => Ok(st),
            Err(e) => Err(Error::io("lstat", self.root.join(rel), e)),
        }
    }
}

/// For each inode in `want`, the bytewise-smallest name (relative to `root`) of a regular file
/// under `root` that is that inode and that neither `changes` nor an `Add`/`Delete` of one of its
/// ancestors touches, so it exists unchanged in the parent the changes were taken against.
///
/// One [`fs::walk`] of the whole tree, not following symlinks, run only when `want` is not
/// empty; memory is one name per wanted inode plus the names of the directories being walked.
pub(crate) fn names_outside(
    root: &Path,
    changes: &[Change],
    want: &HashSet<(u64, u64)>,
) -> Result<HashMap<(u64, u64), Vec<u8>>> {
    let mut found = HashMap::new();
    if want.is_empty() {
        return Ok(found);
    }
    let listed: HashMap<Vec<u8>, ChangeKind> = changes
        .iter()
        .map(|c| (rel_of(&c.path).into_os_string().into_vec(), c.kind))
        .collect();
    let dir = fs::open_root_dir(root).map_err(|e| Error::io("open directory", root, e))?;
    let mut scan = Scan {
        listed: &listed,
        want,
        found: &mut found,
    };
    fs::walk(dir, root, &mut scan)?;
    Ok(found)
}

/// The walk of [`names_outside`].
pub(crate) struct Scan<'a> {
    pub(crate) listed: &'a HashMap<Vec<u8>, ChangeKind>,
    pub(crate) want: &'a HashSet<(u64, u64)>,
    pub(crate) found: &'a mut HashMap<(u64, u64), Vec<u8>>,
}

impl Scan<'_> {
    /// Whether `rel` exists unchanged in the parent: it is not listed and no ancestor of it
    /// was added or deleted.
    pub(crate) fn unchanged(&self, rel: &[u8]) -> bool {
        if self.listed.contains_key(rel) {
            return false;
        }
        rel.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .all(|(i, _)| {
                !matches!(
                    self.listed.get(&rel[..i]),
                    Some(ChangeKind::Add | ChangeKind::Delete)
                )
            })
    }
}

impl fs::Visitor for Scan<'_> {
    type Error = Error;

    #[allow(clippy::unnecessary_cast)]
    fn entry(&mut self, _: BorrowedFd<'_>, _: &CStr, rel: &[u8], st: &Stat) -> Result<bool> {
        let key = (st.st_dev as u64, st.st_ino as u64);
        if ftype(st) == FileType::RegularFile && st.st_nlink > 1 && self.want.contains(&key) {
            let better = self.found.get(&key).is_none_or(|cur| rel < cur.as_slice());
            if better && self.unchanged(rel) {
                self.found.insert(key, rel.to_vec());
            }
        }
        Ok(true)
    }
}
