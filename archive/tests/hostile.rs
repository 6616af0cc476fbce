//! Hostile layers: every attempt to reach outside the target fails or lands inside it, the host
//! file aimed at is untouched, and errors name the entry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use apply_util::{Sandbox, Tb};
use archive::{ApplyOptions, Error, apply_layer};
use tar::EntryType;

fn apply(s: &Sandbox, tar: &[u8]) -> archive::Result<u64> {
    apply_layer(&s.dest(), tar, &ApplyOptions::default())
}

fn assert_bad_entry(err: &Error, name: &str) {
    assert!(
        matches!(err, Error::BadEntry { entry, .. } if entry == name),
        "expected BadEntry naming {name:?}, found {err}"
    );
    assert!(err.to_string().contains(name), "{err}");
}

#[test]
fn dotdot_names_are_refused() {
    for name in ["../victim", "a/../../victim", "./../host/victim"] {
        let s = Sandbox::new();
        let tar = Tb::new().file(name, b"pwned").finish();
        assert_bad_entry(&apply(&s, &tar).unwrap_err(), name);
        s.assert_host_untouched();
    }
}

#[test]
fn absolute_names_land_inside() {
    let s = Sandbox::new();
    let abs = format!("{}/victim", s.host().display());
    let tar = Tb::new().file(&abs, b"pwned").finish();
    apply(&s, &tar).unwrap();
    s.assert_host_untouched();
    assert_eq!(
        std::fs::read(s.dest().join(abs.trim_start_matches('/'))).unwrap(),
        b"pwned"
    );
}

#[test]
fn write_through_planted_symlink_stays_inside() {
    for target in [
        "HOST".to_string(),
        "../host".to_string(),
        "../../../../../HOST".to_string(),
    ] {
        let s = Sandbox::new();
        let target = target.replace("HOST", &s.host().display().to_string());
        let tar = Tb::new()
            .symlink("a", &target)
            .file("a/victim", b"pwned")
            .file("a/new", b"pwned")
            .finish();
        // The symlink resolves with dest as `/`, where its target does not exist: the write
        // through it is refused (we do not create directories through a dangling symlink).
        let err = apply(&s, &tar).unwrap_err();
        assert!(err.to_string().contains("\"a/victim\""), "{err}");
        s.assert_host_untouched();
        // With the target present inside dest, the write lands there.
        let s = Sandbox::new();
        let inside = s.dest().join(
            target
                .trim_start_matches("../")
                .trim_start_matches('/')
                .replace("../", ""),
        );
        std::fs::create_dir_all(&inside).unwrap();
        apply(&s, &tar).unwrap();
        s.assert_host_untouched();
        assert_eq!(
            std::fs::read(inside.join("victim")).unwrap(),
            b"pwned",
            "{target}"
        );
    }
}

#[test]
fn symlink_chains_stay_inside() {
    let s = Sandbox::new();
    let host = s.host().display().to_string();
    let tar = Tb::new()
        .symlink("l1", "l2")
        .symlink("l2", "../../..")
        .dir("l3")
        .symlink("l3/up", "../l1")
        .file(
            &format!("l3/up/{}/victim", host.trim_start_matches('/')),
            b"pwned",
        )
        .finish();
    apply(&s, &tar).unwrap();
    s.assert_host_untouched();
}

#[test]
fn hardlinks_to_outside_are_refused_or_inside() {
    let s = Sandbox::new();
    let tar = Tb::new().hardlink("h", "../victim").finish();
    assert_bad_entry(&apply(&s, &tar).unwrap_err(), "h");
    s.assert_host_untouched();

    // An absolute target resolves inside dest, where it does not exist.
    let s = Sandbox::new();
    let abs = format!("{}/victim", s.host().display());
    let tar = Tb::new().hardlink("h", &abs).finish();
    let err = apply(&s, &tar).unwrap_err();
    assert!(err.to_string().contains("\"h\""), "{err}");
    s.assert_host_untouched();
}

