//! One small function per subcommand: open the driver, call it, print the result.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use graphdriver::{Config, Driver, LayerId, LayerInfo, MountOpts, Selected, SelectedBy};
use serde_json::json;

use crate::flags::{Cli, Command, layer_id, opt_layer_id};
use crate::image;

/// Runs the command `cli` names; the exit code is 0 except for `exists` on a missing layer (1).
/// An error is returned as it is: the caller picks its exit status ([`Command::error_status`]).
pub fn run(cli: &Cli) -> Result<ExitCode> {
    let config = cli.config()?;
    let json = cli.json;
    match &cli.command {
        Command::Drivers => drivers(&config, json),
        Command::Status => status(&open(&config)?, json),
        Command::Create { parent, rw, id } => {
            let s = open(&config)?;
            let id = layer_id(id)?;
            let parent = opt_layer_id(parent.as_deref())?;
            if *rw {
                s.driver.create_read_write(&id, parent.as_ref())?;
            } else {
                s.driver.create(&id, parent.as_ref())?;
            }
            Ok(())
        }
        Command::Apply { parent, id, file } => {
            refuse_terminal_stdin(file.as_deref())?;
            apply(
                &open(&config)?,
                &layer_id(id)?,
                opt_layer_id(parent.as_deref())?,
                file.as_deref(),
            )
        }
        Command::Diff { parent, id, output } => {
            if output.is_none() {
                refuse_terminal_stdout()?;
            }
            diff(
                &open(&config)?,
                &layer_id(id)?,
                opt_layer_id(parent.as_deref())?,
                output.as_deref(),
            )
        }
        Command::Changes { parent, id } => changes(
            &open(&config)?,
            &layer_id(id)?,
            opt_layer_id(parent.as_deref())?,
            json,
        ),
        Command::DiffSize { parent, id } => {
            let s = open(&config)?;
            let id = layer_id(id)?;
            let parent = parent_or_recorded(&s, &id, opt_layer_id(parent.as_deref())?)?;
            let size = s.driver.diff_size(&id, parent.as_ref())?;
            println_out(format_args!("{size}"))
        }
        Command::Mount { id, rw } => mount(&open(&config)?, &layer_id(id)?, *rw, json),
        Command::Unmount { id } => unmount(&open(&config)?, &layer_id(id)?),
        Command::Rm { id } => Ok(open(&config)?.driver.remove(&layer_id(id)?)?),
        Command::Ls => ls(&open(&config)?, json),
        Command::Info { id } => info(&open(&config)?, &layer_id(id)?, json),
        Command::Tree => tree(&open(&config)?),
        Command::Exists { id } => return exists(&open(&config)?, &layer_id(id)?),
        Command::Import { path } => import(&open(&config)?, path, json),
        Command::Cleanup => Ok(open(&config)?.driver.cleanup()?),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Refuses to read a layer tar from a terminal: `apply` would wait for typed input that can
/// never be a tar. `file` is `apply`'s argument; only `-` or none reads stdin.
fn refuse_terminal_stdin(file: Option<&Path>) -> Result<()> {
    let reads_stdin = file.is_none_or(|p| p == Path::new("-"));
    if reads_stdin && io::stdin().is_terminal() {
        bail!(
            "refusing to read the layer tar from a terminal (stdin); give the tar file as an \
             argument (graphctl apply ID layer.tar) or pipe it in (graphctl apply ID < layer.tar)"
        );
    }
    Ok(())
}

/// Refuses to write a layer tar (binary) to a terminal, where it would garble the screen.
fn refuse_terminal_stdout() -> Result<()> {
    if io::stdout().is_terminal() {
        bail!(
            "refusing to write the layer tar to a terminal (stdout); name a file with -o FILE \
             (graphctl diff ID -o layer.tar) or redirect it (graphctl diff ID > layer.tar)"
        );
    }
    Ok(())
}

/// `exists`: 0 if a complete layer `id` exists, 1 if it does not; any other failure (the store
/// cannot be read, a planted entry where the layer should be) is an error, exit status 125.
fn exists(s: &Selected, id: &LayerId) -> Result<ExitCode> {
    if s.driver.exists(id) {
        return Ok(ExitCode::SUCCESS);
    }
    // `exists` cannot say why it answered no; `parent` can: `NotFound` or another error.
    match s.driver.parent(id) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(graphdriver::Error::NotFound(_)) => Ok(ExitCode::FAILURE),
        Err(e) => Err(anyhow::Error::new(e).context(format!("check whether layer {id} exists"))),
    }
}

/// `unmount`: releases one mount of an existing layer; an id that names no layer is an error
/// (`NotFound`), not a silent success.
fn unmount(s: &Selected, id: &LayerId) -> Result<()> {
    s.driver.parent(id)?;
    Ok(s.driver.put(id)?)
}

/// Opens the selected driver; notes on stderr when automatic selection fell back past a driver.
fn open(config: &Config) -> Result<Selected> {
    let selected = graphdriver::open(config)?;
    tracing::info!(driver = %selected.name, home = %selected.home.display(), "opened");
    if selected.selected_by == SelectedBy::Priority && !selected.skipped.is_empty() {
        let why: Vec<String> = selected
            .skipped
            .iter()
            .map(|(d, r)| format!("{d}: {r}"))
            .collect();
        eprintln!(
            "note: using driver {} ({}); choose one with --driver",
            selected.name,
            why.join("; ")
        );
    }
    Ok(selected)
}

/// Prints one line to stdout, reporting a write error (a closed pipe included) as an error.
fn println_out(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{args}")?;
    out.flush()?;
    Ok(())
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println_out(format_args!("{}", serde_json::to_string_pretty(value)?))
}

/// `mount`: a read-only view of a committed layer, a writable mount of a read-write layer
/// without children; `--rw` on a committed layer is refused before anything is mounted.
fn mount(s: &Selected, id: &LayerId, rw: bool, json: bool) -> Result<()> {
    let (store, _) = graphdriver::LayerStore::open(&s.home, graphdriver::Durability::default())?;
    let committed = store
        .is_committed(id)
        .with_context(|| format!("mount layer {id}"))?;
    if committed && rw {
        bail!(
            "layer {id} is committed (an image layer, or a layer with children) and is mounted \
             read-only; to write, create a read-write layer on top of it \
             (graphctl create --rw --parent {id} NEW) and mount that"
        );
    }
    // The mount outlives this process: a durable reference, released by `unmount`.
    let opts = if committed {
        MountOpts::durable().view()
    } else {
        MountOpts::durable()
    };
    let path = s.driver.get(id, &opts)?;
    if json {
        return print_json(&json!({ "path": path, "read_only": committed }));
    }
    println_out(format_args!("{}", path.display()))
}

/// The parent given, else the layer's recorded parent.
fn parent_or_recorded(
    s: &Selected,
    id: &LayerId,
    parent: Option<LayerId>,
) -> Result<Option<LayerId>> {
    match parent {
        Some(p) => Ok(Some(p)),
        None => Ok(s.driver.parent(id)?),
    }
}

/// `drivers`: tries every registered driver's init in a scratch root.
fn drivers(config: &Config, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    let regs = graphdriver::registrations()?;
    for (name, reg) in regs {
        // Probe next to the real root when it exists (same filesystem, same answer), else in
        // the system temp dir. A dot-name is never mistaken for a driver home.
        let scratch = tempfile::Builder::new()
            .prefix(".graphctl-probe-")
            .tempdir_in(&config.root)
            .or_else(|_| tempfile::Builder::new().prefix("graphctl-probe-").tempdir())
            .context("create a scratch directory to probe drivers")?;
        let home = scratch.path().join(name);
        let result = std::fs::create_dir(&home)
            .with_context(|| format!("create {}", home.display()))
            .and_then(|()| Ok((reg.init)(&home, &config.options_for(name))?));
        let reason = match result {
            Ok(driver) => {
                let _ = driver.cleanup();
                None
            }
            Err(e) => Some(match e.downcast_ref::<graphdriver::Error>() {
                Some(
                    graphdriver::Error::NotSupported { reason, .. }
                    | graphdriver::Error::PrerequisitesNotMet { reason, .. },
                ) => reason.clone(),
                _ => format!("{e:#}"),
            }),
        };
        rows.push((name, reason));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, r)| json!({"name": n, "supported": r.is_none(), "reason": r}))
            .collect();
        return print_json(&json!(v));
    }
    let mut out = io::stdout().lock();
    for (name, reason) in rows {
        match reason {
            None => writeln!(out, "{name}\tsupported")?,
            Some(r) => writeln!(out, "{name}\tnot supported: {r}")?,
        }
    }
    Ok(())
}

