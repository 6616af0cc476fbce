//! Process limits set at start-up.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-file limits before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileChange {
    /// The soft limit found at start-up (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now in force (`None`: unlimited).
    pub after: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as the Go runtime does at start-up for
/// moby and podman: the common soft limit of 1,024 is a relic of `select(2)`, which graphctl does
/// not use, and deep trees or big stores need more descriptors.
///
/// An unlimited hard limit is capped at `/proc/sys/fs/nr_open`, the most the kernel accepts.
/// Failing to raise the limit is not an error (the command may well fit in the old one); the
/// returned [`NofileChange`] says what is in force.
pub fn raise_nofile_limit() -> NofileChange {
    let old = getrlimit(Resource::Nofile);
    let target = match old.maximum {
        Some(max) => Some(max),
        None => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok()),
    };
    if let Some(target) = target.filter(|t| old.current.is_some_and(|cur| cur < *t)) {
        let new = Rlimit {
            current: Some(target),
            maximum: old.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            tracing::debug!(error = %e, target, "could not raise the open-file limit");
        }
    }
    let now = getrlimit(Resource::Nofile);
    NofileChange {
        before: old.current,
        after: now.current,
        hard: now.maximum,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The soft limit at 1,024 (and the hard one above it, as root if need be), as on most hosts.
    fn lower_soft_limit() -> Option<u64> {
        let cur = getrlimit(Resource::Nofile);
        let hard = match cur.maximum {
            Some(h) if h <= 1024 => {
                // Only root may raise a hard limit; elsewhere nothing can be shown.
                setrlimit(
                    Resource::Nofile,
                    Rlimit {
                        current: Some(1024),
                        maximum: Some(4096),
                    },
                )
                .ok()?;
                Some(4096)
            }
            h => h,
        };
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(1024),
                maximum: hard,
            },
        )
        .unwrap();
        hard
    }

    #[test]
    fn soft_limit_is_raised_to_the_hard_limit() {
        let Some(hard) = lower_soft_limit() else {
            eprintln!("skipping: the hard open-file limit is 1024 and cannot be raised here");
            return;
        };
        let change = raise_nofile_limit();
        assert_eq!(change.before, Some(1024));
        assert_eq!(change.after, Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        // Descriptors beyond the old soft limit can be opened now.
        let files: Vec<_> = (0..1100)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        assert_eq!(files.len(), 1100);
        // Idempotent.
        assert_eq!(raise_nofile_limit().after, Some(hard));
    }
}