#[test]
fn hardlink_through_symlink_does_not_escape() {
    let s = Sandbox::new();
    let host = s.host().display().to_string();
    let tar = Tb::new()
        .symlink("s", &host)
        .hardlink("h", "s/victim")
        .finish();
    let err = apply(&s, &tar).unwrap_err();
    assert!(err.to_string().contains("\"h\""), "{err}");
    s.assert_host_untouched();

    // Hardlink to the symlink itself links the symlink, not its target; writing through the
    // link afterwards replaces it instead of writing the host file.
    let s = Sandbox::new();
    let victim = format!("{host}/victim").replace(&host, &s.host().display().to_string());
    let tar = Tb::new()
        .symlink("s", &victim)
        .hardlink("h", "s")
        .file("h", b"pwned")
        .finish();
    apply(&s, &tar).unwrap();
    assert!(
        std::fs::symlink_metadata(s.dest().join("s"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(s.dest().join("h")).unwrap(), b"pwned");
    s.assert_host_untouched();
}

#[test]
fn whiteout_pointing_outside() {
    for name in ["../.wh.victim", "../host/.wh.victim"] {
        let s = Sandbox::new();
        let tar = Tb::new().file(name, b"").finish();
        assert_bad_entry(&apply(&s, &tar).unwrap_err(), name);
        s.assert_host_untouched();
    }
    // Whiteout through a planted symlink deletes inside dest only.
    let s = Sandbox::new();
    let tar = Tb::new()
        .symlink("a", &s.host().display().to_string())
        .file("a/.wh.victim", b"")
        .finish();
    apply(&s, &tar).unwrap();
    s.assert_host_untouched();
    // Opaque marker through a symlink empties the resolved-inside dir only.
    let s = Sandbox::new();
    let tar = Tb::new()
        .symlink("a", "../host")
        .file("a/.wh..wh..opq", b"")
        .finish();
    apply(&s, &tar).unwrap();
    s.assert_host_untouched();
}

#[test]
fn truncated_tar_names_the_entry() {
    let s = Sandbox::new();
    let tar = Tb::new()
        .file("ok", b"fine")
        .file("cut", &[7u8; 4096])
        .finish();
    let err = apply(&s, &tar[..512 * 3 + 100]).unwrap_err();
    assert!(
        matches!(&err, Error::Malformed { entry: Some(e), .. } if e == "cut"),
        "{err}"
    );
    s.assert_host_untouched();
}

#[test]
fn bad_checksum_names_the_entry() {
    let s = Sandbox::new();
    let mut tar = Tb::new().file("ok", b"fine").file("evil", b"x").finish();
    tar[1024 + 148] ^= 1;
    let err = apply(&s, &tar).unwrap_err();
    assert!(
        matches!(&err, Error::Malformed { entry: Some(e), .. } if e == "evil"),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn huge_size_header_is_malformed() {
    let s = Sandbox::new();
    let mut tb = Tb::new();
    let mut tar = tb
        .entry(EntryType::Regular, "huge", 0o644, (0, 0), 1, None, b"abc")
        .finish();
    // Rewrite the size field to 2^40 - 1 bytes with a valid checksum.
    let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
    h.set_size((1u64 << 40) - 1);
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    let err = apply(&s, &tar).unwrap_err();
    assert!(
        matches!(&err, Error::Malformed { entry: Some(e), .. } if e == "huge"),
        "{err}"
    );
    let mut o = ApplyOptions::default();
    o.max_bytes = Some(1 << 30);
    let err = apply_layer(&s.dest(), &tar[..], &o).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
}

#[test]
fn lying_pax_records() {
    let s = Sandbox::new();
    let tar = Tb::new()
        .pax(&[("path", b"../victim")])
        .file("innocent", b"pwned")
        .finish();
    assert_bad_entry(&apply(&s, &tar).unwrap_err(), "../victim");
    s.assert_host_untouched();
    let s = Sandbox::new();
    let tar = Tb::new()
        .pax(&[("mtime", b"soon")])
        .file("f", b"x")
        .finish();
    assert!(
        matches!(apply(&s, &tar).unwrap_err(), Error::Malformed { entry: Some(ref e), .. } if e == "f")
    );
}

/// A PAX sparse member `s` described by `recs` whose stored data is `data`.
fn pax_sparse(recs: &[(&str, &[u8])], data: &[u8]) -> Vec<u8> {
    let mut all: Vec<(&str, &[u8])> = vec![("GNU.sparse.name", b"s")];
    all.extend_from_slice(recs);
    Tb::new().pax(&all).file("GNUSparseFile.1/s", data).finish()
}

fn assert_malformed(err: &Error, name: &str, what: &str) {
    assert!(
        matches!(err, Error::Malformed { entry: Some(e), .. } if e == name),
        "expected Malformed naming {name:?}, found {err}"
    );
    assert!(err.to_string().contains(what), "{err}");
}

#[test]
fn lying_pax_sparse_maps() {
    let v01: [(&str, &[u8]); 2] = [("GNU.sparse.major", b"0"), ("GNU.sparse.minor", b"1")];
    let cases: [(&[u8], &[u8], u64, &str); 5] = [
        (b"0,10,5,10", b"100", 20, "overlaps"),
        (b"50,5,0,5", b"100", 10, "precedes"),
        (b"90,20", b"100", 20, "beyond the real size"),
        (
            b"0,10",
            b"100",
            20,
            "lists 10 data bytes, but the entry stores 20",
        ),
        (b"0,10,5", b"100", 15, "even count"),
    ];
    for (map, size, stored, what) in cases {
        let s = Sandbox::new();
        let mut recs = v01.to_vec();
        recs.push(("GNU.sparse.size", size));
        recs.push(("GNU.sparse.map", map));
        let tar = pax_sparse(&recs, &vec![b'd'; stored as usize]);
        assert_malformed(&apply(&s, &tar).unwrap_err(), "s", what);
        s.assert_host_untouched();
    }
    // 0.0: offset without numbytes, numblocks that lie, a map with a huge offset.
    let s = Sandbox::new();
    let tar = pax_sparse(
        &[
            ("GNU.sparse.size", b"100"),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.offset", b"0"),
            ("GNU.sparse.numbytes", b"4"),
        ],
        b"dddd",
    );
    assert_malformed(&apply(&s, &tar).unwrap_err(), "s", "numblocks");
    let tar = pax_sparse(
        &[("GNU.sparse.size", b"100"), ("GNU.sparse.offset", b"0")],
        b"",
    );
    assert_malformed(&apply(&s, &tar).unwrap_err(), "s", "numbytes");
    let tar = pax_sparse(
        &[
            ("GNU.sparse.size", b"100"),
            ("GNU.sparse.offset", b"18446744073709551615"),
            ("GNU.sparse.numbytes", b"4"),
        ],
        b"dddd",
    );
    assert_malformed(&apply(&s, &tar).unwrap_err(), "s", "beyond the real size");
    // An unknown version is refused, not guessed at.
    let tar = pax_sparse(
        &[("GNU.sparse.major", b"2"), ("GNU.sparse.minor", b"0")],
        b"",
    );
    assert_bad_entry(&apply(&s, &tar).unwrap_err(), "s");
}

/// A 1.0 sparse member: `map_text` padded to 512 bytes, then `data`.
fn sparse_1_0(real: &[u8], map_text: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = map_text.to_vec();
    body.resize(map_text.len().div_ceil(512) * 512, 0);
    body.extend_from_slice(data);
    pax_sparse(
        &[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.realsize", real),
        ],
        &body,
    )
}

#[test]
fn lying_sparse_1_0_maps() {
    let s = Sandbox::new();
    // A correct one first: holes around "abc".
    let tar = sparse_1_0(b"4096", b"2\n100\n3\n4096\n0\n", b"abc");
    assert_eq!(apply(&s, &tar).unwrap(), 4096);
    let got = std::fs::read(s.dest().join("s")).unwrap();
    assert_eq!(got.len(), 4096);
    assert_eq!(&got[100..103], b"abc");
    assert!(got[..100].iter().chain(&got[103..]).all(|&b| b == 0));

    // A map text filling its block exactly, wanting more numbers than the entry holds.
    let mut full_block = b"300\n".to_vec();
    for _ in 0..254 {
        full_block.extend_from_slice(b"0\n");
    }
    assert_eq!(full_block.len(), 512);
    let cases: [(&[u8], &[u8], &str); 6] = [
        // More segments than allowed: refused before any allocation.
        (b"99999999999\n", b"", "more than"),
        // The map claims more numbers than it holds.
        (b"3\n0\n1\n", b"", "before all its numbers"),
        // ... and than the data holds.
        (&full_block, b"", "runs past"),
        (b"1\nten\n3\n", b"abc", "decimal number"),
        (b"1\n4095\n3\n", b"abc", "beyond the real size"),
        (
            b"1\n0\n2\n",
            b"abc",
            "lists 2 data bytes, but the entry stores 3",
        ),
    ];
    for (map, data, what) in cases {
        let s = Sandbox::new();
        let tar = sparse_1_0(b"4096", map, data);
        assert_malformed(&apply(&s, &tar).unwrap_err(), "s", what);
    }
    // The real size counts against max_bytes: a terabyte of holes is a bomb too.
    let s = Sandbox::new();
    let tar = sparse_1_0(b"1099511627776", b"1\n0\n3\n", b"abc");
    let mut o = ApplyOptions::default();
    o.max_bytes = Some(1 << 30);
    let err = apply_layer(&s.dest(), &tar[..], &o).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
}

#[test]
fn sparse_name_cannot_escape() {
    let s = Sandbox::new();
    let tar = Tb::new()
        .pax(&[
            ("GNU.sparse.name", b"../victim"),
            ("GNU.sparse.size", b"5"),
            ("GNU.sparse.map", b"0,5"),
        ])
        .file("GNUSparseFile.1/innocent", b"pwned")
        .finish();
    assert_bad_entry(&apply(&s, &tar).unwrap_err(), "../victim");
    s.assert_host_untouched();
}

#[test]
fn lying_old_gnu_sparse_map() {
    // An old-GNU 'S' member whose two segments overlap.
    let mut h = tar::Header::new_gnu();
    h.set_path("s").unwrap();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(8);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(100);
    gnu.sparse[0].set_offset(0);
    gnu.sparse[0].set_length(4);
    gnu.sparse[1].set_offset(2);
    gnu.sparse[1].set_length(4);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[b'd'; 512]);
    tar.extend_from_slice(&[0; 1024]);
    let s = Sandbox::new();
    assert_malformed(&apply(&s, &tar).unwrap_err(), "s", "overlaps");
    // The same member with a correct map lands with its hole.
    let gnu = h.as_gnu_mut().unwrap();
    gnu.sparse[1].set_offset(50);
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    let s = Sandbox::new();
    assert_eq!(apply(&s, &tar).unwrap(), 100);
    let got = std::fs::read(s.dest().join("s")).unwrap();
    let mut want = vec![0u8; 100];
    want[..4].copy_from_slice(b"dddd");
    want[50..54].copy_from_slice(b"dddd");
    assert_eq!(got, want);
}

#[test]
fn lying_pax_lengths_are_malformed() {
    // A record that claims to be longer than the header's data, then one that claims to be
    // shorter than its own text: both name the member they describe.
    for raw in [&b"99 path=x\n"[..], &b"6 path=somewhere\n"[..]] {
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/f").unwrap();
        h.set_entry_type(EntryType::XHeader);
        h.set_size(raw.len() as u64);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(raw);
        tar.resize(512 * 2, 0);
        tar.extend_from_slice(&Tb::new().file("f", b"x").finish());
        let s = Sandbox::new();
        assert_malformed(&apply(&s, &tar).unwrap_err(), "f", "PAX record");
    }
}
