//! What older kernels change, end to end. CI runs this module under every kernel profile
//! (`cargo xtask kernel-profile VERSION -- cargo nextest run ...`, which sets
//! `GRAPHDRIVER_KERNEL_PROFILE`); without a profile it checks the new kernel's answers.

use crate::util::Store;

/// The kernel profile the tests run under, if any.
fn profile() -> Option<(u32, u32)> {
    let v = std::env::var("GRAPHDRIVER_KERNEL_PROFILE").ok()?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A layer with `trusted.*` xattrs on a directory, a symlink and a FIFO, and a hardlink.
fn xattr_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let value = format!("v-{name}");
        b.append_pax_extensions([("SCHILY.xattr.trusted.t", value.as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    };
    add("d", tar::EntryType::Directory, None, b"");
    add("d/f", tar::EntryType::Regular, None, b"data");
    add("d/l", tar::EntryType::Symlink, Some("f"), b"");
    add("d/fifo", tar::EntryType::Fifo, None, b"");
    b.into_inner().unwrap()
}

/// The `trusted.t` values of every entry of a tar, by name.
fn xattrs_in(tar: &[u8]) -> Vec<(String, String)> {
    let mut a = tar::Archive::new(tar);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if x.key().unwrap() == "SCHILY.xattr.trusted.t" {
                    out.push((
                        name.clone(),
                        String::from_utf8_lossy(x.value_bytes()).into(),
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

driver_test!(xattrs_on_symlinks_and_fifos_apply_and_diff, |driver| {
    if crate::util::skip_root_test().is_some() {
        eprintln!("skipping: trusted.* xattrs need root");
        return;
    }
    let s = Store::new(driver);
    let layer = s.scratch("x.tar");
    std::fs::write(&layer, xattr_layer()).unwrap();
    s.ok(&["apply", "x", layer.to_str().unwrap()]);
    let out = s.scratch("out.tar");
    s.ok(&["diff", "x", "-o", out.to_str().unwrap()]);
    let want: Vec<(String, String)> = ["d", "d/f", "d/fifo", "d/l"]
        .iter()
        .map(|n| (n.to_string(), format!("v-{n}")))
        .collect();
    assert_eq!(xattrs_in(&std::fs::read(out).unwrap()), want);
});

driver_test!(status_names_the_fallbacks_in_use, |driver| {
    let s = Store::new(driver);
    let text = s.ok(&["status"]);
    let line = |call: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("Syscall {call}: ")))
            .unwrap_or_else(|| panic!("no {call} line in {text}"))
            .to_string()
    };
    let checks = [
        ("openat2", (5, 6), "O_NOFOLLOW walk"),
        ("close_range", (5, 9), "/proc/self/fd"),
        ("fchmodat2", (6, 6), "fchdir"),
        ("setxattrat/getxattrat/listxattrat", (6, 13), "fchdir"),
    ];
    for (call, since, how) in checks {
        let l = line(call);
        match profile() {
            Some(p) if p < since => assert!(l.contains(": no (") && l.contains(how), "{l}"),
            Some(_) => assert!(l.ends_with(": yes"), "{l}"),
            None => assert!(l.ends_with(": yes") || l.contains(how), "{l}"),
        }
    }
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "status"])).unwrap();
    assert_eq!(v["syscalls"].as_array().unwrap().len(), 4);
});
