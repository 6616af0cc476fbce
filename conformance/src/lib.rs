//! The conformance suite every graph driver runs: scenario checks and a model-based property
//! test.
//!
//! # One line for a driver author
//!
//! ```ignore
//! // tests/conformance.rs of a driver crate (dev-dependency: graphdriver-conformance)
//! fn init(home: &std::path::Path) -> graphdriver::Result<Box<dyn graphdriver::Driver>> {
//!     mydriver::MyDriver::new(home)
//! }
//! graphdriver_conformance::conformance_tests!(init, needs_root = false, deep_layers = 64);
//! // or, for a registered driver: graphdriver_conformance::conformance_tests!(driver = "mydriver");
//! ```
//!
//! expands to one named `#[test]` per check below. Each test builds a fresh driver in a fresh
//! temporary home (under `$GRAPHDRIVER_CONFORMANCE_TMPDIR`, else the system temporary directory;
//! it must not be overlayfs) and calls the function of the same name in this module, so all the
//! logic is library code and the macro stays thin. Keys after the factory set the fields of
//! [`Capabilities`].
//!
//! # What "equal" means
//!
//! Every check compares the driver's mounted view of a layer with a *reference tree*: a plain
//! directory that received the same operations (containerd's approach). The comparison is
//! [`archive::compare`] with every option on — type, mode (setuid/setgid/sticky included),
//! uid/gid, size, content, symlink target, device number, hardlink groups, extended attributes
//! and mtimes of files *and* directories — which is stricter than containerd's suite (it skips
//! xattrs and mtimes). The one exception is the **root directory's mtime**: applying a layer tar
//! stamps the root with the current time (the root is never an entry of a layer tar), so for
//! the root only mode, owner and xattrs are compared. Operations set explicit mtimes on
//! everything they touch (and on the directories they change), so no comparison depends on the
//! clock. A tree *rebuilt from a diff* (`diff` applied to the parent's reference, or a
//! committed layer) is compared the same way except for directory mtimes, which are compared
//! only for the directories the change list names: the change rules (moby's) ignore a
//! directory whose only difference is its mtime, so no diff can carry it
//! ([`compare_trees_for_diff`]).
//!
//! # The checks
//!
//! Scenarios from moby's graphtest and containerd's snapshot suite: [`empty_root`],
//! [`base_fixture`], [`snapshot_inherits`], [`deep_layer_read`], [`diff_apply`],
//! [`changes_21`], [`recreate_lower_dir`], [`deleted_stay_deleted`], [`chown_lower`],
//! [`ownership_across_layers`], [`hardlink_then_delete_source`], [`renames`],
//! [`read_only_image_layers`], [`remove_with_children_fails`], [`duplicate_ids_fail`],
//! [`get_put_nesting`], [`concurrent_get_put`], [`modify_hardlinked_lower`],
//! [`diff_keeps_hardlink_to_lower`], [`read_only_views`], [`sibling_isolation`]; and the
//! property test [`model`] (see
//! [`model`](fn@model) and [`Op`]).

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use graphdriver::{Driver, LayerId, MountOpts, Result};

/// The core crate, for the macros' expansions (a driver crate's tests need not name it).
#[doc(hidden)]
pub use graphdriver as __graphdriver;

mod prop;
mod scenarios;
mod tree;

pub use prop::{FsOp, Op, model};
pub use scenarios::*;
pub use tree::{compare_trees, compare_trees_for_diff, copy_tree};

/// A driver constructor for the suite: builds a driver whose home is `home` (an existing, empty
/// directory on a regular filesystem).
pub type Factory = fn(home: &Path) -> Result<Box<dyn Driver>>;

/// What a driver promises beyond the contract; checks that depend on a promise run only when it
/// is made. Set the fields by name in [`conformance_tests!`](crate::conformance_tests).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Capabilities {
    /// The driver works only as root (it mounts). Its tests are skipped with a printed reason
    /// when not root, unless `CI=true`, where they fail instead. Default `false`.
    pub needs_root: bool,
    /// How many stacked layers [`deep_layer_read`] builds; 0 skips it. Default 32.
    pub deep_layers: usize,
    /// Writing through the path `get` returns for an image layer fails. Default `false`.
    pub read_only_image_layers: bool,
    /// Modifying one name of a hardlinked file that lives in a parent layer detaches it from
    /// its other names (overlayfs copy-up without `index=on`). The model then never modifies,
    /// renames or links a file that has several names. Default `false`.
    pub copy_up_breaks_hardlinks: bool,
    /// Renaming a directory that lives in a parent layer may fail with `EXDEV` (overlayfs
    /// without `redirect_dir`); the checks then accept `EXDEV` for such renames and require the
    /// view to be unchanged. Default `false`.
    pub lower_dir_rename_exdev: bool,
    /// `changes` reports exactly what a tree walk finds (`archive::changes` of the reference
    /// trees). When `false`, it must report every such change and may add `Modify` entries for
    /// paths that were touched but ended up equal. Default `true`.
    pub exact_changes: bool,
    /// A diff keeps a hardlink between a changed name and a name left unchanged (for example
    /// after renaming the directory holding one name of a lower file with two), so the layer
    /// rebuilt from the diff has the same hardlink groups. `archive::export_changes` (and so
    /// `naive_diff`) does; a driver whose native diff cannot sets this to `false`, and the model
    /// then does not compare hardlink groups of rebuilt trees (the mounted views are always
    /// compared in full). Default `true`.
    pub diff_keeps_links_to_unchanged: bool,
    /// Proptest cases for [`model`](fn@model) (`GRAPHDRIVER_CONFORMANCE_CASES` overrides).
    /// Default 24.
    pub model_cases: u32,
    /// The most operations in one generated case (after the first two). Default 14.
    pub model_max_ops: usize,
}

