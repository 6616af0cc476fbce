//! A container attacks the commands that read its layer (issue 12), through the documented
//! `graphctl` interface: while `diff`, `changes` and `diff-size` read a mounted read-write layer,
//! a thread swaps a directory with a symlink to a host directory, a regular file with a block
//! device node and another with a FIFO. No host byte may reach any output, nothing may block,
//! and the layer can be unmounted and removed afterwards. Deep trees (10,000 levels) go through
//! every command with the open-file limit at 1,024.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::util::{Store, is_root, layer_tar};

const CANARY: &[u8] = b"HOST-CANARY-7f3a9c";
const F_BODY: &[u8] = b"layer file f, original content";
const G_BODY: &[u8] = b"layer file g, original content";
const INNER_BODY: &[u8] = b"inside the layer's own directory";

/// Runs `cmd` with a deadline: a command that blocks (a FIFO read) fails the test instead of
/// hanging it.
fn run_with_deadline(mut cmd: Command, what: &str, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let ereader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}: blocked");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: ereader.join().unwrap(),
    }
}

fn exchange(dir: &Path, a: &str, b: &str) -> bool {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        dir.join(a),
        rustix::fs::CWD,
        dir.join(b),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .is_ok()
}

/// Every regular file in `tar` must hold one of the layer's own contents; no entry may name or
/// hold anything from the host directory.
fn check_tar(tar_bytes: &[u8], allowed: &[&[u8]]) {
    assert!(
        !tar_bytes.windows(CANARY.len()).any(|w| w == CANARY),
        "a host file's bytes are in the diff"
    );
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        assert!(!name.contains("canary"), "host entry {name} in the diff");
        if e.header().entry_type() == tar::EntryType::Regular && !name.contains(".wh.") {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert!(
                allowed.contains(&data.as_slice()),
                "entry {name} holds {} bytes that the layer never wrote",
                data.len()
            );
        }
    }
}

/// Runs `diff`, `changes` and `diff-size` on a mounted read-write layer while a thread swaps
/// entries of the mount for host links, devices and FIFOs.
fn race_reads_against_swaps(driver: &'static str, rounds: usize) {
    let s = Store::new(driver);
    let base = s.scratch("base.tar");
    fs::write(&base, layer_tar(&[("keep", b"base file")])).unwrap();
    s.ok(&["apply", "base", base.to_str().unwrap()]);
    s.ok(&["create", "--parent", "base", "--rw", "c"]);
    let mnt = s.ok(&["mount", "c"]);
    let mnt = Path::new(mnt.trim()).to_path_buf();

    // The host directory the container wants to read, and the layer's own entries.
    let host = s.scratch("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("canary"), CANARY).unwrap();
    // The attacker names its own file like the host file it is after.
    fs::write(host.join("inner"), CANARY).unwrap();
    fs::create_dir(mnt.join("d")).unwrap();
    fs::write(mnt.join("d/inner"), INNER_BODY).unwrap();
    std::os::unix::fs::symlink(&host, mnt.join("d_spare")).unwrap();
    fs::write(mnt.join("f"), F_BODY).unwrap();
    fs::write(mnt.join("g"), G_BODY).unwrap();
    let fifo = CString::new(mnt.join("g_spare").as_os_str().as_bytes()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        fifo.as_c_str(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    // A block device node for the disk the store lives on: reading it would leak host data.
    let with_device = is_root();
    if with_device {
        let disk = fs::metadata(&s.dir).unwrap().dev();
        let node = CString::new(mnt.join("f_spare").as_os_str().as_bytes()).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            node.as_c_str(),
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            disk,
        )
        .unwrap();
    } else {
        eprintln!("block-device swap skipped: needs root (the FIFO and symlink swaps still run)");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, mnt) = (Arc::clone(&stop), Arc::clone(&swaps), mnt.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut n = 0;
                n += u64::from(exchange(&mnt, "d", "d_spare"));
                n += u64::from(exchange(&mnt, "g", "g_spare"));
                if with_device {
                    n += u64::from(exchange(&mnt, "f", "f_spare"));
                }
                swaps.fetch_add(n, Ordering::Relaxed);
            }
        })
    };

    let allowed: [&[u8]; 4] = [F_BODY, G_BODY, INNER_BODY, b"base file"];
    let mut outcomes = BTreeSet::new();
    for round in 0..rounds {
        for cmd in ["diff", "changes", "diff-size"] {
            let out = run_with_deadline(
                s.cmd(&[cmd, "c"]).cmd,
                &format!("graphctl {cmd} (round {round})"),
                Duration::from_secs(60),
            );
            let code = out.status.code();
            assert!(
                matches!(code, Some(0 | 1)),
                "graphctl {cmd} ended with {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !out.stdout.windows(CANARY.len()).any(|w| w == CANARY)
                    && !out.stderr.windows(CANARY.len()).any(|w| w == CANARY),
                "graphctl {cmd} printed a host file's bytes"
            );
            if cmd == "diff" && code == Some(0) {
                check_tar(&out.stdout, &allowed);
            }
            if cmd == "changes" && code == Some(0) {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    !text.contains("canary"),
                    "changes lists a host file: {text}"
                );
            }
            outcomes.insert((cmd, code));
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        swaps.load(Ordering::Relaxed) > 0,
        "the swapper never managed to swap"
    );
    eprintln!(
        "{rounds} rounds, {} swaps, outcomes {outcomes:?}",
        swaps.load(Ordering::Relaxed)
    );
    // No reference leaked: the layer unmounts and goes away.
    s.ok(&["unmount", "c"]);
    s.ok(&["rm", "c"]);
    s.ok(&["rm", "base"]);
    assert_eq!(fs::read(host.join("canary")).unwrap(), CANARY);
}

