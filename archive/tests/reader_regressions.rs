//! Hand-made archives for every reader difference issue 13 lists (what Go's `archive/tar`, GNU
//! tar and Python read, and we once refused or read wrongly). Each archive is built block by
//! block here, so the test says exactly which bytes it is about.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use archive::{ApplyOptions, apply_layer, decompress};

/// A header block with the given name, type flag, size and magic/version; every numeric field
/// octal unless the caller overwrites it; checksum set last by [`seal`].
fn block(name: &str, flag: u8, size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..108].copy_from_slice(b"0000644\0");
    b[108..116].copy_from_slice(b"0000000\0");
    b[116..124].copy_from_slice(b"0000000\0");
    b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[136..148].copy_from_slice(b"14500000000\0");
    b[156] = flag;
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b
}

/// Sets the (unsigned) checksum.
fn seal(mut b: [u8; 512]) -> [u8; 512] {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    b
}

fn data(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().div_ceil(512) * 512, 0);
    v
}

fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let base = k.len() + v.len() + 3;
        let mut len = base + 1;
        while len != base + len.to_string().len() {
            len = base + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}={v}\n").as_bytes());
    }
    out
}

fn archive(parts: &[&[u8]]) -> Vec<u8> {
    let mut v: Vec<u8> = parts.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

fn apply(tar: &[u8]) -> (tempfile::TempDir, archive::Result<u64>) {
    let t = tempfile::tempdir().unwrap();
    let mut opts = ApplyOptions::default();
    opts.same_owner = rustix::process::geteuid().is_root();
    let res = decompress(tar).and_then(|r| apply_layer(t.path(), r, &opts));
    (t, res)
}

fn read(root: &Path, p: &str) -> Vec<u8> {
    fs::read(root.join(p)).unwrap()
}

#[test]
fn data_less_types_with_a_size_do_not_swallow_the_next_header() {
    // A symlink whose size field claims 512 bytes, then a regular file: Go, GNU tar and Python
    // read the size of a symlink as 0, so the file's header follows at once.
    let mut link = block("link", b'2', 512);
    link[157..163].copy_from_slice(b"target");
    let tar = archive(&[&seal(link), &seal(block("file", b'0', 5)), &data(b"hello")]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(
        fs::read_link(t.path().join("link")).unwrap(),
        Path::new("target")
    );
    assert_eq!(read(t.path(), "file"), b"hello");
}

#[test]
fn v7_directories_are_directories() {
    let mut dir = block("olddir/", 0, 0);
    dir[257..265].fill(0);
    let tar = archive(&[&seal(dir), &seal(block("olddir/f", b'0', 1)), &data(b"x")]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert!(t.path().join("olddir").is_dir());
    assert_eq!(read(t.path(), "olddir/f"), b"x");
}

#[test]
fn the_ustar_prefix_counts_whatever_the_version_field_says() {
    // containers/storage's TestUntarUstarGnuConflict: magic `ustar\0` with version ` \0`.
    let mut b = block("file", b'0', 2);
    b[263..265].copy_from_slice(b" \0");
    b[345..350].copy_from_slice(b"a/b/c");
    let tar = archive(&[&seal(b), &data(b"hi")]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "a/b/c/file"), b"hi");
    assert!(!t.path().join("file").exists());
}

#[test]
fn empty_and_nul_numeric_fields_read_as_zero() {
    let mut b = block("f", b'0', 1);
    b[108..116].copy_from_slice(b"        "); // uid: spaces
    b[116..124].fill(0); // gid: NULs
    // mtime with leading NULs
    b[136..148].copy_from_slice(&[[0u8; 4].as_slice(), b"14500000"].concat());
    let tar = archive(&[&seal(b), &data(b"z")]);
    let (t, res) = apply(&tar);
    res.unwrap();
    let md = fs::metadata(t.path().join("f")).unwrap();
    if rustix::process::geteuid().is_root() {
        assert_eq!((md.uid(), md.gid()), (0, 0));
    }
    assert_eq!(md.mtime(), 0o14500000);
}

#[test]
fn a_pax_size_with_leading_zeros_is_a_size() {
    let p = pax(&[("size", "0000000000000000000000000007")]);
    let tar = archive(&[
        &seal(block("PaxHeaders/f", b'x', p.len() as u64)),
        &data(&p),
        &seal(block("f", b'0', 0)),
        &data(b"seven!!"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "f"), b"seven!!");
}

#[test]
fn a_gnu_long_name_ends_at_its_first_nul() {
    let long = b"short-name\0garbage after the NUL";
    let mut l = block("././@LongLink", b'L', long.len() as u64);
    l[257..265].copy_from_slice(b"ustar  \0");
    let tar = archive(&[
        &seal(l),
        &data(long),
        &seal(block("ignored", b'0', 1)),
        &data(b"1"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "short-name"), b"1");
}

#[test]
fn signed_header_checksums_are_accepted() {
    // A name with bytes above 0x7f: the signed sum differs from the unsigned one.
    let mut b = block("caf\u{e9}", b'0', 1);
    b[148..156].fill(b' ');
    let signed: i32 = b.iter().map(|&x| i32::from(x as i8)).sum();
    b[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
    let tar = archive(&[&b, &data(b"s")]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "caf\u{e9}"), b"s");
}

#[test]
fn the_last_of_several_extension_headers_wins() {
    let (n1, n2) = (b"first-name\0".to_vec(), b"second-name\0".to_vec());
    let gnu = |flag, len: usize| {
        let mut l = block("././@LongLink", flag, len as u64);
        l[257..265].copy_from_slice(b"ustar  \0");
        seal(l)
    };
    let p1 = pax(&[("path", "pax-one")]);
    let p2 = pax(&[("path", "pax-two")]);
    let tar = archive(&[
        &gnu(b'L', n1.len()),
        &data(&n1),
        &gnu(b'L', n2.len()),
        &data(&n2),
        &seal(block("x", b'0', 1)),
        &data(b"g"),
        &seal(block("p1", b'x', p1.len() as u64)),
        &data(&p1),
        &seal(block("p2", b'x', p2.len() as u64)),
        &data(&p2),
        &seal(block("y", b'0', 1)),
        &data(b"p"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "second-name"), b"g");
    assert_eq!(read(t.path(), "pax-two"), b"p");
    for gone in ["first-name", "pax-one", "x", "y"] {
        assert!(!t.path().join(gone).exists(), "{gone}");
    }
}

#[test]
fn solaris_extended_headers_are_pax_headers() {
    let p = pax(&[("path", "from-solaris")]);
    let tar = archive(&[
        &seal(block("X", b'X', p.len() as u64)),
        &data(&p),
        &seal(block("short", b'0', 2)),
        &data(b"ok"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "from-solaris"), b"ok");
}

#[test]
fn a_gnu_dumpdir_is_a_directory() {
    let listing = b"Yfoo\0\0";
    let mut d = block("inc/", b'D', listing.len() as u64);
    d[257..265].copy_from_slice(b"ustar  \0");
    let tar = archive(&[
        &seal(d),
        &data(listing),
        &seal(block("inc/foo", b'0', 3)),
        &data(b"foo"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert!(t.path().join("inc").is_dir());
    assert_eq!(read(t.path(), "inc/foo"), b"foo");
}

#[test]
fn a_zstd_stream_may_start_with_a_skippable_frame() {
    let tar = archive(&[&seal(block("z", b'0', 4)), &data(b"zstd")]);
    let mut stream = vec![0x5a, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, b'm', b'e', b't'];
    stream.extend(zstd::encode_all(tar.as_slice(), 3).unwrap());
    let (t, res) = apply(&stream);
    res.unwrap();
    assert_eq!(read(t.path(), "z"), b"zstd");
}

#[test]
fn pre_1970_mtimes_are_applied() {
    // Base-256 -86400 (one day before the epoch) in the header, and a negative PAX mtime.
    let mut b = block("old", b'0', 1);
    let mut field = [0xffu8; 12];
    field[8..].copy_from_slice(&(-86400i32).to_be_bytes());
    b[136..148].copy_from_slice(&field);
    let p = pax(&[("mtime", "-1000000000.5")]);
    let tar = archive(&[
        &seal(b),
        &data(b"o"),
        &seal(block("PaxHeaders/older", b'x', p.len() as u64)),
        &data(&p),
        &seal(block("older", b'0', 1)),
        &data(b"p"),
    ]);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(fs::metadata(t.path().join("old")).unwrap().mtime(), -86400);
    let md = fs::metadata(t.path().join("older")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (-1_000_000_001, 500_000_000));
}

#[test]
fn a_negative_size_is_refused_naming_the_entry() {
    let mut b = block("neg", b'0', 0);
    let mut field = [0xffu8; 12];
    field[11] = 0xfe;
    b[124..136].copy_from_slice(&field);
    let (_t, res) = apply(&archive(&[&seal(b)]));
    let e = res.unwrap_err().to_string();
    assert!(e.contains("\"neg\"") && e.contains("size"), "{e}");
}

/// An xz stream whose only block asks for a 1 GiB LZMA2 dictionary (a 164 KiB file can): the
/// decoder refuses it at its memory limit instead of allocating it.
#[test]
fn an_xz_dictionary_bomb_is_refused_before_it_allocates() {
    fn crc32(b: &[u8]) -> [u8; 4] {
        let mut c = flate2::Crc::new();
        c.update(b);
        c.sum().to_le_bytes()
    }
    let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0, 0, 1];
    xz.extend_from_slice(&crc32(&[0, 1]));
    // Block header: size (12/4 - 1), flags (one filter), LZMA2 (0x21), 1 property byte:
    // 36 = a 2^30-byte dictionary; padding, CRC32.
    let hdr = [2u8, 0, 0x21, 1, 36, 0, 0, 0];
    xz.extend_from_slice(&hdr);
    xz.extend_from_slice(&crc32(&hdr));
    // An uncompressed LZMA2 chunk, which still makes the decoder set up its dictionary.
    xz.extend_from_slice(&[1, 0, 3, b'a', b'b', b'c', b'd', 0]);
    xz.resize(4096, 0);
    let (_t, res) = apply(&xz);
    let e = res.unwrap_err().to_string();
    assert!(e.contains("memory"), "{e}");
}

/// An endless stream of zeros (`graphctl apply ID /dev/zero`) ends at the end-of-archive
/// marker; what follows is drained only up to a bound, then refused instead of read forever.
#[test]
fn an_endless_stream_after_the_end_marker_is_refused_not_read_forever() {
    struct Zeros;
    impl std::io::Read for Zeros {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(0);
            Ok(buf.len())
        }
    }
    let t = tempfile::tempdir().unwrap();
    let e = apply_layer(t.path(), Zeros, &ApplyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("end-of-archive marker"), "{e}");
    // GNU tar's record padding (up to 10 KiB of zeros) is fine.
    let mut tar = archive(&[&seal(block("f", b'0', 1)), &data(b"x")]);
    tar.resize(tar.len() + 10240, 0);
    let (t, res) = apply(&tar);
    res.unwrap();
    assert_eq!(read(t.path(), "f"), b"x");
}

/// Export writes what the reader reads back: a pre-1970 mtime becomes a PAX `mtime` record
/// (as Go writes it), which our apply and GNU tar both restore; it was exported as 1970-01-01.
#[test]
fn pre_1970_mtimes_survive_export() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("old"), b"o").unwrap();
    let t = filetime::FileTime::from_unix_time(-86_400 * 365, 0);
    filetime::set_file_mtime(src.path().join("old"), t).unwrap();
    let mut tar = Vec::new();
    std::io::Read::read_to_end(
        &mut archive::tar_tree(src.path(), &archive::TarOptions::default()).unwrap(),
        &mut tar,
    )
    .unwrap();
    let (ours, res) = apply(&tar);
    res.unwrap();
    assert_eq!(
        fs::metadata(ours.path().join("old")).unwrap().mtime(),
        -86_400 * 365
    );
    let gnu = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg("-")
        .arg("-C")
        .arg(gnu.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(c.stdin.as_mut().unwrap(), &tar)?;
            drop(c.stdin.take());
            c.wait()
        })
        .unwrap();
    assert!(st.success());
    assert_eq!(
        fs::metadata(gnu.path().join("old")).unwrap().mtime(),
        -86_400 * 365
    );
}
