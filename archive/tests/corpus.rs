//! Conformance against archives nobody here wrote (issue 13): Go's `archive/tar` test data (the
//! reader moby's layer code uses; Debian package `golang-1.19-src`) and Python's `testtar.tar`
//! (`libpython3.11-testsuite`), both installed by `.ci/run`.
//!
//! Every archive has a stated outcome, no archive is skipped silently:
//! * [`Outcome::SameAsGnuTar`]: our extraction equals GNU tar's (numeric owners, modes, types,
//!   contents, link targets, device numbers, hardlink groups, mtimes of non-directories);
//! * [`Outcome::Tree`]: Go's reader and GNU tar disagree, we follow Go (moby): the listed paths
//!   and kinds are what we must produce;
//! * [`Outcome::Refused`]: Go refuses it (`ErrHeader`), so do we, with an error naming what was
//!   wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use archive::compare::{CompareOptions, Kind, differences, snapshot};

/// Where the corpora live; `CI=true` requires them (`.ci/run` installs them).
const GO_TESTDATA: &str = "/usr/share/go-1.19/src/archive/tar/testdata";
const PY_TESTTAR: &str = "/usr/lib/python3.11/test/testtar.tar";

enum Outcome {
    SameAsGnuTar,
    /// Paths (relative) with the kind each must have; everything else as GNU tar has it is not
    /// checked.
    Tree(&'static [(&'static str, Kind)]),
    /// Refused; the error message contains this text.
    Refused(&'static str),
    /// GNU tar cannot extract it, Go reads it: each listed file has this MD5 (from Go's
    /// `reader_test.go`).
    Md5(&'static [(&'static str, &'static str)]),
}

fn corpus_dir_or_skip(path: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{path} is missing: .ci/run installs it (golang-1.19-src, libpython3.11-testsuite)"
    );
    eprintln!(
        "skipping: {path} is not installed (apt-get install golang-1.19-src libpython3.11-testsuite)"
    );
    test_support::record_skip(&format!("{path} is not installed"));
    None
}

use test_support::is_root;

fn read_archive(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    File::open(path).unwrap().read_to_end(&mut data).unwrap();
    data
}

/// Extracts with GNU tar as the oracle; `None` when GNU tar itself fails.
fn gnu_extract(archive: &Path, dest: &Path) -> Option<String> {
    let out = Command::new("tar")
        .arg("-x")
        .arg("--numeric-owner")
        .arg("--same-permissions")
        .arg("--xattrs")
        .arg("--xattrs-include=*")
        .arg("-f")
        .arg(archive)
        .arg("-C")
        .arg(dest)
        .output()
        .unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ours(archive: &Path, dest: &Path) -> archive::Result<u64> {
    let data = read_archive(archive);
    let mut opts = archive::ApplyOptions::default();
    opts.same_owner = is_root();
    archive::apply_layer(dest, archive::decompress(data.as_slice())?, &opts)
}

fn check(archive: &Path, outcome: &Outcome) -> Result<(), String> {
    let name = archive.file_name().unwrap().to_string_lossy().into_owned();
    let t = tempfile::tempdir().unwrap();
    let (gnu, mine) = (t.path().join("gnu"), t.path().join("ours"));
    std::fs::create_dir(&gnu).unwrap();
    std::fs::create_dir(&mine).unwrap();
    let res = ours(archive, &mine);
    match outcome {
        Outcome::Refused(what) => match res {
            Ok(_) => Err(format!(
                "{name}: expected a refusal naming {what:?}, it applied"
            )),
            Err(e) if e.to_string().contains(what) => Ok(()),
            Err(e) => Err(format!(
                "{name}: expected a refusal naming {what:?}, got: {e}"
            )),
        },
        Outcome::SameAsGnuTar => {
            let res = res.map_err(|e| format!("{name}: refused: {e}"))?;
            let _ = res;
            if let Some(err) = gnu_extract(archive, &gnu) {
                return Err(format!("{name}: GNU tar failed: {err}"));
            }
            let opts = CompareOptions {
                dir_mtimes: false,
                root_metadata: false,
                xattrs: is_root(),
                ..Default::default()
            };
            let a = snapshot(&gnu).map_err(|e| e.to_string())?;
            let b = snapshot(&mine).map_err(|e| e.to_string())?;
            let d = differences(&a, &b, &opts);
            if d.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{name}: differs from GNU tar:\n  {}",
                    d.join("\n  ")
                ))
            }
        }
        Outcome::Md5(want) => {
            res.map_err(|e| format!("{name}: refused: {e}"))?;
            for (file, sum) in *want {
                let out = Command::new("python3")
                    .args(["-c", "import hashlib,sys; print(hashlib.md5(open(sys.argv[1],'rb').read()).hexdigest())"])
                    .arg(mine.join(file))
                    .output()
                    .unwrap();
                let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if got != *sum {
                    return Err(format!("{name}: {file}: md5 {got}, Go expects {sum}"));
                }
            }
            Ok(())
        }
        Outcome::Tree(want) => {
            res.map_err(|e| format!("{name}: refused: {e}"))?;
            let b = snapshot(&mine).map_err(|e| e.to_string())?;
            for (path, kind) in *want {
                match b.get(Path::new("/").join(path)) {
                    Some(e) if e.kind == *kind => {}
                    Some(e) => {
                        return Err(format!(
                            "{name}: {path}: expected {kind:?}, found {:?}",
                            e.kind
                        ));
                    }
                    None => return Err(format!("{name}: {path}: missing")),
                }
            }
            Ok(())
        }
    }
}

