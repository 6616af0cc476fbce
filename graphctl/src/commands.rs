//! One small function per subcommand: open the driver, call it, print the result.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use graphdriver::{Config, Driver, LayerId, LayerInfo, MountOpts, Selected, SelectedBy};
use serde_json::json;

use crate::flags::{Cli, Command, layer_id, opt_layer_id};
use crate::{blob, image, output, usage};

/// Runs the command `cli` names; the exit code is 0 except for `exists` on a missing layer (1).
/// An error is returned as it is: the caller picks its exit status ([`Command::error_status`]).
pub fn run(cli: &Cli) -> Result<ExitCode> {
    let json = cli.json;
    // The commands that need no store (and no config).
    match &cli.command {
        Command::Completions { shell } => return completions(*shell, json),
        Command::Man { dir } => return man(dir, json),
        _ => {}
    }
    let config = cli.config()?;
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
            if json {
                return print_json(json!({
                    "id": id.as_str(),
                    "parent": parent.as_ref().map(LayerId::as_str),
                    "kind": kind_name(*rw),
                }))
                .map(|()| ExitCode::SUCCESS);
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
                json,
            )
        }
        Command::Diff { parent, id, out } => {
            blob::check_output(out, json)?;
            let s = open(&config)?;
            let id = layer_id(id)?;
            let parent = parent_or_recorded(&s, &id, opt_layer_id(parent.as_deref())?)?;
            let stream = s.driver.diff(&id, parent.as_ref())?;
            blob::write(stream, out, json)
        }
        Command::Export { id, out } => {
            blob::check_output(out, json)?;
            let s = open(&config)?;
            let stream = s.driver.diff(&layer_id(id)?, None)?;
            blob::write(stream, out, json)
        }
        Command::Commit { rw, new } => {
            commit(&open(&config)?, &layer_id(rw)?, &layer_id(new)?, json)
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
            if json {
                print_json(json!({
                    "id": id.as_str(),
                    "parent": parent.as_ref().map(LayerId::as_str),
                    "size": size,
                }))
            } else {
                println_out(format_args!("{size}"))
            }
        }
        Command::Mount { id: Some(id), rw } => mount(&open(&config)?, &layer_id(id)?, *rw, json),
        Command::Mount { id: None, .. } => mounts(&open(&config)?, json),
        Command::Unmount { id: Some(id), .. } => unmount(&open(&config)?, &layer_id(id)?, json),
        Command::Unmount { id: None, .. } => unmount_all(&open(&config)?, json),
        Command::Rm { id } => {
            let id = layer_id(id)?;
            open(&config)?.driver.remove(&id)?;
            if json {
                return print_json(json!({"id": id.as_str()})).map(|()| ExitCode::SUCCESS);
            }
            Ok(())
        }
        Command::Ls => ls(&open(&config)?, json),
        Command::Info { id } => info(&open(&config)?, &layer_id(id)?, json),
        Command::Usage { id } => usage(&open(&config)?, opt_layer_id(id.as_deref())?, json),
        Command::Tree => tree(&open(&config)?, json),
        Command::Exists { id } => return exists(&open(&config)?, &layer_id(id)?, json),
        Command::Import { path } => import(&open(&config)?, path, json),
        Command::Cleanup => {
            let s = open(&config)?;
            let released = mounted_ids(&s)?;
            s.driver.cleanup()?;
            if json {
                return print_json(json!({"released": released})).map(|()| ExitCode::SUCCESS);
            }
            Ok(())
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// `completions`: the shell's completion script on stdout.
fn completions(shell: clap_complete::Shell, json: bool) -> Result<ExitCode> {
    if json {
        return Err(output::invalid_argument(
            "completions prints a shell script and has no JSON form; drop --json",
        ));
    }
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut out = io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "graphctl", &mut out);
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `man DIR`: graphctl.1 and graphctl-SUBCOMMAND.1 for every visible subcommand.
fn man(dir: &Path, json: bool) -> Result<ExitCode> {
    if json {
        return Err(output::invalid_argument(
            "man writes man pages and has no JSON form; drop --json",
        ));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut pages = vec![("graphctl".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("graphctl-{}", sub.get_name());
        let page = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("graphctl {}", sub.get_name()));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut buf)
            .with_context(|| format!("render {}", path.display()))?;
        std::fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
        println_out(format_args!("{}", path.display()))?;
    }
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

/// `exists`: 0 if a complete layer `id` exists, 1 if it does not; any other failure (the store
/// cannot be read, a planted entry where the layer should be) is an error, exit status 125.
fn exists(s: &Selected, id: &LayerId, json: bool) -> Result<ExitCode> {
    // `exists` cannot say why it answered no; `parent` can: `NotFound` or another error.
    let found = s.driver.exists(id)
        || match s.driver.parent(id) {
            Ok(_) => true,
            Err(graphdriver::Error::NotFound(_)) => false,
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("check whether layer {id} exists"))
                );
            }
        };
    if json {
        print_json(json!({"id": id.as_str(), "exists": found}))?;
    }
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `unmount`: releases one mount of an existing layer; an id that names no layer is an error
/// (`NotFound`), not a silent success.
fn unmount(s: &Selected, id: &LayerId, json: bool) -> Result<()> {
    s.driver.parent(id)?;
    s.driver.put(id)?;
    if json {
        let (store, _) = open_store(s)?;
        return print_json(json!({"id": id.as_str(), "mount_count": store.mount_count(id)?}));
    }
    Ok(())
}

