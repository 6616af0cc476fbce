//! The conformance suite for the in-tree drivers: one line each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use drivers as _;

mod vfs {
    fn vfs_init(home: &std::path::Path) -> graphdriver::Result<Box<dyn graphdriver::Driver>> {
        (graphdriver::lookup("vfs")?.init)(home, &graphdriver::DriverOptions::default())
    }

    graphdriver_conformance::conformance_tests!(vfs_init, needs_root = false, deep_layers = 64);
}

mod overlay {
    graphdriver_conformance::conformance_tests!(
        driver = "overlay",
        needs_root = true,
        deep_layers = 128,
        copy_up_breaks_hardlinks = true,
        lower_dir_rename_exdev = true,
    );
}

mod overlay2 {
    graphdriver_conformance::conformance_tests!(
        driver = "overlay2",
        needs_root = true,
        deep_layers = 500,
        copy_up_breaks_hardlinks = true,
        lower_dir_rename_exdev = true,
    );
}

/// The suite has teeth: vfs with one deliberate defect each must fail it.
mod suite_finds_defects {
    use std::io::Read;
    use std::path::{Path, PathBuf};

    use graphdriver::{
        Change, ChangeKind, DiffDriver, Driver, LayerId, LayerInfo, MountOpts, ProtoDriver, Result,
    };
    use graphdriver_conformance::{self as conformance, Capabilities};

    /// vfs with defect `K`: 0 = `changes` drops deletions, 1 = `diff_size` is one byte too
    /// large, 2 = `remove` ignores children.
    struct Broken<const K: u8>(Box<dyn Driver>);

    impl<const K: u8> ProtoDriver for Broken<K> {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn home(&self) -> &Path {
            self.0.home()
        }
        fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
            self.0.create(id, parent)
        }
        fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
            self.0.create_read_write(id, parent)
        }
        fn remove(&self, id: &LayerId) -> Result<()> {
            if K == 2 {
                for child in self
                    .0
                    .list()?
                    .into_iter()
                    .filter(|l| l.parent.as_ref() == Some(id))
                {
                    self.remove(&child.id)?;
                }
            }
            self.0.remove(id)
        }
        fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
            self.0.get(id, opts)
        }
        fn put(&self, id: &LayerId) -> Result<()> {
            self.0.put(id)
        }
        fn exists(&self, id: &LayerId) -> bool {
            self.0.exists(id)
        }
        fn status(&self) -> Vec<(String, String)> {
            self.0.status()
        }
        fn cleanup(&self) -> Result<()> {
            self.0.cleanup()
        }
        fn list(&self) -> Result<Vec<LayerInfo>> {
            self.0.list()
        }
    }

    impl<const K: u8> DiffDriver for Broken<K> {
        fn diff<'a>(
            &'a self,
            id: &LayerId,
            parent: Option<&LayerId>,
        ) -> Result<Box<dyn Read + Send + 'a>> {
            self.0.diff(id, parent)
        }
        fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>> {
            let mut c = self.0.changes(id, parent)?;
            if K == 0 {
                c.retain(|c| c.kind != ChangeKind::Delete);
            }
            Ok(c)
        }
        fn apply_diff(
            &self,
            id: &LayerId,
            parent: Option<&LayerId>,
            diff: &mut dyn Read,
        ) -> Result<u64> {
            self.0.apply_diff(id, parent, diff)
        }
        fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64> {
            Ok(self.0.diff_size(id, parent)? + u64::from(K == 1))
        }
    }

    fn broken<const K: u8>(home: &Path) -> Result<Box<dyn Driver>> {
        let vfs = (graphdriver::lookup("vfs")?.init)(home, &graphdriver::DriverOptions::default())?;
        Ok(Box::new(Broken::<K>(vfs)))
    }

    fn caps() -> Capabilities {
        let mut caps = Capabilities::default();
        caps.model_cases = 256;
        caps
    }

    fn expect_model_failure(factory: conformance::Factory, what: &str) {
        let err =
            conformance::model(factory, &caps()).expect_err("the model must catch the defect");
        println!("{err}");
        assert!(err.contains("minimal failing sequence"), "{err}");
        assert!(err.contains(what), "expected {what:?} in:\n{err}");
    }

    #[test]
    fn model_catches_changes_without_deletions() {
        expect_model_failure(broken::<0>, "changes l");
    }

    #[test]
    fn model_catches_wrong_diff_size() {
        expect_model_failure(broken::<1>, "diff_size");
    }

    #[test]
    fn model_and_scenario_catch_remove_of_parents() {
        expect_model_failure(broken::<2>, "expected HasChildren");
        let err =
            conformance::remove_with_children_fails(broken::<2>, &caps()).expect_err("must fail");
        assert!(err.contains("expected HasChildren"), "{err}");
        let err = conformance::changes_21(broken::<0>, &caps()).expect_err("must fail");
        assert!(err.contains("expected 21"), "{err}");
    }
}
