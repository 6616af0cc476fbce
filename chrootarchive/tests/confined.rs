//! Confined apply: results equal to the in-process apply, hostile layers leave the host
//! untouched, child death becomes an error, streams of any shape are fed correctly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{self, Read, Write};
use std::os::unix::fs::symlink as host_symlink;
use std::path::Path;

use archive::compare::{CompareOptions, assert_same_tree};
use archive::{ApplyOptions, Error as ArchiveError, TarOptions};
use chrootarchive::Error;
use chrootarchive::{ConfinedBy, TestFault};
use common::*;

fn opts() -> ApplyOptions {
    ApplyOptions::default()
}

/// A layer touching most entry kinds, including whiteouts of a lower tree.
fn sample_layer() -> Vec<u8> {
    tar_of(&[
        dir("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/tool", &[7u8; 5000]),
        hardlink("usr/bin/tool2", "usr/bin/tool"),
        symlink("usr/bin/abs", "/etc/passwd"),
        symlink("usr/bin/rel", "../../etc"),
        file("lower/.wh.gone", b""),
        dir("opq"),
        file("opq/.wh..wh..opq", b""),
        file("opq/new", b"new"),
    ])
}

fn lower_tree(root: &Path) {
    std::fs::create_dir_all(root.join("lower")).unwrap();
    std::fs::write(root.join("lower/gone"), b"x").unwrap();
    std::fs::write(root.join("lower/stays"), b"y").unwrap();
    std::fs::create_dir_all(root.join("opq")).unwrap();
    std::fs::write(root.join("opq/old"), b"old").unwrap();
}

#[test]
fn confined_apply_equals_in_process_apply() {
    if !need_root("confined_apply_equals_in_process_apply") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    lower_tree(&a);
    lower_tree(&b);
    let layer = sample_layer();
    let want = archive::apply_layer(&a, &layer[..], &opts()).unwrap();
    let (got, by) =
        chrootarchive::apply_layer_with_fault(&b, &layer[..], &opts(), TestFault::None).unwrap();
    assert_eq!(got, want);
    assert_eq!(by, ConfinedBy::PivotRoot);
    assert_same_tree(&a, &b, &CompareOptions::default()).unwrap();
    assert!(!b.join("lower/gone").exists());
    assert!(!b.join("opq/old").exists());
    assert_eq!(std::fs::read(b.join("opq/new")).unwrap(), b"new");
}

#[test]
fn compressed_layers_are_decompressed_by_the_parent() {
    if !need_root("compressed_layers_are_decompressed_by_the_parent") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let layer = sample_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let want = archive::apply_layer(&a, &layer[..], &opts()).unwrap();
    let got = chrootarchive::apply_layer(&b, &gz[..], &opts()).unwrap();
    assert_eq!(got, want);
    assert_same_tree(&a, &b, &CompareOptions::default()).unwrap();
}

#[test]
fn a_layer_cannot_make_the_child_decompress() {
    if !need_root("a_layer_cannot_make_the_child_decompress") {
        return;
    }
    // gzip inside gzip: the parent removes one layer; the child sees gzip bytes and must
    // refuse them as a tar rather than run a decompressor the layer chose.
    let layer = sample_layer();
    let mut inner = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    inner.write_all(&layer).unwrap();
    let mut outer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    outer.write_all(&inner.finish().unwrap()).unwrap();
    let outer = outer.finish().unwrap();
    let t = tempfile::tempdir().unwrap();
    let err = chrootarchive::apply_layer(t.path(), &outer[..], &opts()).unwrap_err();
    assert!(
        matches!(err, Error::Archive(ArchiveError::Malformed { .. })),
        "{err}"
    );
    assert!(!t.path().join("etc").exists());
}