/// The layers of the store that hold mounts (durable or of live processes), sorted.
fn mounted_ids(s: &Selected) -> Result<Vec<String>> {
    let (store, _) = open_store(s)?;
    Ok(store
        .mounted()?
        .into_iter()
        .map(|(id, _)| id.as_str().to_string())
        .collect())
}

/// `unmount --all`: releases every mount of every layer (the driver's `cleanup`) and prints
/// the ids of the layers that had mounts.
fn unmount_all(s: &Selected, json: bool) -> Result<()> {
    let released = mounted_ids(s)?;
    s.driver.cleanup()?;
    if json {
        return print_json(json!({"released": released}));
    }
    let mut out = io::stdout().lock();
    for id in released {
        writeln!(out, "{id}")?;
    }
    out.flush()?;
    Ok(())
}

/// A second handle on the driver's bookkeeping (the same home), for what the `Driver` trait
/// does not tell: details, mount counts, usage.
fn open_store(s: &Selected) -> Result<(graphdriver::LayerStore, graphdriver::Recovery)> {
    Ok(graphdriver::LayerStore::open(
        &s.home,
        graphdriver::Durability::default(),
    )?)
}

/// `mount` with no layer: the mounted layers and where, "ID PATH" lines.
///
/// The path is the driver's answer to a get, taken and released again by this process: for a
/// layer already mounted that mounts nothing new.
fn mounts(s: &Selected, json: bool) -> Result<()> {
    let (store, _) = open_store(s)?;
    let mut rows = Vec::new();
    for (id, count) in store.mounted()? {
        let committed = store.is_committed(&id)?;
        let opts = if committed {
            MountOpts::default().view()
        } else {
            MountOpts::default()
        };
        let path = s.driver.get(&id, &opts)?;
        s.driver.put(&id)?;
        rows.push((id, path, count, committed));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(id, path, count, ro)| {
                let mut obj = serde_json::Map::new();
                obj.insert("id".into(), json!(id.as_str()));
                insert_path(&mut obj, "path", path);
                obj.insert("mount_count".into(), json!(count));
                obj.insert("read_only".into(), json!(ro));
                serde_json::Value::Object(obj)
            })
            .collect();
        return print_json(json!({"mounts": v}));
    }
    let mut out = io::stdout().lock();
    for (id, path, _, _) in rows {
        writeln!(out, "{id} {}", path.display())?;
    }
    out.flush()?;
    Ok(())
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

/// Prints the command's JSON document (see [`output`]).
fn print_json(value: serde_json::Value) -> Result<()> {
    output::print_json(value)
}

/// `mount`: a read-only view of a committed layer, a writable mount of a read-write layer
/// without children; `--rw` on a committed layer is refused before anything is mounted.
fn mount(s: &Selected, id: &LayerId, rw: bool, json: bool) -> Result<()> {
    let (store, _) = open_store(s)?;
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
        let mut obj = serde_json::Map::new();
        obj.insert("id".into(), json!(id.as_str()));
        insert_path(&mut obj, "path", &path);
        obj.insert("read_only".into(), json!(committed));
        return print_json(serde_json::Value::Object(obj));
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
        return print_json(json!({"drivers": v}));
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
        let status: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| (snake_case(k), typed_value(v)))
            .collect();
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
        return print_json(serde_json::Value::Object(obj));
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