fn selected_by(s: &Selected) -> &'static str {
    match s.selected_by {
        SelectedBy::Name => "name",
        SelectedBy::PriorState => "prior state",
        SelectedBy::Priority => "priority",
    }
}

/// `status`: the selected driver, its home and its status pairs.
///
/// It also reports which system calls the kernel lacks and the fallback used instead. These are
/// probed here with calls that fail without effect (descriptor -1: `EBADF` where the call
/// exists, `ENOSYS` where not); the confined apply child, which starts as a copy of the
/// process, takes the same routes.
fn status(s: &Selected, json: bool) -> Result<()> {
    let pairs = s.driver.status();
    let fallbacks = chrootarchive::fallbacks();
    if json {
        let status: serde_json::Map<String, serde_json::Value> =
            pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let mut obj = serde_json::Map::new();
        obj.insert("driver".into(), json!(s.name));
        insert_path(&mut obj, "home", &s.home);
        obj.insert("selected_by".into(), json!(selected_by(s)));
        obj.insert(
            "skipped".into(),
            json!(
                s.skipped
                    .iter()
                    .map(|(d, r)| json!({"driver": d, "reason": r}))
                    .collect::<Vec<_>>()
            ),
        );
        obj.insert("status".into(), json!(status));
        obj.insert(
            "syscalls".into(),
            json!(
                fallbacks
                    .iter()
                    .map(|f| json!({
                        "call": f.call,
                        "since": f.since,
                        "available": f.available,
                        "fallback": f.instead,
                    }))
                    .collect::<Vec<_>>()
            ),
        );
        return print_json(&serde_json::Value::Object(obj));
    }
    let mut out = io::stdout().lock();
    writeln!(out, "Driver: {}", s.name)?;
    writeln!(out, "Home: {}", s.home.display())?;
    writeln!(out, "Selected by: {}", selected_by(s))?;
    for (k, v) in pairs {
        writeln!(out, "{k}: {v}")?;
    }
    for f in &fallbacks {
        if f.available {
            writeln!(out, "Syscall {}: yes", f.call)?;
        } else {
            writeln!(
                out,
                "Syscall {}: no (Linux {}+); instead: {}",
                f.call, f.since, f.instead
            )?;
        }
    }
    Ok(())
}

