//! Applying layer tarballs onto a directory.
//!
//! [`apply_layer`] reads a tar stream entry by entry with our own reader (`reader.rs`: PAX
//! records parsed by their length prefix, GNU long names, old-GNU and PAX 0.0/0.1/1.0 sparse
//! files) — never `tar`'s `unpack`, which skips `..` silently, defers directories without
//! setting their mtimes, drops directory and symlink xattrs and writes devices as empty files —
//! and writes every entry beneath the target:
//!
//! * **Confinement.** Every entry name is normalised (leading `/` stripped, `.` dropped, `..`
//!   that would climb out of the target refused with [`Error::BadEntry`]). The entry's parent
//!   directory is then opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from an fd
//!   of the target (a manual `O_NOFOLLOW` walk, one fd whatever the depth, for names beyond
//!   `PATH_MAX` or where `openat2` is missing; a cursor on the last parent for long names, see
//!   `resolve.rs`), so symlinks planted by the layer resolve *inside* the target. The last component is written with `*at()` calls
//!   relative to that parent fd and never followed. Hardlink targets are resolved the same way;
//!   a hardlink to a symlink links the symlink itself.
//! * **Metadata.** Owners are numeric (names are never looked up); `chown` comes before `chmod`
//!   (it clears setuid/setgid) and before xattrs (it clears `security.capability`). xattrs come
//!   from PAX `SCHILY.xattr.*` records on files, directories, symlinks and nodes, except
//!   overlayfs' own `trusted.overlay.*` / `user.overlay.*`, which a layer must not forge.
//!   mtimes are set as entries are written; directory mtimes are set at the very end, after
//!   everything below them has been written and every removal done (one moving cursor: no fd
//!   per level, no full-path calls).
//! * **Whiteouts** per [`WhiteoutFormat`] (a char 0/0 entry is one, see [`apply_layer`]);
//!   removals are iterative ([`remove_tree_at`]); `.wh..wh.plnk/…` entries are staged under
//!   that (reserved) name in the target and removed at the end.
//! * **Device nodes** that the process may not create (`EPERM`: a normal user, a user
//!   namespace) are skipped and reported ([`apply_layer_report`]).
//! * **Sparse files** are written as holes: the file is sized to its real size and only the
//!   data segments are written (`pwrite`).
//! * **Limits** ([`ApplyOptions::max_entries`], [`ApplyOptions::max_bytes`]) refuse archive
//!   bombs with [`Error::LimitExceeded`].
//! * **Memory does not grow with the layer.** What must be known until the end — the paths
//!   this layer wrote (which an opaque directory keeps; OCI whiteouts only), the opaque
//!   directories and the directory times — is kept in logs with a fixed memory budget that
//!   spill to an unlinked scratch file in the target (`spill.rs`); opaque directories are
//!   pruned by merging the sorted written paths with a depth-first walk.
//!
//! After the end-of-archive blocks the rest of the input is read and discarded, so a process
//! writing into a pipe never blocks on a reader that stopped early.
//!
//! # Invariant: fork-safe
//!
//! This module never logs, prints, reads environment variables or takes locks shared with other
//! threads: `chrootarchive` runs it in a child forked from a multi-threaded process, where any
//! of those could deadlock or leak. [`apply_layer_report`] and [`untar_report`] (what the child
//! calls) touch no thread-local state with a destructor either; only [`apply_layer`] and
//! [`untar`] add to this thread's skipped list ([`take_skipped`]) after the apply.

pub(crate) use crate::codec::header::checksum_matches as header_checksum_matches;
mod copyup;
mod resolve;
mod spill;
#[cfg(any(test, feature = "test-util"))]
pub use spill::set_spill_limit;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use tar::EntryType;

use crate::codec::reader::{Entry, TarReader};
use crate::{
    Error, OverlayXattr, Result, TarOptions, WHITEOUT_LINK_DIR, WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE, WHITEOUT_PREFIX, WhiteoutFormat,
};
use resolve::{Cursor, list_dir, open_root};
use spill::{PathLog, TimeLog};

/// Size of the buffer in front of the input stream.
const INPUT_BUFFER: usize = 1 << 20;

/// Options for [`apply_layer`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ApplyOptions {
    /// How whiteouts end up on disk: [`WhiteoutFormat::Oci`] deletes what `.wh.name` names and
    /// empties opaque directories of what lower layers had; [`WhiteoutFormat::Overlay`] writes a
    /// char device 0/0 and the opaque xattr instead.
    pub whiteout_format: WhiteoutFormat,
    /// The most tar entries (of any type, whiteouts included) accepted; `None` for no limit.
    pub max_entries: Option<u64>,
    /// The most regular-file content bytes accepted in total; `None` for no limit.
    pub max_bytes: Option<u64>,
    /// `true` (the default): give every entry the numeric uid/gid the tar says. `false`: leave
    /// entries owned by the calling process (rootless use).
    pub same_owner: bool,
    /// With [`WhiteoutFormat::Overlay`]: the lower directories of the upper being written,
    /// topmost first. A hardlink whose target the upper lacks but a lower shows (a layer tar
    /// may link to an unchanged file of its parent) copies that file up first, as overlayfs
    /// does before a `link(2)` to a lower file; lowers are only read, below their descriptors,
    /// never following a symlink. Empty (the default): such a link fails, naming its target.
    pub link_lowers: Vec<Arc<OwnedFd>>,
}

impl Default for ApplyOptions {
    /// OCI whiteouts, no limits, owners from the tar.
    fn default() -> Self {
        ApplyOptions {
            whiteout_format: WhiteoutFormat::Oci,
            max_entries: None,
            max_bytes: None,
            same_owner: true,
            link_lowers: Vec::new(),
        }
    }
}

/// Applies the uncompressed layer tar read from `reader` onto the directory `dest`.
///
/// Returns the number of regular-file content bytes written: the sum of the sizes of the
/// regular-file entries (hardlink entries count 0; sparse files count their real size, holes
/// included, also against [`ApplyOptions::max_bytes`]), the same measure as
/// [`crate::changes_size`], so a diff→apply round trip reports equal sizes. Compressed input
/// must be passed through [`crate::decompress`] first (in the trusted process).
///
/// Entries it skipped (see [`apply_layer_report`]) are added to this thread's list, which
/// [`take_skipped`] returns; call [`apply_layer_report`] to get them with the result instead.
///
/// **Whiteouts and char 0/0.** With [`WhiteoutFormat::Oci`] (the default), a `.wh.<name>`
/// entry deletes `<name>` (everything below it included), `.wh..wh..opq` empties its directory
/// of what lower layers had, and a **character device 0/0 entry is a whiteout too**: it
/// deletes the path it names from the lower layers and is not created, exactly like
/// `.wh.<name>`. An overlay driver uses layer trees as lower directories, where a char 0/0
/// *is* a whiteout; applying it as a whiteout makes the layer's own tree, its children's views
/// and every driver agree (the path is absent everywhere, as overlay stacking shows it), and
/// no layer tree contains a device that means "deleted" in one view and "device" in another.
/// With [`WhiteoutFormat::Overlay`] the tree *is* an overlay upper directory, so a char 0/0
/// entry stays a char 0/0 (there it is the whiteout) and `.wh.` entries become char 0/0.
///
/// **Paths of any length.** Entry names far beyond `PATH_MAX` (a 10,000-level tree has
/// 20,000-byte names) resolve component by component with a bounded number of fds, whatever
/// the depth and the soft `RLIMIT_NOFILE`.
///
/// Errors: [`Error::BadEntry`] for entries that try to leave `dest` or use reserved whiteout
/// names, [`Error::Malformed`] for broken tar streams, [`Error::LimitExceeded`] for limits,
/// [`Error::Io`] for filesystem failures. On error the tree is left partially applied.
pub fn apply_layer(dest: &Path, reader: impl Read, opts: &ApplyOptions) -> Result<u64> {
    let report = apply_layer_report(dest, reader, opts)?;
    note_skipped(report.skipped, report.skipped_count);
    Ok(report.bytes)
}

