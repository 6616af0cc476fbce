//! A minimal driver for registry and selection tests: layers are plain directories kept by
//! `LayerStore`; diffs are out of scope here and answer an error.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use graphdriver::{
    Change, DiffDriver, Driver, DriverOptions, Durability, Error, LayerId, LayerInfo, LayerStore,
    MountOpts, ProtoDriver, Result,
};

pub struct DirDriver {
    name: &'static str,
    store: LayerStore,
}

impl DirDriver {
    pub fn init(name: &'static str, home: &Path, opts: &DriverOptions) -> Result<Box<dyn Driver>> {
        opts.reject_unknown(name, &["flavour"])?;
        let (store, _) = LayerStore::open(home, Durability::None)?;
        Ok(Box::new(DirDriver { name, store }))
    }
}

fn unsupported(what: &str) -> Error {
    Error::NotSupported {
        driver: "test".into(),
        reason: format!("{what} is not part of this test driver"),
    }
}

impl ProtoDriver for DirDriver {
    fn name(&self) -> &str {
        self.name
    }
    fn home(&self) -> &Path {
        self.store.home()
    }
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.store.create(id, parent, false, |_| Ok(()))
    }
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.store.create(id, parent, true, |_| Ok(()))
    }
    fn remove(&self, id: &LayerId) -> Result<()> {
        self.store.remove(id, |_| Ok(()))
    }
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        self.store
            .acquire_ref(id, opts.holder(), || Ok(true), || Ok(()))?;
        Ok(self.store.layer_dir(id))
    }
    fn put(&self, id: &LayerId) -> Result<()> {
        self.store.release_ref(id, || Ok(())).map(|_| ())
    }
    fn exists(&self, id: &LayerId) -> bool {
        self.store.exists(id)
    }
    fn status(&self) -> Vec<(String, String)> {
        vec![]
    }
    fn cleanup(&self) -> Result<()> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<LayerInfo>> {
        self.store.list()
    }
}

impl DiffDriver for DirDriver {
    fn diff<'a>(&'a self, _: &LayerId, _: Option<&LayerId>) -> Result<Box<dyn Read + Send + 'a>> {
        Err(unsupported("diff"))
    }
    fn changes(&self, _: &LayerId, _: Option<&LayerId>) -> Result<Vec<Change>> {
        Err(unsupported("changes"))
    }
    fn apply_diff(&self, _: &LayerId, _: Option<&LayerId>, _: &mut dyn Read) -> Result<u64> {
        Err(unsupported("apply_diff"))
    }
    fn diff_size(&self, _: &LayerId, _: Option<&LayerId>) -> Result<u64> {
        Err(unsupported("diff_size"))
    }
}