/// A 60 GB file of six 100-byte data runs ("0123456789" × 10) ending at every 10^10 bytes,
/// the rest holes (Go's `writer_test.go` states this layout): extracted sparse, never written
/// out in full.
fn check_big_sparse(archive: &Path, name: &str) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let t = tempfile::tempdir().unwrap();
    ours(archive, t.path()).map_err(|e| format!("refused: {e}"))?;
    let f = File::open(t.path().join(name)).map_err(|e| e.to_string())?;
    let md = f.metadata().unwrap();
    if md.len() != 60_000_000_000 {
        return Err(format!("size {} instead of 6e10", md.len()));
    }
    if md.blocks() * 512 > 64 << 20 {
        return Err(format!(
            "{} bytes allocated: the holes were written",
            md.blocks() * 512
        ));
    }
    let run = "0123456789".repeat(10).into_bytes();
    for k in 1..=6u64 {
        let mut buf = vec![0u8; 200];
        f.read_exact_at(&mut buf, k * 10_000_000_000 - 200).unwrap();
        if buf[..100] != [0u8; 100] || buf[100..] != run[..] {
            return Err(format!("wrong bytes before offset {k}e10"));
        }
    }
    Ok(())
}

/// One test per archive, each with its stated outcome (Go 1.19's `reader_test.go` says what Go
/// reads from each). `every_go_archive_has_a_stated_outcome` checks that none is left out.
macro_rules! go_corpus {
    ($($test:ident: $file:literal => $outcome:expr,)*) => {
        const GO_FILES: &[&str] = &[$($file),*];
        $(
            #[test]
            fn $test() {
                let Some(dir) = corpus_dir_or_skip(GO_TESTDATA) else { return };
                check(&dir.join($file), &$outcome).unwrap();
            }
        )*
    };
}