#[test]
fn errors_come_back_equal_to_the_in_process_ones() {
    if !need_root("errors_come_back_equal_to_the_in_process_ones") {
        return;
    }
    let mut bad_sum = tar_of(&[file("ok", b"1"), file("broken", b"2")]);
    bad_sum[1024 + 148] ^= 1; // checksum digit of the second header
    let cases: Vec<(&str, Vec<u8>, ApplyOptions)> = vec![
        ("bad checksum", bad_sum, opts()),
        ("escape", tar_of(&[file("../up", b"x")]), opts()),
        (
            "limit",
            tar_of(&[file("a", b"1"), file("b", b"2"), file("c", b"3")]),
            {
                let mut o = opts();
                o.max_entries = Some(2);
                o
            },
        ),
        (
            "write under a file",
            tar_of(&[file("f", b"1"), file("f/g", b"2")]),
            opts(),
        ),
    ];
    for (what, layer, o) in cases {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let want = archive::apply_layer(&a, &layer[..], &o);
        let got = chrootarchive::apply_layer(&b, &layer[..], &o);
        match (want, got) {
            (Err(w), Err(g)) => {
                assert_eq!(g.to_string(), w.to_string(), "{what}");
                assert_eq!(g.errno(), w.errno(), "{what}");
                let Error::Archive(g) = g else {
                    panic!("{what}: expected the apply's own error, found {g:?}");
                };
                assert_eq!(
                    std::mem::discriminant(&g),
                    std::mem::discriminant(&w),
                    "{what}"
                );
            }
            (w, g) => panic!("{what}: expected equal errors, found {w:?} and {g:?}"),
        }
    }
}

#[test]
fn untar_runs_confined_too() {
    if !need_root("untar_runs_confined_too") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let layer = tar_of(&[dir("d"), file("d/.wh.kept", b"w"), file("d/f", b"f")]);
    archive::untar(&a, &layer[..], &TarOptions::default()).unwrap();
    chrootarchive::untar(&b, &layer[..], &TarOptions::default()).unwrap();
    assert!(b.join("d/.wh.kept").exists());
    // The roots' own times are not in the tar: they tick with the clock between the extractions.
    let opts = CompareOptions {
        root_metadata: false,
        ..Default::default()
    };
    assert_same_tree(&a, &b, &opts).unwrap();
}

/// Yields a tar stream of one `size`-byte file of zeros without holding it in memory, then
/// `padding` zero bytes, in reads of at most `step` bytes; counts what was read.
struct Generated {
    head: Vec<u8>,
    size: u64,
    total: u64,
    pos: u64,
    step: usize,
}

impl Generated {
    fn new(size: u64, padding: u64, step: usize) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let body = size.div_ceil(512) * 512;
        Generated {
            head: h.as_bytes().to_vec(),
            size,
            total: 512 + body + 1024 + padding,
            pos: 0,
            step,
        }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(self.step)
            .min((self.total - self.pos) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = self.pos + i as u64;
            *b = if at < 512 { self.head[at as usize] } else { 0 };
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[test]
fn large_layers_stream_through_the_pipe() {
    if !need_root("large_layers_stream_through_the_pipe") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mut src = Generated::new(96 << 20, 0, 1 << 20);
    let bytes = chrootarchive::apply_layer(t.path(), &mut src, &opts()).unwrap();
    assert_eq!(bytes, 96 << 20);
    assert_eq!(
        std::fs::metadata(t.path().join("big")).unwrap().len(),
        src.size
    );
    assert_eq!(src.pos, src.total);
}

#[test]
fn zero_padded_tails_and_slow_readers_are_drained() {
    if !need_root("zero_padded_tails_and_slow_readers_are_drained") {
        return;
    }
    for (padding, step) in [(0, 7), (10 << 20, 1 << 16), (512 * 19, 3), (1 << 20, 1)] {
        let t = tempfile::tempdir().unwrap();
        let mut src = Generated::new(3000, padding, step);
        let bytes = chrootarchive::apply_layer(t.path(), &mut src, &opts()).unwrap();
        assert_eq!(bytes, 3000);
        assert_eq!(
            src.pos, src.total,
            "padding {padding}, step {step}: input not drained"
        );
    }
}

#[test]
fn input_errors_are_reported_not_masked() {
    if !need_root("input_errors_are_reported_not_masked") {
        return;
    }
    struct Failing(Generated);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.pos >= 100_000 {
                return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            self.0.read(buf)
        }
    }
    let t = tempfile::tempdir().unwrap();
    let err =
        chrootarchive::apply_layer(t.path(), Failing(Generated::new(1 << 20, 0, 4096)), &opts())
            .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ECONNRESET), "{err}");
}