impl Default for Capabilities {
    /// No promises beyond the contract; 32 deep layers; 24 cases of at most 14 operations.
    fn default() -> Self {
        Capabilities {
            needs_root: false,
            deep_layers: 32,
            read_only_image_layers: false,
            copy_up_breaks_hardlinks: false,
            lower_dir_rename_exdev: false,
            exact_changes: true,
            diff_keeps_links_to_unchanged: true,
            model_cases: 24,
            model_max_ops: 14,
        }
    }
}

/// A check's outcome: `Err` holds a readable explanation of what differed.
pub type Outcome<T = ()> = std::result::Result<T, String>;

/// True when running as root. Otherwise prints why `test_name` is skipped and returns false —
/// unless the environment has `CI=true`, where a test that needs root must run: then it panics.
pub fn require_root(test_name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test_name}: needs root, and CI=true requires it to run; run the suite as root");
    }
    let reason = format!("{test_name} needs root (set CI=true to make this a failure)");
    eprintln!("skipping: {reason}");
    test_support::record_skip(&reason);
    false
}

/// True when the effective uid is 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Builds the registered driver `name` with no options in `home` (for the `driver = "name"`
/// form of [`conformance_tests!`](crate::conformance_tests)).
pub fn init_registered(name: &str, home: &Path) -> Result<Box<dyn Driver>> {
    let reg = graphdriver::lookup(name)?;
    (reg.init)(home, &graphdriver::DriverOptions::default())
}

/// Runs one check the way the generated tests do: skips (printing why) when the driver needs
/// root and we are not root outside CI; otherwise panics with the check's explanation if it
/// fails.
pub fn run(
    test_name: &str,
    factory: Factory,
    caps: &Capabilities,
    check: fn(Factory, &Capabilities) -> Outcome,
) {
    if caps.needs_root && !require_root(test_name) {
        return;
    }
    if let Err(msg) = check(factory, caps) {
        panic!("conformance check {test_name} failed:\n{msg}");
    }
}

