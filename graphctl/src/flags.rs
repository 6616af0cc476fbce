//! Command-line flags: what the user typed ([`Cli`], clap-derived, validated but not
//! interpreted) and the one place where they are merged with the environment and the config
//! file into a [`graphdriver::Config`] ([`Cli::config`]).
//!
//! Precedence: flags, then the environment (`GRAPHDRIVER`, `GRAPHDRIVER_OPTS`,
//! `GRAPHCTL_CONFIG`), then the config file, then the defaults.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use graphdriver::{Config, LayerId};

/// graphctl: manage a graph driver layer store (create, apply, diff, mount, import images).
#[derive(Parser, Debug)]
#[command(name = "graphctl", version, about, max_term_width = 100)]
pub struct Cli {
    /// The config file (default: $GRAPHCTL_CONFIG, /etc/graphctl/storage.toml for root,
    /// ~/.config/graphctl/storage.toml otherwise).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The storage root; each driver's home is ROOT/NAME (the driver's name).
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The driver to use (default: the one already holding layers, else overlay, then vfs).
    #[arg(long, global = true, value_name = "NAME")]
    pub driver: Option<String>,
    /// A driver option, `key=value` or `driver.key=value`; may be repeated. Give it before the
    /// command (after it, `diff -o` names the output file).
    #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
    pub opts: Vec<String>,
    /// Machine-readable output: one JSON object on stdout (schema `graphctl/schema/v1.json`,
    /// versioned by its `schema_version` key), and errors as a JSON object on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit statuses of `exists`, listed under its `--help`.
const EXISTS_EXIT_STATUS: &str = "Exit status:
  0    the layer exists
  1    the layer does not exist
  125  an error (the store cannot be read, the id is invalid, ...), described on stderr";

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every registered driver and whether it works here (or why not).
    Drivers,
    /// Show the selected driver, its home and its status.
    Status,
    /// Create an image layer (or a read-write layer with --rw).
    Create {
        /// The parent layer.
        #[arg(long)]
        parent: Option<String>,
        /// Create a read-write (container) layer.
        #[arg(long)]
        rw: bool,
        /// The new layer's id.
        id: String,
    },
    /// Apply a layer tar (plain, gzip or zstd) to a layer, creating it on PARENT if needed;
    /// prints the bytes applied.
    Apply {
        /// The parent of the layer when it is created (default: its recorded parent).
        #[arg(long)]
        parent: Option<String>,
        /// The layer.
        id: String,
        /// The tar file; `-` or nothing reads stdin.
        file: Option<PathBuf>,
    },
    /// Write a layer's changes as a tar (relative to its parent by default); with --compress,
    /// a compressed layer blob, and its digest and DiffID.
    Diff {
        /// Compare against this layer instead of the recorded parent.
        #[arg(long)]
        parent: Option<String>,
        /// The layer.
        id: String,
        /// Where and how to write the tar.
        #[command(flatten)]
        out: BlobOutput,
    },
    /// Write a layer's whole tree (its parents' files included, as a container sees it) as one
    /// tar, with no whiteouts: a flattened image or a root filesystem.
    Export {
        /// The layer.
        id: String,
        /// Where and how to write the tar.
        #[command(flatten)]
        out: BlobOutput,
    },
    /// Make an image layer NEW from the read-write layer RW: NEW gets RW's parent and RW's
    /// changes (its diff, applied), and records its DiffID, which is printed. RW is left as it
    /// is; stop writing to it while the commit runs.
    Commit {
        /// The read-write layer.
        rw: String,
        /// The id of the new image layer.
        new: String,
    },
    /// List a layer's changes, one "A|C|D /path" line each, sorted; a path holding control
    /// characters or bytes that are not UTF-8 is printed Go-quoted ("/a\nb").
    Changes {
        /// Compare against this layer instead of the recorded parent.
        #[arg(long)]
        parent: Option<String>,
        /// The layer.
        id: String,
    },
    /// Print the bytes a layer changes relative to its parent.
    DiffSize {
        /// Compare against this layer instead of the recorded parent.
        #[arg(long)]
        parent: Option<String>,
        /// The layer.
        id: String,
    },
    /// Mount a layer and print its path; it stays mounted after graphctl exits, until a matching
    /// `unmount` (reference counted, also across processes). A committed layer (an image layer,
    /// or any layer with children) is mounted as a read-only view: writes there fail with
    /// "Read-only file system". A read-write layer without children is mounted writable.
    ///
    /// With no layer, lists the mounted layers as "ID PATH" lines (as `podman mount`).
    Mount {
        /// Demand a writable mount: refused for a committed layer (create a read-write layer
        /// on top of it with `create --rw --parent ID NEW` and mount that).
        #[arg(long, requires = "id")]
        rw: bool,
        /// The layer; none lists the mounts.
        id: Option<String>,
    },
    /// Release one mount of a layer; the last release unmounts it. An id that names no layer
    /// is an error.
    Unmount {
        /// Release every mount of every layer of the store (as `cleanup`) and print their ids.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// The layer.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
    },
    /// Remove a layer (refused while it is mounted or has children).
    Rm {
        /// The layer.
        id: String,
    },
    /// List the layers as "ID PARENT" lines ("-" for no parent); with `--json`, each layer's
    /// parent, kind, DiffID, creation time and mount count.
    Ls,
    /// Show one layer: parent, kind (image or read-write), DiffID, creation time, size of its
    /// diff against its parent, the disk space and inodes its own storage uses, and mount count.
    Info {
        /// The layer.
        id: String,
    },
    /// Show the disk space and inodes each layer's own storage uses (as `ctr snapshots usage`):
    /// what removing the layer would free. Files shared between layers (hardlinks) count in
    /// every layer that holds them.
    Usage {
        /// Only this layer (default: every layer, and the total).
        id: Option<String>,
    },
    /// Show the layer graph as a tree with sizes.
    Tree,
    /// Tell whether a layer exists, by the exit status alone (as `podman image exists`):
    /// 0 if it exists, 1 if it does not, 125 if that cannot be told (the store cannot be read,
    /// an invalid id, a bad config), with the error on stderr.
    #[command(after_help = EXISTS_EXIT_STATUS)]
    Exists {
        /// The layer.
        id: String,
    },
    /// Import an OCI image layout (directory or tar) or a `docker save` archive; prints the
    /// top layer's id.
    Import {
        /// The image: a directory or a tar file, optionally `:NAME` to pick one image by its
        /// `org.opencontainers.image.ref.name` or docker `RepoTags` (split at the first `:` whose
        /// left part exists, unless the whole argument exists).
        path: PathBuf,
    },
    /// Unmount everything this store has mounted.
    Cleanup,
    /// Print a shell completion script, e.g. `graphctl completions bash >
    /// /etc/bash_completion.d/graphctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (graphctl.1 and one per subcommand) into DIR; `cargo xtask man` runs
    /// this.
    #[command(hide = true)]
    Man {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

/// The output flags of `diff` and `export`.
#[derive(clap::Args, Debug)]
pub struct BlobOutput {
    /// Write to FILE instead of stdout: a new file (mode 0600, removed if the command fails)
    /// or an existing regular file (truncated, never removed); anything else is refused. The
    /// file is not fsynced: run `sync FILE` if it must survive a power cut.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Compress the tar (gzip or zstd, or none) and print the blob's digest and the DiffID
    /// (the digest of the uncompressed tar), on stdout with -o, else on stderr.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub compress: Option<CompressFormat>,
}

/// The compression formats `diff --compress` and `export --compress` write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressFormat {
    /// A plain tar (the digest and DiffID are the same).
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// Zstandard (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

impl CompressFormat {
    /// The archive crate's name for this format.
    pub fn compression(self) -> archive::Compression {
        match self {
            CompressFormat::None => archive::Compression::None,
            CompressFormat::Gzip => archive::Compression::Gzip,
            CompressFormat::Zstd => archive::Compression::Zstd,
        }
    }

    /// The OCI media type of a layer blob in this format.
    pub fn media_type(self) -> &'static str {
        match self {
            CompressFormat::None => "application/vnd.oci.image.layer.v1.tar",
            CompressFormat::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            CompressFormat::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

impl Command {
    /// The command's name as typed (`diff-size`), for JSON output.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Drivers => "drivers",
            Command::Status => "status",
            Command::Create { .. } => "create",
            Command::Apply { .. } => "apply",
            Command::Diff { .. } => "diff",
            Command::Export { .. } => "export",
            Command::Commit { .. } => "commit",
            Command::Changes { .. } => "changes",
            Command::DiffSize { .. } => "diff-size",
            Command::Mount { .. } => "mount",
            Command::Unmount { .. } => "unmount",
            Command::Rm { .. } => "rm",
            Command::Ls => "ls",
            Command::Info { .. } => "info",
            Command::Usage { .. } => "usage",
            Command::Tree => "tree",
            Command::Exists { .. } => "exists",
            Command::Import { .. } => "import",
            Command::Cleanup => "cleanup",
            Command::Completions { .. } => "completions",
            Command::Man { .. } => "man",
        }
    }

    /// The exit status of an error: 125 for `exists` (whose 1 means "no such layer"), else 1.
    pub fn error_status(&self) -> u8 {
        match self {
            Command::Exists { .. } => 125,
            _ => 1,
        }
    }
}

impl Cli {
    /// Builds the driver configuration: the file, then the environment, then these flags.
    pub fn config(&self) -> Result<Config> {
        let mut config = crate::config::load(self.config.as_deref())?;
        crate::config::apply_env(&mut config)?;
        if let Some(root) = &self.root {
            config.root = std::path::absolute(root)?;
        }
        if let Some(driver) = &self.driver {
            config.driver = Some(driver.clone());
        }
        for item in &self.opts {
            config.add_option(item, "command line")?;
        }
        Ok(config)
    }
}

/// Validates a layer id given on the command line (an error here is exit status 1, not a usage
/// error: the id is data, like a missing layer).
pub fn layer_id(s: &str) -> Result<LayerId> {
    Ok(LayerId::new(s)?)
}

/// Validates an optional layer id.
pub fn opt_layer_id(s: Option<&str>) -> Result<Option<LayerId>> {
    s.map(layer_id).transpose()
}