go_corpus! {
    go_file_and_dir: "file-and-dir.tar" => Outcome::SameAsGnuTar,
    go_gnu_incremental: "gnu-incremental.tar" => Outcome::SameAsGnuTar,
    go_gnu_long_nul: "gnu-long-nul.tar" => Outcome::SameAsGnuTar,
    go_gnu_multi_hdrs: "gnu-multi-hdrs.tar" => Outcome::SameAsGnuTar,
    go_gnu_nil_sparse_data: "gnu-nil-sparse-data.tar" => Outcome::SameAsGnuTar,
    go_gnu_nil_sparse_hole: "gnu-nil-sparse-hole.tar" => Outcome::SameAsGnuTar,
    go_gnu_not_utf8: "gnu-not-utf8.tar" => Outcome::SameAsGnuTar,
    go_gnu_utf8: "gnu-utf8.tar" => Outcome::SameAsGnuTar,
    go_gnu: "gnu.tar" => Outcome::SameAsGnuTar,
    go_hardlink: "hardlink.tar" => Outcome::SameAsGnuTar,
    go_hdr_only: "hdr-only.tar" => Outcome::SameAsGnuTar,
    // A pre-Go 1.8 writer put a prefix into GNU's atime/ctime fields: Go reads it as a prefix
    // (golang.org/issue/12594), GNU tar drops it.
    go_invalid_go17: "invalid-go17.tar" => Outcome::Tree(&[(
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/foo",
        Kind::File,
    )]),
    // Go: ErrHeader.
    go_issue10968: "issue10968.tar" => Outcome::Refused("malformed"),
    go_issue11169: "issue11169.tar" => Outcome::Refused("malformed"),
    go_issue12435: "issue12435.tar" => Outcome::Refused("malformed"),
    go_neg_size: "neg-size.tar" => Outcome::Refused("malformed"),
    go_nil_uid: "nil-uid.tar" => Outcome::SameAsGnuTar,
    go_pax_bad_hdr_file: "pax-bad-hdr-file.tar" => Outcome::Refused("PAX"),
    // Go: ErrFieldTooLong.
    go_pax_bad_hdr_large: "pax-bad-hdr-large.tar.bz2" => Outcome::Refused("limit"),
    go_pax_bad_mtime_file: "pax-bad-mtime-file.tar" => Outcome::Refused("mtime"),
    // Global records do not rename later members (Go and moby ignore them); GNU tar applies an
    // empty global `path` and fails.
    go_pax_global_records: "pax-global-records.tar" => Outcome::Tree(&[
        ("file1", Kind::File),
        ("file2", Kind::File),
        ("file3", Kind::File),
        ("file4", Kind::File),
    ]),
    go_pax_multi_hdrs: "pax-multi-hdrs.tar" => Outcome::SameAsGnuTar,
    go_pax_nil_sparse_data: "pax-nil-sparse-data.tar" => Outcome::SameAsGnuTar,
    go_pax_nil_sparse_hole: "pax-nil-sparse-hole.tar" => Outcome::SameAsGnuTar,
    // Go and BSD tar refuse a NUL in a PAX path (GNU tar truncates): we follow Go.
    go_pax_nul_path: "pax-nul-path.tar" => Outcome::Refused("NUL"),
    go_pax_nul_xattrs: "pax-nul-xattrs.tar" => Outcome::Refused("NUL"),
    // A PAX header with no member after it: Go answers ErrUnexpectedEOF.
    go_pax_path_hdr: "pax-path-hdr.tar" => Outcome::Refused("describe no member"),
    go_pax_pos_size_file: "pax-pos-size-file.tar" => Outcome::SameAsGnuTar,
    go_pax_records: "pax-records.tar" => Outcome::SameAsGnuTar,
    go_pax: "pax.tar" => Outcome::SameAsGnuTar,
    go_sparse_formats: "sparse-formats.tar" => Outcome::Md5(&[
        ("sparse-gnu", "6f53234398c2449fe67c1812d993012f"),
        ("sparse-posix-0.0", "6f53234398c2449fe67c1812d993012f"),
        ("sparse-posix-0.1", "6f53234398c2449fe67c1812d993012f"),
        ("sparse-posix-1.0", "6f53234398c2449fe67c1812d993012f"),
        ("end", "b0061974914468de549a2af8ced10316"),
    ]),
    go_star: "star.tar" => Outcome::SameAsGnuTar,
    go_trailing_slash: "trailing-slash.tar" => Outcome::SameAsGnuTar,
    go_ustar_file_devs: "ustar-file-devs.tar" => Outcome::SameAsGnuTar,
    go_ustar_file_reg: "ustar-file-reg.tar" => Outcome::SameAsGnuTar,
    go_ustar: "ustar.tar" => Outcome::SameAsGnuTar,
    go_v7: "v7.tar" => Outcome::SameAsGnuTar,
    // Headers of 16 GiB files whose data Go's writer test never wrote: truncated.
    go_writer_big_long: "writer-big-long.tar" => Outcome::Refused("truncated"),
    go_writer_big: "writer-big.tar" => Outcome::Refused("truncated"),
    go_writer: "writer.tar" => Outcome::SameAsGnuTar,
    go_xattrs: "xattrs.tar" => Outcome::SameAsGnuTar,
}

#[test]
fn go_gnu_sparse_big() {
    let Some(dir) = corpus_dir_or_skip(GO_TESTDATA) else {
        return;
    };
    check_big_sparse(&dir.join("gnu-sparse-big.tar"), "gnu-sparse").unwrap();
}

#[test]
fn go_pax_sparse_big() {
    let Some(dir) = corpus_dir_or_skip(GO_TESTDATA) else {
        return;
    };
    check_big_sparse(&dir.join("pax-sparse-big.tar"), "pax-sparse").unwrap();
}

#[test]
fn every_go_archive_has_a_stated_outcome() {
    let Some(dir) = corpus_dir_or_skip(GO_TESTDATA) else {
        return;
    };
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let archive = name.ends_with(".tar") || name.ends_with(".tar.bz2");
        let big = name.ends_with("-sparse-big.tar");
        if archive && !big && !GO_FILES.contains(&name.as_str()) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "archives without a stated outcome: {missing:?}"
    );
}

#[test]
fn python_testtar() {
    let Some(p) = corpus_dir_or_skip(PY_TESTTAR) else {
        return;
    };
    check(&p, &Outcome::SameAsGnuTar).unwrap();
}