/// A fresh driver in a fresh temporary home, plus a scratch directory for reference trees.
/// Dropping it releases the driver's mounts (`cleanup`) and deletes both.
pub struct Harness {
    driver: Option<Box<dyn Driver>>,
    scratch: PathBuf,
    counter: std::sync::atomic::AtomicUsize,
    tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// Creates the temporary directory, the driver home `<tmp>/home` and runs `factory`.
    pub fn new(factory: Factory) -> Outcome<Harness> {
        let base = std::env::var_os("GRAPHDRIVER_CONFORMANCE_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix("graphdriver-conformance-")
            .tempdir_in(&base)
            .map_err(|e| format!("create temporary directory in {}: {e}", base.display()))?;
        let home = tmp.path().join("home");
        let scratch = tmp.path().join("scratch");
        // The home private whatever the umask: a store refuses one group or others can write.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&home)
            .map_err(|e| format!("create {}: {e}", home.display()))?;
        fs::create_dir(&scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
        let driver =
            factory(&home).map_err(|e| format!("driver init in {}: {e}", home.display()))?;
        Ok(Harness {
            driver: Some(driver),
            scratch,
            counter: std::sync::atomic::AtomicUsize::new(0),
            tmp: Some(tmp),
        })
    }

    /// The driver under test.
    pub fn driver(&self) -> &dyn Driver {
        match &self.driver {
            Some(d) => d.as_ref(),
            None => unreachable!("the driver is only taken in drop"),
        }
    }

    /// A new, not yet existing path in the scratch directory (for reference trees).
    pub fn scratch_path(&self, what: &str) -> PathBuf {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.scratch.join(format!("{what}-{n}"))
    }

    /// A new empty directory in the scratch area with mode 0755 (the mode of a new layer root).
    pub fn scratch_dir(&self, what: &str) -> Outcome<PathBuf> {
        let p = self.scratch_path(what);
        fs::create_dir(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", p.display()))?;
        Ok(p)
    }

    /// Runs `f` on layer `id`'s mounted path, with a matching put afterwards (also on failure).
    pub fn with_mounted<T>(&self, id: &LayerId, f: impl FnOnce(&Path) -> Outcome<T>) -> Outcome<T> {
        let path = self
            .driver()
            .get(id, &MountOpts::default())
            .map_err(|e| format!("get {id}: {e}"))?;
        let out = f(&path);
        let put = self.driver().put(id).map_err(|e| format!("put {id}: {e}"));
        let out = out?;
        put?;
        Ok(out)
    }

    /// Compares layer `id`'s mounted view with the reference tree `reference`.
    pub fn expect_view(&self, id: &LayerId, reference: &Path) -> Outcome {
        self.with_mounted(id, |view| {
            compare_trees(reference, view)
                .map_err(|d| format!("layer {id} differs from the reference:\n{d}"))
        })
    }

    /// The driver's diff of `id` against `parent`, read completely.
    pub fn diff_bytes(&self, id: &LayerId, parent: Option<&LayerId>) -> Outcome<Vec<u8>> {
        let mut r = self
            .driver()
            .diff(id, parent)
            .map_err(|e| format!("diff {id}: {e}"))?;
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)
            .map_err(|e| format!("read diff of {id}: {e}"))?;
        Ok(buf)
    }

    /// Creates image layer `id` on `parent` and applies `tar` with the driver; returns the size
    /// the driver reported.
    pub fn image_layer(&self, id: &LayerId, parent: Option<&LayerId>, tar: &[u8]) -> Outcome<u64> {
        self.driver()
            .create(id, parent)
            .map_err(|e| format!("create {id}: {e}"))?;
        let mut r = tar;
        self.driver()
            .apply_diff(id, parent, &mut r)
            .map_err(|e| format!("apply_diff {id}: {e}"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take()
            && let Err(e) = d.cleanup()
        {
            eprintln!("conformance: driver cleanup failed: {e}");
        }
        if let Some(t) = self.tmp.take()
            && let Err(e) = t.close()
        {
            eprintln!("conformance: removing the temporary directory failed: {e}");
        }
    }
}

/// Parses a layer id the suite chose (always valid).
pub(crate) fn lid(s: &str) -> LayerId {
    match LayerId::new(s) {
        Ok(id) => id,
        Err(e) => unreachable!("the suite's own id {s:?} is invalid: {e}"),
    }
}

/// `(mode & 0o7777, uid, gid)` of `p`, not following symlinks.
pub(crate) fn stat3(p: &Path) -> Outcome<(u32, u32, u32)> {
    let md = fs::symlink_metadata(p).map_err(|e| format!("lstat {}: {e}", p.display()))?;
    Ok((md.mode() & 0o7777, md.uid(), md.gid()))
}

/// Expands to one named `#[test]` per conformance check for a driver.
///
/// `conformance_tests!(factory $(, capability = value)*)` where `factory` is a
/// [`conformance::Factory`](crate::Factory) (`fn(&Path) -> Result<Box<dyn Driver>>`),
/// or `conformance_tests!(driver = "name" $(, capability = value)*)` for a driver registered with
/// [`register_driver!`](graphdriver::register_driver) (the crate registering it must be linked). The
/// capability keys are the fields of [`conformance::Capabilities`](crate::Capabilities),
/// for example `needs_root = true, deep_layers = 128`. Invoke it once per module.
#[macro_export]
macro_rules! conformance_tests {
    (driver = $name:literal $(, $key:ident = $val:expr)* $(,)?) => {
        fn __conformance_registered(
            home: &::std::path::Path,
        ) -> $crate::__graphdriver::Result<::std::boxed::Box<dyn $crate::__graphdriver::Driver>> {
            $crate::init_registered($name, home)
        }
        $crate::conformance_tests!(__conformance_registered $(, $key = $val)*);
    };
    ($factory:path $(, $key:ident = $val:expr)* $(,)?) => {
        fn __conformance_capabilities() -> $crate::Capabilities {
            #[allow(unused_mut)]
            let mut caps = $crate::Capabilities::default();
            $( caps.$key = $val; )*
            caps
        }
        $crate::__conformance_test!($factory;
            empty_root, base_fixture, snapshot_inherits, deep_layer_read, diff_apply, changes_21,
            recreate_lower_dir, deleted_stay_deleted, chown_lower, ownership_across_layers,
            hardlink_then_delete_source, renames, read_only_image_layers,
            remove_with_children_fails, duplicate_ids_fail, get_put_nesting, concurrent_get_put,
            modify_hardlinked_lower, diff_keeps_hardlink_to_lower, read_only_views,
            sibling_isolation, model);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    ($factory:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::run(
                    ::core::stringify!($name),
                    $factory,
                    &__conformance_capabilities(),
                    $crate::$name,
                );
            }
        )*
    };
}