/// [`apply_layer`], returning what it skipped along with the byte count (and leaving this
/// thread's skipped list alone).
///
/// Entries are skipped, never silently: a character or block device whose `mknod` is refused
/// with `EPERM` — the process lacks `CAP_MKNOD` over the target's filesystem, as a normal user
/// or in a user namespace (rootless `chrootarchive`) — is not created and is listed in
/// [`ApplyReport::skipped`] with the reason, as moby does in a user namespace; the rest of the
/// layer is applied. Root in the initial user namespace creates devices as before. A path that
/// held something else before the device entry no longer holds it.
pub fn apply_layer_report(
    dest: &Path,
    reader: impl Read,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let mode = Mode_::Layer(opts.whiteout_format);
    let link_lowers = match opts.whiteout_format {
        WhiteoutFormat::Overlay(ns) if !opts.link_lowers.is_empty() => {
            Some((ns, opts.link_lowers.clone()))
        }
        _ => None,
    };
    run(
        dest,
        reader,
        mode,
        opts.same_owner,
        (opts.max_entries, opts.max_bytes),
        link_lowers,
    )
}

/// What [`apply_layer_report`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Regular-file content bytes written (what [`apply_layer`] returns).
    pub bytes: u64,
    /// Entries not written, as (path relative to the target, why): device nodes the process
    /// may not create. At most [`MAX_SKIPPED`] are listed.
    pub skipped: Vec<(PathBuf, String)>,
    /// How many entries were skipped in all (more than `skipped.len()` when the list was cut).
    pub skipped_count: u64,
}

impl ApplyReport {
    /// A report of `bytes` written and nothing skipped.
    pub fn new(bytes: u64) -> Self {
        ApplyReport {
            bytes,
            ..Default::default()
        }
    }
}

/// The most skipped entries an [`ApplyReport`] (and [`take_skipped`]) lists; a layer with more
/// (a hostile one) is counted, not listed, so memory stays bounded.
pub const MAX_SKIPPED: usize = 256;

/// A bounded list of skipped entries.
#[derive(Default)]
struct Skipped {
    /// The first [`MAX_SKIPPED`].
    list: Vec<(PathBuf, String)>,
    /// All of them.
    count: u64,
}

impl Skipped {
    fn push(&mut self, path: PathBuf, reason: String) {
        self.count += 1;
        if self.list.len() < MAX_SKIPPED {
            self.list.push((path, reason));
        }
    }
}

std::thread_local! {
    /// Entries skipped by applies on this thread that returned only a byte count.
    static SKIPPED: std::cell::RefCell<Skipped> = std::cell::RefCell::new(Skipped::default());
}

/// Adds `skipped` (of `count` skipped in all) to this thread's skipped list (see
/// [`take_skipped`]). For appliers that return only a byte count but got an [`ApplyReport`]
/// from elsewhere: `chrootarchive::apply_layer` calls it with what its confined child reported.
pub fn note_skipped(skipped: Vec<(PathBuf, String)>, count: u64) {
    if count == 0 {
        return;
    }
    let listed = skipped.len() as u64;
    SKIPPED.with(|s| {
        let mut s = s.borrow_mut();
        for (p, why) in skipped {
            s.push(p, why);
        }
        // Those counted but not listed by the report.
        s.count += count.saturating_sub(listed);
    });
}

/// Takes the entries skipped, since the last call, by the byte-count applies that ran on this
/// thread ([`apply_layer`], [`untar`], `chrootarchive::apply_layer` and whatever calls them, a
/// driver's `apply_diff` for example): (path relative to the apply target, why), at most
/// [`MAX_SKIPPED`], and how many were skipped in all. A command-line tool prints them as
/// warnings after an apply; a long-running caller should take them after every apply (the
/// list is bounded, not forgotten).
pub fn take_skipped() -> (Vec<(PathBuf, String)>, u64) {
    SKIPPED.with(|s| {
        let s = std::mem::take(&mut *s.borrow_mut());
        (s.list, s.count)
    })
}

/// Extracts the plain tar read from `reader` into `dest`, without whiteout semantics.
///
/// `.wh.` names are written as ordinary files. Only entries at or below one of
/// `opts.include` (all when empty) and not at or below one of `opts.exclude` are written;
/// directories that are ancestors of an include path are written too, keeping their metadata.
/// Confinement, metadata and error rules are those of [`apply_layer`]; owners are set.
pub fn untar(dest: &Path, reader: impl Read, opts: &TarOptions) -> Result<()> {
    untar_report(dest, reader, opts).map(|r| {
        note_skipped(r.skipped, r.skipped_count);
    })
}

/// [`untar`], returning what it skipped (device nodes, as in [`apply_layer_report`]) with the
/// bytes written, and leaving this thread's skipped list alone.
pub fn untar_report(dest: &Path, reader: impl Read, opts: &TarOptions) -> Result<ApplyReport> {
    run(dest, reader, Mode_::Plain(opts), true, (None, None), None)
}

/// What kind of extraction runs.
#[derive(Clone, Copy)]
enum Mode_<'a> {
    /// A layer with whiteouts in the given on-disk format.
    Layer(WhiteoutFormat),
    /// A plain tar with include/exclude filters.
    Plain(&'a TarOptions),
}

