//! Forking from a busy multi-threaded process: 8 threads × 50 confined applies at once while
//! other threads print, log through an installed `tracing` subscriber, read the environment and
//! allocate. Proves: no deadlock (the test finishes), no leaked or zombie child, no leaked fd.
//! Alone in its own test binary so the fd and child accounting sees only its own work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use archive::{ApplyOptions, Error as ArchiveError};
use chrootarchive::Error;
use common::*;
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// A log writer that holds the stderr lock while the event is formatted and written, then
/// discards the bytes: the lock traffic of real logging without flooding the test output.
struct LockedSink(std::io::StderrLock<'static>);

impl Write for LockedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(b"")?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const APPLY_THREADS: usize = 8;
const APPLIES_PER_THREAD: usize = 50;

#[test]
fn concurrent_confined_applies_while_other_threads_print_log_and_allocate() {
    if !need_root("concurrent_confined_applies_while_other_threads_print_log_and_allocate") {
        return;
    }
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(|| LockedSink(std::io::stderr().lock()))
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let fds_before = fd_count();
    let stop = Arc::new(AtomicBool::new(false));
    let noise_ops = Arc::new(AtomicU64::new(0));
    let mut noise = Vec::new();
    for kind in 0..4 {
        let stop = stop.clone();
        let ops = noise_ops.clone();
        noise.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match kind {
                    0 => {
                        // print: the capture mutex, then the real stdout and stderr locks.
                        print!("");
                        eprint!("");
                        let mut out = std::io::stdout().lock();
                        out.write_all(b"").unwrap();
                        out.flush().unwrap();
                    }
                    1 => {
                        let span = tracing::info_span!("noise", n);
                        let _g = span.enter();
                        tracing::info!(n, payload = "x".repeat(64), "logging from a noise thread");
                        tracing::debug!("and another event");
                    }
                    2 => {
                        let _ = std::env::var("PATH");
                        let _ = std::env::vars_os().count();
                    }
                    _ => {
                        let v: Vec<Vec<u8>> = (0..32)
                            .map(|i| vec![i as u8; 1 + (n as usize * 37 + i) % 70_000])
                            .collect();
                        std::hint::black_box(&v);
                        let s = format!("{n}:{}", v.len());
                        std::hint::black_box(s);
                    }
                }
                n += 1;
            }
            ops.fetch_add(n, Ordering::Relaxed);
        }));
    }

    let good = tar_of(&[
        dir("etc"),
        file("etc/hosts", b"127.0.0.1 localhost\n"),
        symlink("etc/link", "/etc/hosts"),
        file("bin/tool", &[9u8; 20_000]),
    ]);
    let bad = tar_of(&[file("ok", b"1"), file("../escape", b"2")]);
    let good = Arc::new(good);
    let bad = Arc::new(bad);
    let mut appliers = Vec::new();
    for t in 0..APPLY_THREADS {
        let good = good.clone();
        let bad = bad.clone();
        appliers.push(std::thread::spawn(move || {
            for i in 0..APPLIES_PER_THREAD {
                tracing::debug!(t, i, "confined apply");
                let dir = tempfile::tempdir().unwrap();
                if i % 10 == 7 {
                    // A panicking child, under the same load: reported, not hung.
                    let err = chrootarchive::apply_layer_with_fault(
                        dir.path(),
                        &good[..],
                        &ApplyOptions::default(),
                        chrootarchive::TestFault::PanicChild,
                    )
                    .unwrap_err();
                    assert!(
                        matches!(err, Error::ChildDied { .. }),
                        "thread {t} apply {i}: {err}"
                    );
                } else if i % 5 == 4 {
                    let err =
                        chrootarchive::apply_layer(dir.path(), &bad[..], &ApplyOptions::default())
                            .unwrap_err();
                    assert!(
                        matches!(err, Error::Archive(ArchiveError::BadEntry { .. })),
                        "thread {t} apply {i}: {err}"
                    );
                } else {
                    let n =
                        chrootarchive::apply_layer(dir.path(), &good[..], &ApplyOptions::default())
                            .unwrap_or_else(|e| panic!("thread {t} apply {i}: {e}"));
                    assert_eq!(n, 20 + 20_000);
                    assert_eq!(
                        std::fs::read(dir.path().join("bin/tool")).unwrap().len(),
                        20_000
                    );
                }
            }
        }));
    }
    for a in appliers {
        a.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for n in noise {
        n.join().unwrap();
    }
    assert!(noise_ops.load(Ordering::Relaxed) > 0, "noise threads ran");

    // Every child was reaped: this process has no children left at all, zombie or running.
    assert_eq!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)).unwrap_err(),
        Errno::ECHILD
    );
    assert_eq!(fd_count(), fds_before, "file descriptors leaked");
}