/// Counts bytes read, for progress bars.
struct Counting<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
pub fn progress_bar(len: Option<u64>, message: String) -> indicatif::ProgressBar {
    if !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {binary_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar
}

/// `apply`: creates `id` on `parent` if it does not exist and applies the tar in `file`.
fn apply(s: &Selected, id: &LayerId, parent: Option<LayerId>, file: Option<&Path>) -> Result<()> {
    let (input, len, name): (Box<dyn Read + Send>, Option<u64>, String) = match file {
        None => (Box::new(io::stdin()), None, "stdin".into()),
        Some(p) if p == Path::new("-") => (Box::new(io::stdin()), None, "stdin".into()),
        Some(p) => {
            let f = File::open(p).with_context(|| format!("open {}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len, p.display().to_string())
        }
    };
    let bar = progress_bar(len, format!("applying {name}"));
    let counted = Counting { inner: input, bar };
    let bar = counted.bar.clone();
    // Unknown formats fail here, before a layer is created.
    let plain = archive::decompress(counted).with_context(|| format!("read layer tar {name}"))?;
    // The DiffID (sha256 of the uncompressed tar), recorded for a layer this apply creates.
    let (mut plain, diff_id) = image::Hashing::new(plain);
    let created = if s.driver.exists(id) {
        false
    } else {
        // Hidden from other processes until the apply finishes, removed if it does not: a
        // killed apply never leaves a listed layer without its data.
        s.driver.create_pending(id, parent.as_ref())?;
        true
    };
    let parent = parent_or_recorded(s, id, parent)?;
    let result = s.driver.apply_diff(id, parent.as_ref(), &mut plain);
    bar.finish_and_clear();
    warn_skipped();
    match result {
        Ok(size) => {
            if created {
                image::record_diff_id(&s.home, id, &mut plain, &diff_id);
            }
            println_out(format_args!("{size}"))
        }
        Err(e) => {
            if created && s.driver.exists(id) {
                // The drivers promise this; make sure no half-applied layer stays.
                let _ = s.driver.remove(id);
            }
            Err(anyhow::Error::new(e).context(format!("apply {name} to layer {id}")))
        }
    }
}

/// Prints a `warning:` line for each entry the applies of this thread skipped (device nodes
/// that a normal user cannot create), names and reasons escaped.
pub(crate) fn warn_skipped() {
    let (skipped, count) = archive::take_skipped();
    for (path, why) in &skipped {
        eprintln!(
            "warning: skipped device node {path:?}: {}",
            why.escape_debug()
        );
    }
    if count > skipped.len() as u64 {
        eprintln!(
            "warning: skipped {} more device nodes",
            count - skipped.len() as u64
        );
    }
}

/// `diff`: the layer's tar, relative to `parent` or its recorded parent, to a file or stdout.
fn diff(s: &Selected, id: &LayerId, parent: Option<LayerId>, output: Option<&Path>) -> Result<()> {
    let parent = parent_or_recorded(s, id, parent)?;
    let mut stream = s.driver.diff(id, parent.as_ref())?;
    match output {
        None => {
            let mut out = io::stdout().lock();
            io::copy(&mut stream, &mut out).context("write the layer tar to stdout")?;
            out.flush()?;
        }
        Some(path) => {
            let (file, created) = open_output(path)?;
            let mut write = |f: File| -> Result<()> {
                let mut w = BufWriter::new(f);
                io::copy(&mut stream, &mut w)
                    .with_context(|| format!("write the layer tar to {}", path.display()))?;
                let f = w.into_inner().map_err(|e| e.into_error())?;
                f.sync_all()
                    .with_context(|| format!("write {}", path.display()))?;
                Ok(())
            };
            if let Err(e) = write(file) {
                if let Some(made) = created {
                    remove_if_same(path, &made);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The identity of a file: device and inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What the file of `meta` is, for errors ("a symlink", "a FIFO", …).
fn type_name(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::MetadataExt;
    archive::fs::describe(archive::fs::FileType::from_raw_mode(meta.mode()))
}

/// Opens the `diff -o` output file.
///
/// A missing `path` is created (`O_CREAT | O_EXCL`, mode 0600: a layer may hold files only
/// root can read) and its identity is returned so that a failed write can remove it. An existing
/// `path` must be a regular file, reached without following a symbolic link in its last
/// component; it is truncated and written, and never removed. Anything else (a symbolic link, a
/// device node, a FIFO, a socket, a directory) is refused, with an error naming the path,
/// without being opened for writing.
fn open_output(path: &Path) -> Result<(File, Option<FileId>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let new = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match new {
        Ok(f) => {
            let id = f
                .metadata()
                .map(|m| FileId::of(&m))
                .with_context(|| format!("stat {}", path.display()))?;
            return Ok((f, Some(id)));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
    }
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "refusing to write the layer tar to {}: it is {what}, not a regular file \
             (name a new file or an existing regular file)",
            path.display()
        )
    };
    let before =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !before.file_type().is_file() {
        return Err(refuse(type_name(&before)));
    }
    // O_NONBLOCK: should the path turn into a FIFO after the check, the open does not wait.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(refuse(type_name(&meta)));
    }
    if FileId::of(&meta) != FileId::of(&before) {
        bail!(
            "{} was replaced while it was being opened; not writing to it",
            path.display()
        );
    }
    f.set_len(0)
        .with_context(|| format!("truncate {}", path.display()))?;
    Ok((f, None))
}

/// Removes `path` after a failed write, if it is still the file this process created.
fn remove_if_same(path: &Path, made: &FileId) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if FileId::of(&meta) == *made => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the partial output");
            }
        }
        _ => {
            tracing::warn!(path = %path.display(), "the output file was replaced; not removing it")
        }
    }
}

/// Puts `path` into a JSON object as `key` without loss and without panicking: the path as a
/// string (invalid UTF-8 replaced by U+FFFD), and, only when the path is not valid UTF-8,
/// `<key>_bytes` with its exact bytes as an array of numbers.
fn insert_path(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            obj.insert(key.into(), json!(s));
        }
        Err(_) => {
            obj.insert(key.into(), json!(String::from_utf8_lossy(bytes)));
            obj.insert(format!("{key}_bytes"), json!(bytes));
        }
    }
}

