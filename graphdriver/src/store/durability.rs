//! What a store flushes to disk, and so what a power cut can cost: the `sync` option.

use std::fmt;

/// How much a [`LayerStore`](super::LayerStore) flushes to disk (the drivers' `sync` option).
///
/// Whatever the mode, the store's own small records (mount counts, DiffIDs) are written to a
/// new file, fsynced and renamed into place, and a layer is published by one rename or unlink
/// after its content is complete, so a *kill* never leaves a partial layer. The modes differ in
/// what survives a *power cut* (or a kernel crash) shortly after a command:
///
/// | mode | a power cut may lose | a listed layer after the reboot |
/// |------|----------------------|---------------------------------|
/// | [`None`](Durability::None) | anything not yet written back by the kernel (seconds) | may hold empty or short files |
/// | [`Layers`](Durability::Layers) (default) | the layers made in the last seconds, whole | is complete |
/// | [`Full`](Durability::Full) | nothing a command reported as done | is complete |
///
/// Read-write (container) layers hold what a container writes, which nobody flushes; under
/// `Layers` their creation is not flushed either. An apply into one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Durability {
    /// `sync = "none"` (or `false`): nothing is flushed. For stores that do not outlive a boot
    /// (tmpfs, CI scratch space) or sit on a filesystem that orders data before metadata.
    None,
    /// `sync = "layers"`, the default: the filesystem is flushed (`syncfs`) after a layer's
    /// content is written and before the step that makes it visible, so a listed layer is never
    /// partial after a power cut; the step itself is not flushed, so the newest layers may be
    /// absent after the reboot (a re-run of the command makes them again). One `syncfs` per
    /// image layer or apply (it also writes back other dirty data of the same filesystem).
    #[default]
    Layers,
    /// `sync = "full"` (or `true`): as `Layers`, and the directories holding the published layer
    /// are fsynced before the command returns, so a layer reported as made survives a power cut.
    Full,
}

impl Durability {
    /// Parses the value of the `sync` option: `none`/`false`/`off`/`0`/`no`, `layers`,
    /// `full`/`true`/`on`/`1`/`yes` (case-insensitive). `None` (the Rust value) for anything
    /// else.
    pub fn parse(value: &str) -> Option<Durability> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" | "false" | "off" | "0" | "no" => Some(Durability::None),
            "layers" => Some(Durability::Layers),
            "full" | "true" | "on" | "1" | "yes" => Some(Durability::Full),
            _ => None,
        }
    }

    /// True if layer content is flushed before the layer becomes visible. `read_write`: the
    /// layer being published is a read-write layer being created (its content is a container's).
    pub(super) fn flush_before_publish(self, read_write: bool) -> bool {
        match self {
            Durability::None => false,
            Durability::Layers => !read_write,
            Durability::Full => true,
        }
    }

    /// True if the publishing step itself is flushed before the command returns.
    pub(super) fn flush_after_publish(self) -> bool {
        self == Durability::Full
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::None => "none",
            Durability::Layers => "layers",
            Durability::Full => "full",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Durability;

    #[test]
    fn parses_names_and_booleans() {
        for (text, want) in [
            ("none", Durability::None),
            ("false", Durability::None),
            ("Off", Durability::None),
            ("layers", Durability::Layers),
            ("full", Durability::Full),
            ("TRUE", Durability::Full),
            ("1", Durability::Full),
        ] {
            assert_eq!(Durability::parse(text), Some(want), "{text}");
        }
        assert_eq!(Durability::parse("sometimes"), None);
        assert_eq!(Durability::default(), Durability::Layers);
        assert_eq!(Durability::Full.to_string(), "full");
    }

    #[test]
    fn read_write_creates_are_flushed_only_in_full_mode() {
        assert!(!Durability::Layers.flush_before_publish(true));
        assert!(Durability::Layers.flush_before_publish(false));
        assert!(Durability::Full.flush_before_publish(true));
        assert!(!Durability::None.flush_before_publish(false));
        assert!(!Durability::Layers.flush_after_publish());
    }
}
