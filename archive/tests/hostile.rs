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
