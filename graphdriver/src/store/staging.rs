//! Entries of `<home>/.staging/`, modelled once.
//!
//! ```text
//! <home>/.staging/new-<id>-<pid>-<n>   layer <id> being built by process <pid> (its n-th entry)
//! <home>/.staging/rm-<id>-<pid>-<n>    layer <id> removed by process <pid>, being deleted
//! ```
//!
//! Every entry is a directory its owner keeps flocked while it works on it. **The flock is the
//! only truth about liveness**: the pid in the name is for people reading the directory, never
//! consulted (a pid can be reused, and a process can be alive while the work it started has been
//! abandoned). [`claim`] answers "is anyone working on this entry", and every check that cares
//! (`begin_apply`, `remove`, children, recovery) asks it, through
//! `LayerStore::children_being_built` for the question "is a live child of
//! this layer being built".

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::FileLock;
use crate::LayerId;

/// What a staging entry is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A layer being built (`new-`); it becomes `<home>/<id>` by rename.
    New,
    /// A removed layer being deleted (`rm-`).
    Rm,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::New => "new-",
            Kind::Rm => "rm-",
        }
    }
}

/// The name of one `.staging/` entry: `<kind>-<id>-<pid>-<sequence>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StagingName {
    /// What the entry is for.
    pub kind: Kind,
    /// The layer it is (or was) for.
    pub id: LayerId,
    /// The process that made it (informative only; see the module docs).
    pub pid: u32,
    /// Distinguishes the entries of one process.
    pub sequence: u64,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl StagingName {
    /// A fresh name for this process's next entry of `kind` for `id`.
    pub fn fresh(kind: Kind, id: &LayerId) -> StagingName {
        StagingName {
            kind,
            id: id.clone(),
            pid: std::process::id(),
            sequence: SEQUENCE.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Parses an entry name; `None` for anything the store would not have made (unknown kind,
    /// invalid layer id, a pid or sequence that is not a canonical decimal number).
    pub fn parse(name: &str) -> Option<StagingName> {
        let (kind, rest) = if let Some(rest) = name.strip_prefix(Kind::New.prefix()) {
            (Kind::New, rest)
        } else {
            (Kind::Rm, name.strip_prefix(Kind::Rm.prefix())?)
        };
        // Layer ids may contain `-`: the last two fields are the numbers.
        let mut fields = rest.rsplitn(3, '-');
        let sequence = fields.next()?.parse().ok()?;
        let pid = fields.next()?.parse().ok()?;
        let id = LayerId::new(fields.next()?).ok()?;
        let parsed = StagingName {
            kind,
            id,
            pid,
            sequence,
        };
        // `+1`, `01`: not what we write.
        (parsed.to_string() == name).then_some(parsed)
    }
}

impl fmt::Display for StagingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}-{}-{}",
            self.kind.prefix(),
            self.id.as_str(),
            self.pid,
            self.sequence
        )
    }
}

/// Takes the flock of the staging entry `dir` if nobody works on it any more: `None` means its
/// owner is alive (it holds the flock), `Some` means it was abandoned, and the caller now holds
/// it (so it can be deleted without racing anyone).
pub(super) fn claim(dir: OwnedFd) -> Option<FileLock> {
    FileLock::try_exclusive(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (kind, id) in [
            (Kind::New, "a"),
            (Kind::Rm, "sha256-ab-cd"),
            (Kind::New, "x.y_z"),
        ] {
            let n = StagingName::fresh(kind, &LayerId::new(id).unwrap_or_else(|e| panic!("{e}")));
            assert_eq!(StagingName::parse(&n.to_string()), Some(n.clone()));
        }
        let n = StagingName::parse("new-a-b-c-12-3");
        assert_eq!(
            n.map(|n| (n.kind, n.id.as_str().to_string(), n.pid, n.sequence)),
            Some((Kind::New, "a-b-c".to_string(), 12, 3))
        );
    }

    #[test]
    fn names_the_store_never_makes_do_not_parse() {
        for bad in [
            "",
            "new-",
            "new-x",
            "new-x-1",
            "new--1-2",
            "new-.x-1-2",
            "new-x-+1-2",
            "new-x-01-2",
            "new-x-1-02",
            "new-x-1-2 ",
            "new-x-99999999999-2",
            "old-x-1-2",
            "rm-x--2",
            "NEW-x-1-2",
            "new-x/y-1-2",
        ] {
            assert_eq!(StagingName::parse(bad), None, "{bad:?}");
        }
    }
}