#[test]
fn bad_input_is_refused_before_forking() {
    let t = tempfile::tempdir().unwrap();
    let err =
        chrootarchive::apply_layer(t.path(), &b"PK\x03\x04 not a tar"[..], &opts()).unwrap_err();
    assert!(
        matches!(err, Error::Archive(ArchiveError::UnknownFormat { .. })),
        "{err}"
    );
    let f = t.path().join("file");
    std::fs::write(&f, b"").unwrap();
    let err = chrootarchive::apply_layer(&f, &sample_layer()[..], &opts()).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOTDIR), "{err}");
    let err = chrootarchive::apply_layer(&t.path().join("missing"), &sample_layer()[..], &opts())
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
}

fn child_dies(fault: TestFault, expect: &str) {
    let t = tempfile::tempdir().unwrap();
    // Far more than a pipe buffer: the parent is still writing when the child dies.
    let src = Generated::new(32 << 20, 0, 1 << 16);
    let err = chrootarchive::apply_layer_with_fault(t.path(), src, &opts(), fault).unwrap_err();
    match &err {
        Error::ChildDied { how } => assert!(how.contains(expect), "{how}"),
        other => panic!("expected ChildDied, found {other:?}"),
    }
    assert!(
        err.to_string().starts_with("the confined apply process "),
        "{err}"
    );
    // (fd and zombie accounting is in tests/stress.rs, alone in its process)
}

#[test]
fn child_killed_by_a_signal_is_reported() {
    if need_root("child_killed_by_a_signal_is_reported") {
        child_dies(TestFault::KillChild, "was killed by signal SIGKILL");
    }
}

#[test]
fn child_panic_is_reported() {
    if need_root("child_panic_is_reported") {
        child_dies(
            TestFault::PanicChild,
            "panicked: chrootarchive test hook: panic in the confined child",
        );
    }
}

#[test]
fn child_exiting_silently_is_reported() {
    if need_root("child_exiting_silently_is_reported") {
        child_dies(
            TestFault::ExitChild,
            "exited with status 3 without reporting a result",
        );
    }
}

// ---- hostile layers: each checks the host file is untouched ----

/// A host directory holding a victim file, and a separate target directory.
struct Scene {
    _t: tempfile::TempDir,
    host: std::path::PathBuf,
    victim: Victim,
    dest: std::path::PathBuf,
}

fn scene() -> Scene {
    let t = tempfile::tempdir().unwrap();
    let host = t.path().join("host");
    std::fs::create_dir(&host).unwrap();
    let victim = Victim::new(&host.join("victim"));
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    Scene {
        _t: t,
        host,
        victim,
        dest,
    }
}

/// Applies `layer` confined; the apply may succeed (writing inside dest) or fail with a layer
/// error, but it must have run confined.
fn apply_hostile(s: &Scene, layer: &[u8]) {
    match chrootarchive::apply_layer(&s.dest, layer, &opts()) {
        Ok(_) => {}
        Err(e @ (Error::Confinement { .. } | Error::ChildDied { .. })) => {
            panic!("hostile layer did not run confined: {e}")
        }
        Err(_) => {}
    }
    s.victim.assert_untouched();
    let own = s
        .victim
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(names(&s.host), [own], "files appeared in the host dir");
}

fn host_str(s: &Scene) -> String {
    s.host.to_str().unwrap().to_owned()
}

#[test]
fn hostile_dotdot_names() {
    if !need_root("hostile_dotdot_names") {
        return;
    }
    let s = scene();
    apply_hostile(&s, &tar_of(&[file("../host/victim", b"pwned")]));
    apply_hostile(&s, &tar_of(&[file("a/../../host/victim", b"pwned")]));
    apply_hostile(&s, &tar_of(&[file("../host/new", b"pwned")]));
}

#[test]
fn hostile_absolute_names() {
    if !need_root("hostile_absolute_names") {
        return;
    }
    let s = scene();
    let abs = format!("{}/victim", host_str(&s));
    apply_hostile(&s, &tar_of(&[file(&abs, b"pwned")]));
    let abs_new = format!("{}/new", host_str(&s));
    apply_hostile(&s, &tar_of(&[file(&abs_new, b"pwned")]));
}