/// A driver's status key (`"Backing Filesystem"`) as a snake_case JSON key
/// (`"backing_filesystem"`): lowercase ASCII letters and digits, every other run of characters
/// one `_`.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// A driver's status value as a typed JSON value: a whole number as a number, `true`/`false`
/// as a boolean, anything else as the string.
fn typed_value(value: &str) -> serde_json::Value {
    if let Ok(n) = value.parse::<u64>() {
        return json!(n);
    }
    match value {
        "true" => json!(true),
        "false" => json!(false),
        _ => json!(value),
    }
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
fn apply(
    s: &Selected,
    id: &LayerId,
    parent: Option<LayerId>,
    file: Option<&Path>,
    json: bool,
) -> Result<()> {
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
    let applied = apply_stream(s, id, parent, plain, &name);
    bar.finish_and_clear();
    let applied = applied?;
    if json {
        return print_json(json!({
            "id": id.as_str(),
            "parent": applied.parent.as_ref().map(LayerId::as_str),
            "size": applied.size,
            "created": applied.created,
            "diff_id": applied.diff_id,
        }));
    }
    println_out(format_args!("{}", applied.size))
}

/// What [`apply_stream`] did.
struct Applied {
    /// The layer's parent.
    parent: Option<LayerId>,
    /// Bytes applied.
    size: u64,
    /// True when the layer was created by this apply.
    created: bool,
    /// The DiffID recorded for a layer this apply created (`None` if none was recorded).
    diff_id: Option<String>,
}

/// Applies the plain tar `plain` (read from `name`) to layer `id`, creating it on `parent`
/// first if it does not exist (hidden until complete, removed again if the apply fails) and
/// then recording its DiffID.
fn apply_stream(
    s: &Selected,
    id: &LayerId,
    parent: Option<LayerId>,
    plain: impl Read,
    name: &str,
) -> Result<Applied> {
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
    warn_skipped();
    match result {
        Ok(size) => {
            let diff_id = if created {
                image::record_diff_id(&s.home, id, &mut plain, &diff_id)
            } else {
                None
            };
            Ok(Applied {
                parent,
                size,
                created,
                diff_id,
            })
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

/// `commit RW NEW`: the image layer `new`, on `rw`'s parent, made of `rw`'s diff; prints the
/// DiffID recorded for it.
fn commit(s: &Selected, rw: &LayerId, new: &LayerId, json: bool) -> Result<()> {
    let (store, _) = open_store(s)?;
    if !store.details(rw)?.read_write {
        return Err(output::invalid_argument(format!(
            "layer {rw} is an image layer, not a read-write layer; commit makes an image layer \
             from a read-write one (graphctl create --rw --parent {rw} NEW makes one)"
        )));
    }
    if s.driver.exists(new) {
        return Err(graphdriver::Error::AlreadyExists(new.clone()).into());
    }
    let parent = s.driver.parent(rw)?;
    let stream = s
        .driver
        .diff(rw, parent.as_ref())
        .with_context(|| format!("read the changes of layer {rw}"))?;
    let applied = apply_stream(
        s,
        new,
        parent,
        stream,
        &format!("the changes of layer {rw}"),
    )?;
    let Some(diff_id) = applied.diff_id else {
        // The new layer exists but has no DiffID: it cannot be reused as the image layer it
        // was meant to be. Leave nothing behind.
        let _ = s.driver.remove(new);
        bail!("could not record the DiffID of layer {new}; the commit was undone");
    };
    if json {
        return print_json(json!({
            "id": new.as_str(),
            "parent": applied.parent.as_ref().map(LayerId::as_str),
            "from": rw.as_str(),
            "size": applied.size,
            "diff_id": diff_id,
        }));
    }
    println_out(format_args!("{diff_id}"))
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

/// Puts `path` into a JSON object as `key` without loss and without panicking: the path as a
/// string (invalid UTF-8 replaced by U+FFFD), and, only when the path is not valid UTF-8,
/// `<key>_bytes` with its exact bytes as an array of numbers.
pub(crate) fn insert_path(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    path: &Path,
) {
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
                obj.insert("kind".into(), json!(change_kind_name(c.kind)));
                insert_path(&mut obj, "path", &c.path);
                serde_json::Value::Object(obj)
            })
            .collect();
        return print_json(json!({"changes": v}));
    }
    let mut out = io::stdout().lock();
    for c in list {
        writeln!(out, "{c}")?;
    }
    out.flush()?;
    Ok(())
}

/// A change's kind as its JSON name (containerd's names): `add`, `modify` or `delete`.
fn change_kind_name(kind: graphdriver::ChangeKind) -> &'static str {
    match kind {
        graphdriver::ChangeKind::Add => "add",
        graphdriver::ChangeKind::Modify => "modify",
        graphdriver::ChangeKind::Delete => "delete",
    }
}

/// `ls`: "ID PARENT" lines.
fn ls(s: &Selected, json: bool) -> Result<()> {
    let list = s.driver.list()?;
    if json {
        // The driver's bookkeeping, for the records (a second handle on the same home).
        let (store, _) = open_store(s)?;
        let v = list
            .iter()
            .map(|l| Ok(details_json(&store.details(&l.id)?, None)))
            .collect::<Result<Vec<_>>>()?;
        return print_json(json!({"layers": v}));
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

/// `info`: one layer's bookkeeping, the size of its diff against its parent and the disk
/// usage of its own storage.
fn info(s: &Selected, id: &LayerId, json: bool) -> Result<()> {
    let (store, _) = open_store(s)?;
    let d = store.details(id)?;
    let size = s.driver.diff_size(id, d.parent.as_ref())?;
    let used = usage::layer_usage(&store, id)?;
    if json {
        let mut v = details_json(&d, Some(size));
        if let Some(map) = v.as_object_mut() {
            map.insert("disk_usage".into(), usage_json(&used));
        }
        return print_json(v);
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
    writeln!(
        out,
        "disk usage:  {} ({} bytes), {} inodes",
        human(used.bytes),
        used.bytes,
        used.inodes
    )?;
    writeln!(out, "mount_count: {}", d.mount_count)?;
    out.flush()?;
    Ok(())
}

/// A [`usage::Usage`] as JSON.
fn usage_json(u: &usage::Usage) -> serde_json::Value {
    json!({"bytes": u.bytes, "inodes": u.inodes})
}

/// `usage`: the disk space and inodes of each layer's own storage (or of `only`), and the
/// total.
fn usage(s: &Selected, only: Option<LayerId>, json: bool) -> Result<()> {
    let (store, _) = open_store(s)?;
    let ids = match only {
        Some(id) => vec![id],
        None => s.driver.list()?.into_iter().map(|l| l.id).collect(),
    };
    let mut rows = Vec::with_capacity(ids.len());
    let mut total = usage::Usage::default();
    for id in ids {
        let u = usage::layer_usage(&store, &id)?;
        total.bytes += u.bytes;
        total.inodes += u.inodes;
        rows.push((id, u));
    }
    if json {
        let layers: Vec<_> = rows
            .iter()
            .map(|(id, u)| json!({"id": id.as_str(), "bytes": u.bytes, "inodes": u.inodes}))
            .collect();
        return print_json(json!({"layers": layers, "total": usage_json(&total)}));
    }
    let width = rows
        .iter()
        .map(|(id, _)| id.as_str().len())
        .max()
        .unwrap_or(0)
        .max("total".len());
    let mut out = io::stdout().lock();
    writeln!(out, "{:<width$}  {:>10}  {:>8}", "ID", "SIZE", "INODES")?;
    for (id, u) in &rows {
        let (id, size) = (id.as_str(), human(u.bytes));
        writeln!(out, "{id:<width$}  {size:>10}  {:>8}", u.inodes)?;
    }
    let size = human(total.bytes);
    writeln!(out, "{:<width$}  {size:>10}  {:>8}", "total", total.inodes)?;
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

/// `tree`: the layer graph, children indented under their parent, with each layer's size;
/// with `json`, the layers in the same (depth-first) order, each with its depth.
fn tree(s: &Selected, json: bool) -> Result<()> {
    let list = s.driver.list()?;
    let mut rows = Vec::new();
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
        let size = s.driver.diff_size(&layer.id, layer.parent.as_ref());
        if json {
            // The depth is the number of ancestors shown above: 4 columns each.
            let depth = child_prefix.chars().count() / 4;
            rows.push(json!({
                "id": layer.id.as_str(),
                "parent": layer.parent.as_ref().map(LayerId::as_str),
                "read_write": layer.read_write,
                "depth": depth,
                "size": size.as_ref().ok(),
                "size_error": size.as_ref().err().map(ToString::to_string),
            }));
        } else {
            let size = match size {
                Ok(n) => human(n),
                Err(e) => format!("size unknown: {e}"),
            };
            let rw = if layer.read_write { " rw" } else { "" };
            writeln!(out, "{line_prefix}{} ({size}){rw}", layer.id)?;
        }
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
    drop(out);
    if json {
        return print_json(json!({"layers": rows}));
    }
    io::stdout().flush()?;
    Ok(())
}

/// `import`: applies an image's layers and prints the top layer's id.
fn import(s: &Selected, path: &Path, json: bool) -> Result<()> {
    // The driver's bookkeeping, for the DiffID records (a second handle on the same home).
    let (store, _) = open_store(s)?;
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
            json!({"top": report.top.as_ref().map(LayerId::as_str), "layers": layers}),
        );
    }
    match report.top {
        Some(top) => println_out(format_args!("{top}")),
        None => bail!("the image has no layers"),
    }
}