/// The shared driver of [`apply_layer`] and [`untar`].
fn run(
    dest: &Path,
    reader: impl Read,
    mode: Mode_<'_>,
    same_owner: bool,
    (max_entries, max_bytes): (Option<u64>, Option<u64>),
    link_lowers: Option<(OverlayXattr, Vec<Arc<OwnedFd>>)>,
) -> Result<ApplyReport> {
    let root = open_root(dest).map_err(|e| Error::io("open", dest, e))?;
    let mut ap = Applier {
        root,
        mode,
        same_owner,
        max_entries,
        max_bytes,
        entries: 0,
        bytes: 0,
        written: PathLog::default(),
        opaque: PathLog::default(),
        dir_times: TimeLog::default(),
        cache: None,
        link_cache: None,
        new_owner: None,
        staged: false,
        skipped: Skipped::default(),
        buf: vec![0u8; 128 * 1024],
        lower_view: None,
        link_lowers,
    };
    if let Some((ns, lowers)) = &ap.link_lowers {
        let empty = reopen_dir(ap.root.as_fd(), OsStr::new("."))
            .and_then(|d| crate::fs::read_dir_sorted(d.as_fd()))
            .map(|ents| ents.is_empty())
            .map_err(|e| Error::io("read directory", dest, e))?;
        if empty {
            ap.lower_view = Some(
                copyup::LowerView::new(lowers, *ns)
                    .map_err(|e| Error::io("open the lower layers of", dest, e))?,
            );
        }
    }
    // One large buffer in front of the stream: headers, padding and small files come out of
    // memory instead of one read(2) each.
    let mut tar = TarReader::new(io::BufReader::with_capacity(INPUT_BUFFER, reader));
    while let Some(entry) = tar.next_entry()? {
        ap.entry(&mut tar, entry)?;
    }
    ap.finish()?;
    // Drain zero padding and anything else after the end-of-archive marker, so that a reader
    // digesting the stream sees all of it; but only so much: an endless stream (`/dev/zero`)
    // after the marker must not keep the apply, and the layer's lock, forever.
    let trailing = io::copy(
        &mut tar.into_inner().take(MAX_TRAILING + 1),
        &mut io::sink(),
    )
    .map_err(|e| malformed(None, &e))?;
    if trailing > MAX_TRAILING {
        return Err(Error::Malformed {
            entry: None,
            reason: format!(
                "expected the stream to end within {MAX_TRAILING} bytes after the end-of-archive marker, found more"
            ),
        });
    }
    Ok(ApplyReport {
        bytes: ap.bytes,
        skipped: std::mem::take(&mut ap.skipped.list),
        skipped_count: ap.skipped.count,
    })
}

/// An [`Error::Malformed`] from a tar-reading failure.
fn malformed(entry: Option<String>, e: &io::Error) -> Error {
    Error::Malformed {
        entry,
        reason: e.to_string(),
    }
}

/// Metadata of one entry, gathered before it is written.
struct Meta {
    /// Permission bits including setuid/setgid/sticky.
    mode: u32,
    /// Numeric owner.
    uid: u32,
    /// Numeric group.
    gid: u32,
    /// Modification time.
    mtime: Timespec,
    /// Extended attributes from `SCHILY.xattr.*` records.
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    /// The owner to set: `None` (leave it) for id 4294967295, which `chown(2)` reads as "no
    /// change" and which GNU tar passes on as such (Python's `testtar.tar` has one).
    fn owner(&self) -> Option<rustix::fs::Uid> {
        (self.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(self.uid))
    }

    /// The group to set, as [`Meta::owner`].
    fn group(&self) -> Option<rustix::fs::Gid> {
        (self.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(self.gid))
    }
}

/// State of one apply run.
struct Applier<'a> {
    /// `O_PATH` fd of the target directory.
    root: OwnedFd,
    /// Layer or plain extraction.
    mode: Mode_<'a>,
    /// Whether to chown entries.
    same_owner: bool,
    /// Entry limit.
    max_entries: Option<u64>,
    /// Byte limit.
    max_bytes: Option<u64>,
    /// Entries seen so far.
    entries: u64,
    /// Regular-file bytes written so far.
    bytes: u64,
    /// Paths this layer wrote (their ancestors count as written too), for opaque directories;
    /// kept with OCI whiteouts only, the one form that prunes. Bounded memory (`spill.rs`).
    written: PathLog,
    /// Directories marked opaque (OCI form, processed at the end).
    opaque: PathLog,
    /// Directory mtimes to set at the end, in the order the directories came.
    dir_times: TimeLog,
    /// The parent directory used last.
    cache: Option<Cursor>,
    /// The directory of the hardlink target used last (a second cursor: links and their
    /// targets usually sit in two different directories).
    link_cache: Option<Cursor>,
    /// What the kernel gave the first file this run created in the cached parent directory
    /// (observed with `fstat`), `None` until observed. Owner and masked permission bits depend
    /// only on our credentials and umask, the directory's owner, group, setgid bit and default
    /// ACL, and the mount, so a later file created there gets the same: when the entry wants
    /// exactly that owner, `fchown` is skipped, and when it was created with its final
    /// permission bits and none of them can have been masked, `fchmod` is skipped. Reset when
    /// the cached parent changes and whenever a directory's metadata is (re)set.
    new_owner: Option<NewFile>,
    /// Whether `.wh..wh.plnk` entries were staged.
    staged: bool,
    /// Entries not written (device nodes without the privilege to create them).
    skipped: Skipped,
    /// Copy buffer.
    buf: Vec<u8>,
    /// Lowers for hardlink copy-up, with their xattr namespace ([`ApplyOptions::link_lowers`]).
    link_lowers: Option<(OverlayXattr, Vec<Arc<OwnedFd>>)>,
    /// The lowers followed along the stream, for whiteout decisions in an upper that started
    /// empty (see [`copyup::LowerView`]); `None` otherwise.
    lower_view: Option<copyup::LowerView>,
}

/// Whether the directory open as `parent` carries the opaque marker of `ns`.
fn dir_is_opaque(parent: BorrowedFd<'_>, ns: OverlayXattr) -> io::Result<bool> {
    let dir = reopen_dir(parent, OsStr::new("."))?;
    let mut buf = [0u8; 8];
    match rustix::fs::fgetxattr(&dir, ns.opaque_name(), &mut buf) {
        Ok(n) => Ok(buf.get(..n) == Some(b"y".as_slice())),
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => Ok(false),
        Err(rustix::io::Errno::RANGE) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Removes the overlay whiteouts (char devices 0/0) directly in the directory open as `dir`.
fn remove_whiteouts_in(dir: BorrowedFd<'_>) -> io::Result<()> {
    for entry in crate::fs::read_dir_sorted(dir)? {
        if !matches!(
            entry.file_type,
            FileType::CharacterDevice | FileType::Unknown
        ) {
            continue;
        }
        let st = rustix::fs::statat(dir, &entry.name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0 {
            rustix::fs::unlinkat(dir, &entry.name, AtFlags::empty())?;
        }
    }
    Ok(())
}

/// Normalises a tar entry name to a path relative to the target; `Err` says why not.
fn normalize(raw: &[u8]) -> std::result::Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("expected a name without NUL bytes, found one".into());
    }
    let mut out = PathBuf::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if !out.pop() {
                    return Err("name climbs out of the target with `..`".into());
                }
            }
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// Splits a normalised path into parent and last component (`None` for the root itself).
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent()?, rel.file_name()?))
}

/// Whether `p` is at or below one of `roots` (paths relative to the target).
fn under_any(p: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| p.starts_with(strip_root(r)))
}

/// `r` without its leading `/`.
fn strip_root(r: &Path) -> &Path {
    r.strip_prefix("/").unwrap_or(r)
}