/// `changes`: "A|C|D /path" lines sorted by path, each path raw or quoted as
/// [`archive::quote`] documents.
fn changes(s: &Selected, id: &LayerId, parent: Option<LayerId>, json: bool) -> Result<()> {
    let parent = parent_or_recorded(s, id, parent)?;
    let mut list = s.driver.changes(id, parent.as_ref())?;
    list.sort_by(|a, b| a.path.cmp(&b.path));
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|c| {
                let mut obj = serde_json::Map::new();
                obj.insert("kind".into(), json!(c.kind.letter().to_string()));
                insert_path(&mut obj, "path", &c.path);
                serde_json::Value::Object(obj)
            })
            .collect();
        return print_json(&json!(v));
    }
    let mut out = io::stdout().lock();
    for c in list {
        writeln!(out, "{c}")?;
    }
    out.flush()?;
    Ok(())
}

/// `ls`: "ID PARENT" lines.
fn ls(s: &Selected, json: bool) -> Result<()> {
    let list = s.driver.list()?;
    if json {
        // The driver's bookkeeping, for the records (a second handle on the same home).
        let (store, _) =
            graphdriver::LayerStore::open(&s.home, graphdriver::Durability::default())?;
        let v = list
            .iter()
            .map(|l| Ok(details_json(&store.details(&l.id)?, None)))
            .collect::<Result<Vec<_>>>()?;
        return print_json(&json!(v));
    }
    let mut out = io::stdout().lock();
    for l in list {
        let parent = l.parent.as_ref().map(LayerId::as_str).unwrap_or("-");
        writeln!(out, "{} {parent}", l.id)?;
    }
    out.flush()?;
    Ok(())
}