driver_test!(reads_of_a_running_layer_never_carry_host_files, |driver| {
    race_reads_against_swaps(driver, 150);
});

/// A tar of a `levels`-deep chain `d/d/…` with a file in every directory.
fn deep_layer(levels: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut path = String::new();
    for i in 0..levels {
        if i > 0 {
            path.push('/');
        }
        path.push('d');
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("{path}/"), &b""[..]).unwrap();
        let body = format!("level {i}");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("{path}/f"), body.as_bytes())
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// `graphctl` with soft and hard `RLIMIT_NOFILE` at 1,024, so raising the soft limit at
/// start-up cannot hide a descriptor leak.
fn limited(s: &Store, args: &[&str]) -> Output {
    let mut c = s.cmd(args).cmd;
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let what = format!("graphctl {args:?}");
    let out = run_with_deadline(c, &what, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

driver_test!(ten_thousand_levels_through_every_command, |driver| {
    let levels = 10_000;
    let s = Store::new(driver);
    let deep = s.scratch("deep.tar");
    fs::write(&deep, deep_layer(levels)).unwrap();
    limited(&s, &["apply", "deep", deep.to_str().unwrap()]);

    // The whole tree as a tar: every level is there.
    let out = limited(&s, &["diff", "deep"]);
    let mut a = tar::Archive::new(out.stdout.as_slice());
    assert_eq!(a.entries().unwrap().count(), levels * 2);

    // A read-write child (a copy on vfs, a mount on overlay) changed at the bottom.
    limited(&s, &["create", "--parent", "deep", "--rw", "rw"]);
    let mnt = limited(&s, &["mount", "rw"]);
    let mnt = String::from_utf8(mnt.stdout).unwrap();
    let mut dir = rustix::fs::open(
        mnt.trim(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    for _ in 0..levels {
        dir = rustix::fs::openat(
            &dir,
            "d",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
    }
    let f = rustix::fs::openat(
        &dir,
        "new",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deep change").unwrap();
    drop((f, dir));
    let changes = limited(&s, &["changes", "rw"]);
    let changes = String::from_utf8(changes.stdout).unwrap();
    let added: Vec<&str> = changes.lines().filter(|l| l.starts_with("A ")).collect();
    assert_eq!(added.len(), 1, "{changes}");
    assert!(added[0].ends_with("/d/new"), "{}", &added[0][..60]);
    let size = limited(&s, &["diff-size", "rw"]);
    assert_eq!(String::from_utf8(size.stdout).unwrap().trim(), "11");
    let diff = limited(&s, &["diff", "rw"]);
    let mut a = tar::Archive::new(diff.stdout.as_slice());
    let names: Vec<Vec<u8>> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path_bytes().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(b"/d/new")));
    limited(&s, &["unmount", "rw"]);

    // An image layer on top that whites the whole chain out.
    let wh = s.scratch("wh.tar");
    fs::write(&wh, layer_tar(&[(".wh.d", b"")])).unwrap();
    limited(
        &s,
        &["apply", "--parent", "deep", "gone", wh.to_str().unwrap()],
    );
    let changes = limited(&s, &["changes", "gone"]);
    assert_eq!(String::from_utf8(changes.stdout).unwrap().trim(), "D /d");

    for id in ["gone", "rw", "deep"] {
        limited(&s, &["rm", id]);
    }
    assert!(s.ok(&["ls"]).trim().is_empty());
});

driver_test!(
    apply_of_an_endless_stream_ends_and_leaves_no_layer,
    |driver| {
        let s = Store::new(driver);
        let out = run_with_deadline(
            s.cmd(&["apply", "zero", "/dev/zero"]).cmd,
            "graphctl apply zero /dev/zero",
            Duration::from_secs(120),
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("end-of-archive marker"), "{stderr}");
        assert!(!s.ok(&["ls"]).contains("zero"));
    }
);