impl Applier<'_> {
    /// Writes one entry whose data `tar` yields.
    fn entry<R: Read>(&mut self, tar: &mut TarReader<R>, entry: Entry) -> Result<()> {
        let raw = &entry.name;
        let name = entry.display_name();
        self.entries += 1;
        if let Some(limit) = self.max_entries
            && self.entries > limit
        {
            return Err(Error::LimitExceeded {
                what: "max_entries".into(),
                limit,
            });
        }
        let kind = entry.kind;
        let rel = normalize(raw).map_err(|r| Error::bad_entry(&name, r))?;
        let meta = self.meta(&entry, &name)?;

        let mut whiteouts = None;
        match self.mode {
            Mode_::Plain(opts) => {
                let included = opts.include.is_empty()
                    || under_any(&rel, &opts.include)
                    || (kind.is_dir()
                        && opts.include.iter().any(|i| strip_root(i).starts_with(&rel)));
                if !included || under_any(&rel, &opts.exclude) {
                    return Ok(());
                }
            }
            Mode_::Layer(format) => whiteouts = Some(format),
        }
        // Device numbers were read (and checked) with the header; (0, 0) for other types.
        let dev = entry.device;
        if let (Some(format), Some((parent, base))) = (whiteouts, split(&rel)) {
            let in_plnk = rel.starts_with(WHITEOUT_LINK_DIR);
            if kind == EntryType::Char && dev == (0, 0) && format == WhiteoutFormat::Oci && !in_plnk
            {
                // The overlay form of a whiteout: one treatment whatever the view (see
                // `apply_layer`), so it deletes `base` exactly like `.wh.<base>`.
                self.delete(&name, parent, base)?;
                return Ok(());
            }
            let base_b = base.as_bytes();
            if in_plnk {
                self.staged = true;
            } else if base_b.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                self.whiteout(format, &name, parent, base_b)?;
                return Ok(());
            }
        }

        self.mark_written(&rel)?;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.regular(tar, &entry, &name, &rel, &meta)?;
            }
            EntryType::Directory => self.directory(&name, &rel, &meta)?,
            EntryType::Symlink => {
                let target = entry
                    .link
                    .as_deref()
                    .ok_or_else(|| Error::bad_entry(&name, "symlink without a target"))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(Error::bad_entry(
                        &name,
                        "expected a non-empty symlink target without NUL bytes",
                    ));
                }
                self.node(&name, &rel, &meta, Node::Symlink(target))?;
            }
            EntryType::Link => {
                let target = entry
                    .link
                    .as_deref()
                    .ok_or_else(|| Error::bad_entry(&name, "hardlink without a target"))?;
                self.hardlink(&name, &rel, target)?;
            }
            EntryType::Char | EntryType::Block => {
                let dev = rustix::fs::makedev(dev.0, dev.1);
                let ft = if kind == EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                self.node(&name, &rel, &meta, Node::Dev(ft, dev))?;
            }
            EntryType::Fifo => self.node(&name, &rel, &meta, Node::Dev(FileType::Fifo, 0))?,
            other => {
                return Err(Error::bad_entry(
                    &name,
                    format!(
                        "expected a file, directory, link, device or fifo, found tar entry type {:?}",
                        other.as_byte() as char
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks and converts the metadata the reader gathered for an entry.
    fn meta(&self, entry: &Entry, name: &str) -> Result<Meta> {
        let (uid, gid) = (entry.uid, entry.gid);
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(Error::bad_entry(
                name,
                format!("expected a 32-bit uid and gid, found {uid}:{gid}"),
            ));
        };
        let mut xattrs = Vec::with_capacity(entry.xattrs.len());
        for (x, value) in &entry.xattrs {
            if x.is_empty()
                || x.starts_with(OverlayXattr::Trusted.prefix().as_bytes())
                || x.starts_with(OverlayXattr::User.prefix().as_bytes())
            {
                continue;
            }
            let cname = CString::new(x.as_slice())
                .map_err(|_| Error::bad_entry(name, "expected an xattr name without NUL bytes"))?;
            xattrs.push((cname, value.clone()));
        }
        Ok(Meta {
            mode: entry.mode,
            uid,
            gid,
            mtime: entry.mtime,
            xattrs,
        })
    }

    /// Records `rel` (and so its ancestors) as written by this layer, for opaque directories:
    /// only with OCI whiteouts, the one form in which they are pruned.
    fn mark_written(&mut self, rel: &Path) -> Result<()> {
        if matches!(self.mode, Mode_::Layer(WhiteoutFormat::Oci)) {
            self.written
                .insert(self.root.as_fd(), rel)
                .map_err(|e| Error::io("record written path", rel, e))?;
        }
        Ok(())
    }

    /// Opens (creating if missing) the parent directory `parent`, reusing the cached fd.
    fn parent_fd(&mut self, name: &str, parent: &Path) -> Result<BorrowedFd<'_>> {
        let hit = matches!(&self.cache, Some(c) if c.is_at(parent));
        if !hit {
            let prev = self.cache.take();
            let cursor = Cursor::open(self.root.as_fd(), prev, parent, true).map_err(|e| {
                Error::io(
                    format!("open parent directory of entry {name:?}"),
                    parent,
                    e,
                )
            })?;
            self.cache = Some(cursor);
            self.new_owner = None;
        }
        match &self.cache {
            Some(c) => Ok(c.fd()),
            None => Err(Error::bad_entry(name, "internal: parent cache empty")),
        }
    }

    /// Handles a `.wh.`-prefixed entry named `base` in `parent`.
    fn whiteout(
        &mut self,
        format: WhiteoutFormat,
        name: &str,
        parent: &Path,
        base: &[u8],
    ) -> Result<()> {
        if base == WHITEOUT_OPAQUE.as_bytes() {
            self.mark_written(parent)?;
            match format {
                WhiteoutFormat::Oci => {
                    self.opaque
                        .insert(self.root.as_fd(), parent)
                        .map_err(|e| Error::io("record opaque directory", parent, e))?;
                }
                WhiteoutFormat::Overlay(ns) => {
                    let pfd = self.parent_fd(name, parent)?;
                    let dir = reopen_dir(pfd, OsStr::new("."))
                        .map_err(|e| Error::io("open opaque directory", parent, e))?;
                    rustix::fs::fsetxattr(&dir, ns.opaque_name(), b"y", XattrFlags::empty())
                        .map_err(|e| Error::io("setxattr opaque", parent, e.into()))?;
                    if let Some(view) = &mut self.lower_view {
                        view.mark_opaque(parent)
                            .map_err(|e| Error::io("record opaque directory", parent, e))?;
                    }
                    // An opaque directory hides every lower: whiteouts in it hide nothing, and
                    // overlayfs lists the entries of such a directory as they are, so a
                    // whiteout there would show as a name that cannot be opened.
                    remove_whiteouts_in(dir.as_fd()).map_err(|e| {
                        Error::io("remove whiteouts in opaque directory", parent, e)
                    })?;
                }
            }
            return Ok(());
        }
        if base.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
            // Other AUFS meta entries (.wh..wh.aufs and the like) carry nothing for us.
            return Ok(());
        }
        let victim = &base[WHITEOUT_PREFIX.len()..];
        if victim.is_empty() || victim == b"." || victim == b".." || victim.contains(&b'/') {
            return Err(Error::bad_entry(
                name,
                "expected a whiteout naming a file, found an empty, `.` or `..` name",
            ));
        }
        let victim = OsStr::from_bytes(victim);
        let rel = parent.join(victim);
        match format {
            WhiteoutFormat::Oci => self.delete(name, parent, victim)?,
            WhiteoutFormat::Overlay(ns) if !self.needs_whiteout(name, parent, &rel, ns)? => {
                // Nothing below to hide: only delete what this layer has there.
                self.delete(name, parent, victim)?
            }
            WhiteoutFormat::Overlay(_) => {
                self.mark_written(&rel)?;
                let meta = Meta {
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime: Timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    },
                    xattrs: Vec::new(),
                };
                self.node(name, &rel, &meta, Node::Whiteout)?;
            }
        }
        Ok(())
    }

    /// Whether an overlay whiteout for `rel` hides anything: with lowers given
    /// ([`ApplyOptions::link_lowers`]) whether one of them shows it through the upper;
    /// without, unless the parent directory is opaque.
    fn needs_whiteout(
        &mut self,
        name: &str,
        parent: &Path,
        rel: &Path,
        ns: OverlayXattr,
    ) -> Result<bool> {
        if let Some(view) = &mut self.lower_view {
            return view
                .visible(rel)
                .map_err(|e| Error::io("look up in the lower layers", rel, e));
        }
        if let Some((_, lowers)) = &self.link_lowers {
            return copyup::visible_in_lowers(self.root.as_fd(), lowers, ns, rel)
                .map_err(|e| Error::io("look up in the lower layers", rel, e));
        }
        let opaque = dir_is_opaque(self.parent_fd(name, parent)?, ns)
            .map_err(|e| Error::io("read opaque marker of", parent, e))?;
        Ok(!opaque)
    }

    /// Deletes `victim` in `parent` (and everything below it) for the whiteout entry `name`.
    fn delete(&mut self, name: &str, parent: &Path, victim: &OsStr) -> Result<()> {
        let prev = self.cache.take();
        self.new_owner = None;
        // The removal may take the directories the link cursor stands in.
        self.link_cache = None;
        let Ok(cursor) = Cursor::open(self.root.as_fd(), prev, parent, false) else {
            // The parent does not exist (or is no directory): nothing to delete.
            return Ok(());
        };
        remove_tree_at(cursor.fd(), victim).map_err(|e| {
            Error::io(
                format!("remove whiteout target of {name:?}"),
                parent.join(victim),
                e,
            )
        })?;
        // `parent` itself is still there: keep standing in it.
        self.cache = Some(cursor);
        Ok(())
    }

    /// Removes whatever is at `base` in `pfd` unless `keep_dir` and it is a directory.
    /// Returns whether a directory was kept.
    fn clear(&mut self, name: &str, rel: &Path, base: &OsStr, keep_dir: bool) -> Result<bool> {
        let pfd = self.parent_fd(name, rel.parent().unwrap_or(Path::new("")))?;
        let st = match rustix::fs::statat(pfd, base, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(Error::io("lstat", rel, e.into())),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        if keep_dir && ft == FileType::Directory {
            return Ok(true);
        }
        if ft == FileType::Directory {
            remove_tree_at(pfd, base).map_err(|e| Error::io("remove", rel, e))?;
        } else {
            match rustix::fs::unlinkat(pfd, base, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(Error::io("unlink", rel, e.into())),
            }
        }
        if matches!(ft, FileType::Directory | FileType::Symlink) {
            self.cache = None;
            self.link_cache = None;
        }
        Ok(false)
    }

    /// Writes a regular file, streaming its content.
    fn regular<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        entry: &Entry,
        name: &str,
        rel: &Path,
        meta: &Meta,
    ) -> Result<()> {
        let Some((parent, base)) = split(rel) else {
            return Err(Error::bad_entry(
                name,
                "expected a directory at the root, found a file",
            ));
        };
        let size = entry.sparse.as_ref().map_or(entry.size, |s| s.real_size);
        if let Some(limit) = self.max_bytes
            && self.bytes.saturating_add(size) > limit
        {
            return Err(Error::LimitExceeded {
                what: "max_bytes".into(),
                limit,
            });
        }
        // Files whose mode has no group/other write and no setuid/setgid/sticky bit (which a
        // chown would clear) are created with their final permission bits: nobody else can
        // write them while they are filled, and the fchmod can often be skipped. Others start
        // as 0600 and get their mode after the chown.
        let direct = meta.mode & !0o755 == 0;
        let create_mode = Mode::from_raw_mode(if direct { meta.mode } else { 0o600 });
        // Most names do not exist yet: create first, clear and retry only when taken.
        let create = |pfd: BorrowedFd<'_>| {
            rustix::fs::openat(
                pfd,
                base,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                create_mode,
            )
        };
        let fd = match create(self.parent_fd(name, parent)?) {
            Err(rustix::io::Errno::EXIST) => {
                self.clear(name, rel, base, false)?;
                create(self.parent_fd(name, parent)?)
            }
            other => other,
        }
        .map_err(|e| Error::io("create", rel, e.into()))?;
        let file = File::from(fd);
        match &entry.sparse {
            None => self.copy_at(tar, &file, 0, entry.size, name, rel)?,
            Some(sparse) => {
                file.set_len(sparse.real_size)
                    .map_err(|e| Error::io("truncate", rel, e))?;
                for &(offset, len) in &sparse.map {
                    self.copy_at(tar, &file, offset, len, name, rel)?;
                }
            }
        }
        self.bytes += size;
        // A new file gets what its directory gives new files: chown only when that owner is not
        // the entry's, chmod only when some wanted bit may have been masked.
        let probe = self.new_file(file.as_fd(), create_mode.bits());
        let chown = self.same_owner && probe.is_none_or(|p| (p.uid, p.gid) != (meta.uid, meta.gid));
        let chmod = !direct || probe.is_none_or(|p| meta.mode & !p.kept != 0);
        self.set_owner_mode_fd(file.as_fd(), rel, meta, chown, chmod)?;
        self.set_xattrs_fd(file.as_fd(), rel, meta)?;
        let ts = Timestamps {
            last_access: meta.mtime,
            last_modification: meta.mtime,
        };
        rustix::fs::futimens(&file, &ts).map_err(|e| Error::io("futimens", rel, e.into()))?;
        Ok(())
    }

    /// Copies the next `len` data bytes of the entry to `file` at `offset`.
    fn copy_at<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        file: &File,
        offset: u64,
        len: u64,
        name: &str,
        rel: &Path,
    ) -> Result<()> {
        let mut copied: u64 = 0;
        while copied < len {
            let want = usize::try_from(len - copied)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match tar.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(malformed(Some(name.to_owned()), &e)),
            };
            file.write_all_at(&self.buf[..n], offset + copied)
                .map_err(|e| Error::io("write", rel, e))?;
            copied += n as u64;
        }
        if copied != len {
            return Err(Error::Malformed {
                entry: Some(name.to_owned()),
                reason: format!("truncated content: expected {len} bytes, found {copied}"),
            });
        }
        Ok(())
    }

    /// Creates or updates a directory; its mtime is set at the end.
    fn directory(&mut self, name: &str, rel: &Path, meta: &Meta) -> Result<()> {
        let dir = match split(rel) {
            None => reopen_dir(self.root.as_fd(), OsStr::new("."))
                .map_err(|e| Error::io("open", "/", e))?,
            Some((parent, base)) => {
                // Most names do not exist yet: mkdir first, look at what is there only when
                // the name is taken (an existing directory is kept).
                let mkdir = |pfd: BorrowedFd<'_>| {
                    rustix::fs::mkdirat(pfd, base, Mode::from_raw_mode(0o700))
                };
                match mkdir(self.parent_fd(name, parent)?) {
                    Err(rustix::io::Errno::EXIST) => {
                        if !self.clear(name, rel, base, true)? {
                            mkdir(self.parent_fd(name, parent)?)
                                .map_err(|e| Error::io("mkdir", rel, e.into()))?;
                        }
                    }
                    other => other.map_err(|e| Error::io("mkdir", rel, e.into()))?,
                }
                let pfd = self.parent_fd(name, parent)?;
                reopen_dir(pfd, base).map_err(|e| Error::io("open", rel, e))?
            }
        };
        // This may change what owner new files in the cached parent get.
        self.new_owner = None;
        self.set_owner_mode_fd(dir.as_fd(), rel, meta, self.same_owner, true)?;
        self.set_xattrs_fd(dir.as_fd(), rel, meta)?;
        if !rel.starts_with(WHITEOUT_LINK_DIR) {
            self.dir_times
                .push(self.root.as_fd(), rel, meta.mtime)
                .map_err(|e| Error::io("record directory time", rel, e))?;
        }
        Ok(())
    }

    /// Creates a symlink, device, fifo or overlay whiteout at `rel`.
    fn node(&mut self, name: &str, rel: &Path, meta: &Meta, node: Node<'_>) -> Result<()> {
        let Some((parent, base)) = split(rel) else {
            return Err(Error::bad_entry(
                name,
                "expected a directory at the root, found another type",
            ));
        };
        let same_owner = self.same_owner;
        let mode = Mode::from_raw_mode(meta.mode);
        let make = |pfd: BorrowedFd<'_>| match node {
            Node::Symlink(target) => rustix::fs::symlinkat(OsStr::from_bytes(target), pfd, base),
            Node::Dev(ft, dev) => rustix::fs::mknodat(pfd, base, ft, mode, dev),
            Node::Whiteout => {
                rustix::fs::mknodat(pfd, base, FileType::CharacterDevice, Mode::empty(), 0)
            }
        };
        // Most names do not exist yet: create first, clear and retry only when taken.
        let made = match make(self.parent_fd(name, parent)?) {
            Err(rustix::io::Errno::EXIST) => {
                self.clear(name, rel, base, false)?;
                make(self.parent_fd(name, parent)?)
            }
            other => other,
        };
        if let (Err(rustix::io::Errno::PERM), Node::Dev(ft, dev)) = (made, node)
            && matches!(ft, FileType::CharacterDevice | FileType::BlockDevice)
        {
            // No privilege to create device nodes (a normal user, a user namespace): skip
            // the node and report it, as moby does, instead of failing the layer.
            let kind = if ft == FileType::CharacterDevice {
                "char"
            } else {
                "block"
            };
            let reason = format!(
                "{kind} device {}/{} not created: mknod: {} (device nodes need CAP_MKNOD in the initial user namespace)",
                rustix::fs::major(dev),
                rustix::fs::minor(dev),
                io::Error::from(rustix::io::Errno::PERM),
            );
            self.skipped.push(rel.to_path_buf(), reason);
            return Ok(());
        }
        made.map_err(|e| Error::io("create", rel, e.into()))?;
        let pfd = self.parent_fd(name, parent)?;
        if matches!(node, Node::Whiteout) {
            return Ok(());
        }
        if same_owner {
            rustix::fs::chownat(
                pfd,
                base,
                meta.owner(),
                meta.group(),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::io("lchown", rel, e.into()))?;
        }
        if !matches!(node, Node::Symlink(_)) {
            // A device or fifo we just created in a directory nothing else writes to: chmodat
            // (which follows symlinks) reaches exactly it.
            rustix::fs::chmodat(pfd, base, mode, AtFlags::empty())
                .map_err(|e| Error::io("chmod", rel, e.into()))?;
        }
        for (xname, value) in &meta.xattrs {
            lsetxattr_at(pfd, base, xname, value)
                .map_err(|e| Error::io(format!("lsetxattr {}", xname.to_string_lossy()), rel, e))?;
        }
        let ts = Timestamps {
            last_access: meta.mtime,
            last_modification: meta.mtime,
        };
        rustix::fs::utimensat(pfd, base, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io("lutimes", rel, e.into()))?;
        Ok(())
    }

    /// Creates a hardlink at `rel` to the entry named `target` (resolved beneath the target).
    fn hardlink(&mut self, name: &str, rel: &Path, target: &[u8]) -> Result<()> {
        let target_rel = normalize(target)
            .map_err(|r| Error::bad_entry(name, format!("hardlink target: {r}")))?;
        let Some(((tparent, tbase), (_, base))) = split(&target_rel).zip(split(rel)) else {
            return Err(Error::bad_entry(
                name,
                "expected a hardlink between two files, found the root",
            ));
        };
        let open_target = |root: BorrowedFd<'_>, prev: Option<Cursor>| {
            Cursor::open(root, prev, tparent, false).map_err(|e| {
                Error::io(
                    format!("open hardlink target directory of {name:?}"),
                    tparent,
                    e,
                )
            })
        };
        let stat_target = |tc: &Cursor| {
            rustix::fs::statat(tc.fd(), tbase, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
                Error::io(
                    format!("hardlink target of {name:?}"),
                    &target_rel,
                    e.into(),
                )
            })
        };
        let resolved = match self.link_cache.take() {
            Some(c) if c.is_at(tparent) => Ok(c),
            prev => open_target(self.root.as_fd(), prev),
        }
        .and_then(|tc| stat_target(&tc).map(|st| (tc, st)));
        let (tc, tst) = match resolved {
            Ok(found) => found,
            // Not in the upper: a file of a lower layer is copied up first, as overlayfs does
            // before a link(2) to one. Only now, so links within the layer cost no lookups.
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && self.link_lowers.is_some() =>
            {
                if let Some((ns, lowers)) = &self.link_lowers {
                    copyup::copy_up(self.root.as_fd(), lowers, *ns, &target_rel, self.same_owner)
                        .map_err(|e| {
                        Error::io(
                            format!("copy up the hardlink target of {name:?} from a lower layer"),
                            &target_rel,
                            e,
                        )
                    })?;
                }
                let tc = open_target(self.root.as_fd(), None)?;
                let st = stat_target(&tc)?;
                (tc, st)
            }
            Err(e) => return Err(e),
        };
        self.link_cache = Some(tc);
        if FileType::from_raw_mode(tst.st_mode) == FileType::Directory {
            return Err(Error::bad_entry(
                name,
                "expected a hardlink to a file, found a directory",
            ));
        }
        {
            let pfd = self.parent_fd(name, rel.parent().unwrap_or(Path::new("")))?;
            if let Ok(st) = rustix::fs::statat(pfd, base, AtFlags::SYMLINK_NOFOLLOW)
                && st.st_dev == tst.st_dev
                && st.st_ino == tst.st_ino
            {
                return Ok(());
            }
        }
        // `clear` drops the cursors when it removes a directory or symlink (which may have been
        // on the way to the target): then the target directory is resolved again.
        self.clear(name, rel, base, false)?;
        if self.link_cache.is_none() {
            self.link_cache = Some(open_target(self.root.as_fd(), None)?);
        }
        self.parent_fd(name, rel.parent().unwrap_or(Path::new("")))?;
        let (Some(pc), Some(tc)) = (&self.cache, &self.link_cache) else {
            return Err(Error::bad_entry(name, "internal: directory cursors empty"));
        };
        rustix::fs::linkat(tc.fd(), tbase, pc.fd(), base, AtFlags::empty())
            .map_err(|e| Error::io("link", rel, e.into()))?;
        Ok(())
    }

    /// What a file created in the cached parent directory gets, observed once per directory
    /// (see the `new_owner` field) on `fd`, a file just created (`O_EXCL`) with `created`
    /// permission bits and not chowned or chmodded yet.
    fn new_file(&mut self, fd: BorrowedFd<'_>, created: u32) -> Option<NewFile> {
        if self.new_owner.is_none() {
            self.new_owner = rustix::fs::fstat(fd).ok().map(|st| NewFile {
                uid: st.st_uid,
                gid: st.st_gid,
                kept: created & st.st_mode & 0o777,
            });
        }
        self.new_owner
    }

    /// chown (when `chown`) then chmod (when `chmod`) through an fd.
    fn set_owner_mode_fd(
        &self,
        fd: BorrowedFd<'_>,
        rel: &Path,
        meta: &Meta,
        chown: bool,
        chmod: bool,
    ) -> Result<()> {
        if chown {
            rustix::fs::fchown(fd, meta.owner(), meta.group())
                .map_err(|e| Error::io("chown", rel, e.into()))?;
        }
        if chmod {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
                .map_err(|e| Error::io("chmod", rel, e.into()))?;
        }
        Ok(())
    }

    /// Sets the entry's xattrs through an fd.
    fn set_xattrs_fd(&self, fd: BorrowedFd<'_>, rel: &Path, meta: &Meta) -> Result<()> {
        for (name, value) in &meta.xattrs {
            rustix::fs::fsetxattr(fd, name.as_c_str(), value, XattrFlags::empty()).map_err(
                |e| {
                    Error::io(
                        format!("setxattr {}", name.to_string_lossy()),
                        rel,
                        e.into(),
                    )
                },
            )?;
        }
        Ok(())
    }

    /// End of stream: opaque directories, staging removal, then directory mtimes.
    ///
    /// Setting a directory's times does not change its parent's, so the times are set in the
    /// order the directories were written (a repeated entry's last metadata wins), moving one
    /// cursor from directory to directory: no full-path calls and no fd per level.
    fn finish(&mut self) -> Result<()> {
        self.cache = None;
        self.link_cache = None;
        self.prune_opaque()?;
        if self.staged {
            remove_tree_at(self.root.as_fd(), OsStr::new(WHITEOUT_LINK_DIR))
                .map_err(|e| Error::io("remove", WHITEOUT_LINK_DIR, e))?;
        }
        let times = std::mem::take(&mut self.dir_times);
        let mut cursor: Option<Cursor> = None;
        let root = self.root.as_fd();
        times.for_each(
            |rel, mtime| {
                let ts = Timestamps {
                    last_access: mtime,
                    last_modification: mtime,
                };
                let (parent, base) = split(rel).unwrap_or((Path::new(""), OsStr::new(".")));
                let pfd = match cursor.take() {
                    Some(c) if c.is_at(parent) => c,
                    // Stale or missing parents (removed by a later entry) are skipped.
                    prev => match Cursor::open(root, prev, parent, false) {
                        Ok(c) => c,
                        Err(_) => return Ok(()),
                    },
                };
                match rustix::fs::utimensat(pfd.fd(), base, &ts, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(Error::io("set directory mtime", rel, e.into())),
                }
                cursor = Some(pfd);
                Ok(())
            },
            |e| Error::io("read directory times", "/", e),
        )
    }

    /// Prunes every opaque directory (see [`Applier::prune`]), outer ones first.
    ///
    /// The opaque directories and the written paths are both read as sorted streams. The walk
    /// of an opaque directory asks about paths in increasing order, so one pass over the
    /// written paths serves all the opaque directories that are not below one another. An
    /// opaque directory below another one that the walk entered (a directory this layer wrote)
    /// is done by that walk; one it did not enter (reached through a symlink, say) is left for
    /// another pass with a fresh stream, as are the ones below those, and so on.
    fn prune_opaque(&mut self) -> Result<()> {
        let mut todo = std::mem::take(&mut self.opaque);
        if todo.is_empty() {
            return Ok(());
        }
        let spill_err = |e| Error::io("read recorded paths", "/", e);
        self.written.prepare().map_err(spill_err)?;
        let root = self.root.as_fd();
        loop {
            todo.prepare().map_err(spill_err)?;
            let mut later = PathLog::default();
            {
                let mut ops = todo.iter().map_err(spill_err)?;
                let mut written = self.written.iter().map_err(spill_err)?;
                while let Some(dir) = ops.head().map(<[u8]>::to_vec) {
                    ops.advance().map_err(spill_err)?;
                    let mut entered = |key: &[u8]| -> io::Result<()> {
                        // Opaque directories before `key` are below `dir` (see the loop
                        // after the walk) and were not entered: another pass.
                        while let Some(o) = ops.head() {
                            if o < key {
                                later.insert_key(root, o)?;
                            } else if o != key {
                                break;
                            }
                            // The walk entered this one: it prunes it as `prune` would.
                            ops.advance()?;
                        }
                        Ok(())
                    };
                    self.prune(&dir, &mut written, &mut entered)?;
                    while let Some(o) = ops.head()
                        && spill::at_or_under(&dir, o)
                    {
                        later.insert_key(root, o).map_err(spill_err)?;
                        ops.advance().map_err(spill_err)?;
                    }
                }
            }
            if later.is_empty() {
                return Ok(());
            }
            todo = later;
        }
    }

    /// Removes from the opaque directory whose key is `dir`, and from the directories this
    /// layer wrote below it, everything this layer did not write (`written`, which is asked in
    /// increasing order). Depth first with each directory's names in byte order, the order of
    /// `written`; one stack of the names left per level, one cursor, whatever the depth.
    /// `entered` is told every directory the walk goes into.
    fn prune(
        &self,
        dir: &[u8],
        written: &mut spill::Merged<'_>,
        entered: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<()> {
        /// The names of one directory still to look at, largest first.
        struct Level {
            names: Vec<std::ffi::OsString>,
            /// Length of the directory's path (and key).
            len: usize,
        }
        let root = self.root.as_fd();
        let mut cursor: Option<Cursor> = None;
        // Opens and lists the directory `path` (`None` when it cannot be opened: gone, or no
        // directory).
        let list = |cursor: &mut Option<Cursor>, path: &[u8]| -> Result<Option<Level>> {
            let rel = Path::new(OsStr::from_bytes(path));
            let Ok(c) = Cursor::open(root, cursor.take(), rel, false) else {
                return Ok(None);
            };
            let rd = reopen_dir(c.fd(), OsStr::new(".")).map_err(|e| Error::io("open", rel, e))?;
            let mut names = list_dir(rd.as_fd()).map_err(|e| Error::io("readdir", rel, e))?;
            *cursor = Some(c);
            names.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
            Ok(Some(Level {
                names,
                len: path.len(),
            }))
        };
        let spill_err = |e| Error::io("read recorded paths", "/", e);
        let mut path = spill::path_of(dir);
        let mut key = dir.to_vec();
        let mut stack: Vec<Level> = list(&mut cursor, &path)?.into_iter().collect();
        while let Some(level) = stack.last_mut() {
            path.truncate(level.len);
            key.truncate(level.len);
            let Some(name) = level.names.pop() else {
                stack.pop();
                continue;
            };
            let parent_len = level.len;
            let parent = Path::new(OsStr::from_bytes(&path[..parent_len]));
            if !cursor.as_ref().is_some_and(|c| c.is_at(parent)) {
                match Cursor::open(root, cursor.take(), parent, false) {
                    Ok(c) => cursor = Some(c),
                    Err(_) => {
                        stack.pop();
                        continue;
                    }
                }
            }
            let Some(c) = cursor.as_ref() else {
                return Err(Error::io(
                    "prune",
                    parent,
                    io::Error::other("internal: no cursor"),
                ));
            };
            if parent_len > 0 {
                path.push(b'/');
                key.push(0);
            }
            path.extend_from_slice(name.as_bytes());
            key.extend_from_slice(name.as_bytes());
            let child = Path::new(OsStr::from_bytes(&path));
            if written.covers(&key).map_err(spill_err)? {
                let is_dir = rustix::fs::statat(c.fd(), &name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                    .unwrap_or(false);
                if is_dir {
                    entered(&key).map_err(spill_err)?;
                    if let Some(level) = list(&mut cursor, &path)? {
                        stack.push(level);
                    }
                }
            } else {
                remove_tree_at(c.fd(), &name).map_err(|e| Error::io("remove", child, e))?;
            }
        }
        Ok(())
    }
}

/// What the kernel gives a new file in a directory (see `Applier::new_owner`).
#[derive(Clone, Copy)]
struct NewFile {
    /// Its owner.
    uid: u32,
    /// Its group.
    gid: u32,
    /// Permission bits known to survive creation there (not masked by umask or default ACL).
    kept: u32,
}

/// What [`Applier::node`] creates.
#[derive(Clone, Copy)]
enum Node<'t> {
    /// A symlink to these bytes.
    Symlink(&'t [u8]),
    /// A device or fifo of this type and number.
    Dev(FileType, rustix::fs::Dev),
    /// An overlay whiteout (char 0/0, mode 0, no metadata).
    Whiteout,
}

/// Opens the directory `name` in `parent` for reading and metadata changes, never following a
/// symlink.
fn reopen_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Sets an xattr on `name` in `dir` without following it (it may be a symlink or device).
///
/// `setxattrat(2)` (Linux 6.13+) with `AT_SYMLINK_NOFOLLOW`; on older kernels `lsetxattr` on the
/// one component, reached without `/proc` in the confined child (see
/// [`crate::fs::declare_single_threaded`]).
fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    xname: &CString,
    value: &[u8],
) -> io::Result<()> {
    let cname =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    crate::fs::set_xattr_at(dir, &cname, xname, value)
}