/// A layer's details as JSON (snake_case keys, numbers as numbers, `null` where unknown);
/// `size` only when it was computed.
fn details_json(d: &graphdriver::LayerDetails, size: Option<u64>) -> serde_json::Value {
    let mut v = json!({
        "id": d.id.as_str(),
        "parent": d.parent.as_ref().map(LayerId::as_str),
        "kind": kind_name(d.read_write),
        "read_write": d.read_write,
        "diff_id": d.diff_id,
        "created": d.created.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "mount_count": d.mount_count,
    });
    if let (Some(size), Some(map)) = (size, v.as_object_mut()) {
        map.insert("size".into(), json!(size));
    }
    v
}

fn kind_name(read_write: bool) -> &'static str {
    if read_write { "read-write" } else { "image" }
}

/// `info`: one layer's bookkeeping and the size of its diff against its parent.
fn info(s: &Selected, id: &LayerId, json: bool) -> Result<()> {
    let (store, _) = graphdriver::LayerStore::open(&s.home, graphdriver::Durability::default())?;
    let d = store.details(id)?;
    let size = s.driver.diff_size(id, d.parent.as_ref())?;
    if json {
        return print_json(&details_json(&d, Some(size)));
    }
    let mut out = io::stdout().lock();
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    writeln!(out, "id:          {}", d.id)?;
    writeln!(
        out,
        "parent:      {}",
        or_dash(d.parent.as_ref().map(|p| p.to_string()))
    )?;
    writeln!(out, "kind:        {}", kind_name(d.read_write))?;
    writeln!(out, "diff_id:     {}", or_dash(d.diff_id.clone()))?;
    writeln!(
        out,
        "created:     {}",
        or_dash(
            d.created
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        )
    )?;
    writeln!(out, "size:        {} ({size} bytes)", human(size))?;
    writeln!(out, "mount_count: {}", d.mount_count)?;
    out.flush()?;
    Ok(())
}