#[test]
fn hostile_symlink_planted_then_written_through() {
    if !need_root("hostile_symlink_planted_then_written_through") {
        return;
    }
    let s = scene();
    let h = host_str(&s);
    apply_hostile(&s, &tar_of(&[symlink("a", &h), file("a/victim", b"pwned")]));
    let s = scene();
    apply_hostile(
        &s,
        &tar_of(&[symlink("b", "../host"), file("b/victim", b"pwned")]),
    );
    let s = scene();
    // A symlink to the victim itself, then a file entry of the same name written "through" it.
    let v = format!("{h}/victim");
    apply_hostile(&s, &tar_of(&[symlink("v", &v), file("v", b"pwned")]));
}

#[test]
fn hostile_symlink_to_root_then_entries_through_it() {
    if !need_root("hostile_symlink_to_root_then_entries_through_it") {
        return;
    }
    let s = scene();
    let through = format!("root{}/victim", host_str(&s));
    let through_new = format!("root{}/new", host_str(&s));
    apply_hostile(
        &s,
        &tar_of(&[
            symlink("root", "/"),
            file(&through, b"pwned"),
            file(&through_new, b"pwned"),
            dir("root/tmp/planted"),
        ]),
    );
    assert!(!Path::new("/tmp/planted").exists());
}

#[test]
fn hostile_hardlinks_to_host_paths() {
    if !need_root("hostile_hardlinks_to_host_paths") {
        return;
    }
    let s = scene();
    let abs = format!("{}/victim", host_str(&s));
    apply_hostile(&s, &tar_of(&[hardlink("l", &abs), file("l", b"pwned")]));
    let s = scene();
    apply_hostile(&s, &tar_of(&[hardlink("l", "../host/victim")]));
    let s = scene();
    // symlink -> host, then a hardlink through the symlink, then a write to the hardlink.
    apply_hostile(
        &s,
        &tar_of(&[
            symlink("s", &host_str(&s)),
            hardlink("l", "s/victim"),
            file("l", b"pwned"),
        ]),
    );
    assert!(!Path::new("/etc/shadow-confined-test").exists());
}

#[test]
fn hostile_whiteouts_pointing_outside() {
    if !need_root("hostile_whiteouts_pointing_outside") {
        return;
    }
    let s = scene();
    apply_hostile(&s, &tar_of(&[file("../host/.wh.victim", b"")]));
    let s = scene();
    let abs = format!("{}/.wh.victim", host_str(&s));
    apply_hostile(&s, &tar_of(&[file(&abs, b"")]));
    let s = scene();
    apply_hostile(
        &s,
        &tar_of(&[symlink("a", &host_str(&s)), file("a/.wh.victim", b"")]),
    );
    let s = scene();
    apply_hostile(
        &s,
        &tar_of(&[symlink("a", &host_str(&s)), file("a/.wh..wh..opq", b"")]),
    );
}

#[test]
fn hostile_existing_symlink_in_dest_points_at_the_host() {
    if !need_root("hostile_existing_symlink_in_dest_points_at_the_host") {
        return;
    }
    let s = scene();
    host_symlink(&s.host, s.dest.join("etc")).unwrap();
    let passwd = Victim::new(&s.host.join("passwd"));
    std::fs::remove_file(&s.victim.path).unwrap();
    let s = Scene {
        victim: passwd,
        ..s
    };
    apply_hostile(&s, &tar_of(&[file("etc/passwd", b"pwned")]));
    // Also a file in a directory that only the host side has.
    let s2 = scene();
    host_symlink(&s2.host, s2.dest.join("etc")).unwrap();
    apply_hostile(&s2, &tar_of(&[file("etc/shadow", b"pwned")]));
}

#[test]
fn a_buggy_writer_in_the_child_cannot_reach_the_host() {
    if !need_root("a_buggy_writer_in_the_child_cannot_reach_the_host") {
        return;
    }
    // Stands in for a tar-code bug: the child writes to the host path directly (absolute and
    // via ../ climbing). Confinement makes `/` the target, so the write lands inside it.
    let s = scene();
    std::fs::create_dir_all(s.dest.join(s.host.strip_prefix("/").unwrap())).unwrap();
    let fault = TestFault::WriteHostPath(s.victim.path.clone());
    chrootarchive::apply_layer_with_fault(&s.dest, &sample_layer()[..], &opts(), fault).unwrap();
    s.victim.assert_untouched();
    let inside = s.dest.join(s.victim.path.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(inside).unwrap(), b"escaped");
}