/// The most bytes read after a tar's end-of-archive marker: far more than any record padding
/// (GNU tar pads to 10 KiB; some writers pad to megabytes), far less than forever. A stream with
/// more is refused rather than read without end.
pub const MAX_TRAILING: u64 = 64 << 20;

/// Removes `name` in `parent` with everything below it ([`crate::fs::remove_tree_at`]: never
/// following a link, any depth, bounded descriptors); a missing `name` is fine here (a
/// whiteout of something the lower layers never had).
fn remove_tree_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    match crate::fs::remove_tree_at(parent, &name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory entry repeated any number of times (a 136 KB zstd layer once took 997 MB
    /// this way) keeps one record, with the last metadata, in its first place in the order.
    #[test]
    fn repeated_directories_keep_one_time_record_each() {
        let d = tempfile::tempdir().unwrap();
        let root = open_root(d.path()).unwrap();
        let root = root.as_fd();
        let mut t = TimeLog::default();
        let ts = |s| Timespec {
            tv_sec: s,
            tv_nsec: 0,
        };
        for i in 0..200_000 {
            t.push(root, Path::new("a"), ts(i)).unwrap();
            t.push(root, Path::new("a/b"), ts(-i)).unwrap();
        }
        t.push(root, Path::new("c"), ts(7)).unwrap();
        assert_eq!(t.in_memory(), 3);
        assert!(!t.spilled());
        let mut got = Vec::new();
        t.for_each(
            |p, m| {
                got.push((p.to_path_buf(), m.tv_sec));
                Ok::<(), io::Error>(())
            },
            |e| e,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                (PathBuf::from("a"), 199_999),
                (PathBuf::from("a/b"), -199_999),
                (PathBuf::from("c"), 7)
            ]
        );
    }

    #[test]
    fn normalize_strips_and_refuses() {
        assert_eq!(normalize(b"/a/./b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(normalize(b"a/../b").unwrap(), PathBuf::from("b"));
        assert!(normalize(b"../x").is_err());
        assert!(normalize(b"a/../../x").is_err());
        assert_eq!(normalize(b"./").unwrap(), PathBuf::new());
    }

    /// New files in a setgid directory get its group from the kernel; the fchown skip must not
    /// mistake that for the owner the entry wants, and must skip correctly when it is. Modes
    /// come out exact whether the fchmod was skipped or not (setuid after chown included).
    #[test]
    fn owners_exact_in_setgid_directory() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() && std::env::var("CI").as_deref() != Ok("true") {
            println!("skipped: needs root to chown");
            return;
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, gid: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(gid);
            h.set_size(if kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            b.append_data(&mut h, path, data).unwrap();
        };
        add("d", tar::EntryType::Directory, 0o2775, 4321);
        add("d/f", tar::EntryType::Regular, 0o644, 0);
        add("d/g", tar::EntryType::Regular, 0o755, 4321);
        add("d/h", tar::EntryType::Regular, 0o640, 0);
        add("e", tar::EntryType::Regular, 0o666, 0);
        add("i", tar::EntryType::Regular, 0o4755, 4321);
        add("j", tar::EntryType::Regular, 0o444, 0);
        let data = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        apply_layer(d.path(), &data[..], &ApplyOptions::default()).unwrap();
        let gid = |p: &str| std::fs::symlink_metadata(d.path().join(p)).unwrap().gid();
        assert_eq!(gid("d"), 4321);
        assert_eq!(gid("d/f"), 0);
        assert_eq!(gid("d/g"), 4321);
        assert_eq!(gid("d/h"), 0);
        assert_eq!(gid("e"), 0);
        assert_eq!(gid("i"), 4321);
        assert_eq!(gid("j"), 0);
        let mode = |p: &str| std::fs::symlink_metadata(d.path().join(p)).unwrap().mode() & 0o7777;
        let want = [
            ("d", 0o2775),
            ("d/f", 0o644),
            ("d/g", 0o755),
            ("d/h", 0o640),
            ("e", 0o666),
            ("i", 0o4755),
            ("j", 0o444),
        ];
        for (p, m) in want {
            assert_eq!(mode(p), m, "{p}");
        }
    }

    #[test]
    fn manual_walk_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("in/sub")).unwrap();
        std::os::unix::fs::symlink("/in", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        let rfd = open_root(&root).unwrap();
        let fd = resolve::open_dir_beneath_manual(rfd.as_fd(), Path::new("abs/sub")).unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        let want = std::fs::metadata(root.join("in/sub")).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
        let fd = resolve::open_dir_beneath_manual(rfd.as_fd(), Path::new("up/in")).unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        let want = std::fs::metadata(root.join("in")).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
    }
}