/// Bytes in a short human form: `512 B`, `1.5 KiB`, `3.2 MiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `tree`: the layer graph, children indented under their parent, with each layer's size.
fn tree(s: &Selected) -> Result<()> {
    let list = s.driver.list()?;
    let mut out = io::stdout().lock();
    let roots: Vec<&LayerInfo> = list
        .iter()
        .filter(|l| {
            l.parent
                .as_ref()
                .is_none_or(|p| !list.iter().any(|o| &o.id == p))
        })
        .collect();
    // Iterative depth-first walk: (layer, prefix for its line, prefix for its children).
    let mut stack: Vec<(&LayerInfo, String, String)> = roots
        .into_iter()
        .rev()
        .map(|l| (l, String::new(), String::new()))
        .collect();
    while let Some((layer, line_prefix, child_prefix)) = stack.pop() {
        let size = match s.driver.diff_size(&layer.id, layer.parent.as_ref()) {
            Ok(n) => human(n),
            Err(e) => format!("size unknown: {e}"),
        };
        let rw = if layer.read_write { " rw" } else { "" };
        writeln!(out, "{line_prefix}{} ({size}){rw}", layer.id)?;
        let children: Vec<&LayerInfo> = list
            .iter()
            .filter(|l| l.parent.as_ref() == Some(&layer.id))
            .collect();
        let last = children.len().saturating_sub(1);
        for (i, child) in children.into_iter().enumerate().rev() {
            let (branch, cont) = if i == last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            stack.push((
                child,
                format!("{child_prefix}{branch}"),
                format!("{child_prefix}{cont}"),
            ));
        }
    }
    out.flush()?;
    Ok(())
}

/// `import`: applies an image's layers and prints the top layer's id.
fn import(s: &Selected, path: &Path, json: bool) -> Result<()> {
    // The driver's bookkeeping, for the DiffID records (a second handle on the same home).
    let (store, _) = graphdriver::LayerStore::open(&s.home, graphdriver::Durability::default())?;
    let report = graphdriver_image::import(
        s.driver.as_ref() as &dyn Driver,
        &store,
        path,
        &image::Bars::default(),
    )
    .with_context(|| format!("import {}", path.display()))?;
    if json {
        let layers: Vec<_> = report
            .layers
            .iter()
            .map(|l| {
                json!({
                    "id": l.id.as_str(),
                    "diff_id": l.diff_id,
                    "blob": l.blob,
                    "applied": l.applied,
                    "size": l.size,
                })
            })
            .collect();
        return print_json(
            &json!({"top": report.top.as_ref().map(LayerId::as_str), "layers": layers}),
        );
    }
    match report.top {
        Some(top) => println_out(format_args!("{top}")),
        None => bail!("the image has no layers"),
    }
}
