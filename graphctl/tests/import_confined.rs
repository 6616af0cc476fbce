//! Import follows the image, not just its files (issue 13): nothing outside the image is read
//! (symlinked blobs and layer paths, `/dev/zero`, FIFOs), blobs are read up to their declared
//! size, existing layers are reused only when their recorded DiffID matches, and `PATH:TAG`
//! selects one image of several.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use graphdriver_image::test_util::{
    BuiltImage, Layer, OciLayoutBuilder, sha256_hex as sha256, tar_dir,
};
use serde_json::Value;

use crate::import::{copy_sample, top_layer_blob};
use crate::util::{Store, TestCommand, layer_tar};

const CANARY: &[u8] = b"CANARY-7f3e-host-secret";

/// A host file outside every image: a valid layer tar holding the canary, so that following a
/// link to it would import it.
fn host_file(s: &Store) -> (PathBuf, String) {
    let path = s.scratch("host-secret.tar");
    let data = layer_tar(&[("secret", CANARY)]);
    fs::write(&path, &data).unwrap();
    (path, sha256(&data))
}

/// Asserts that neither the canary nor the host file's digest appears in `text`.
fn no_leak(text: &str, host_digest: &str) {
    assert!(
        !text.contains(std::str::from_utf8(CANARY).unwrap()),
        "canary leaked: {text}"
    );
    assert!(!text.contains(host_digest), "host digest leaked: {text}");
}

/// Runs `cmd` to completion, killing it (and failing) if it is still running after a generous
/// deadline: a blob that never ends must not hang the suite.
fn run_with_deadline(cmd: TestCommand) -> (i32, String) {
    let mut cmd = cmd.cmd;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("import still running after 120 s: it is reading a blob that never ends");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes an image of uncompressed `layers` into the OCI layout `dir` (named `name` in its
/// `index.json`, if given); returns its layer ids (chain ids, hex).
fn put_image(dir: &Path, layers: &[Vec<u8>], name: Option<&str>) -> Vec<String> {
    let mut b = OciLayoutBuilder::new().plain_layers(layers);
    if let Some(n) = name {
        b = b.ref_name(n);
    }
    b.write_oci(dir).unwrap().layer_ids()
}

/// A `docker save` directory (legacy layout) of one image `small:latest` with `layers`, its
/// config named `config_name`; returns the directory and what was written.
fn docker_dir(parent: &Path, layers: &[Vec<u8>], config_name: &str) -> (PathBuf, BuiltImage) {
    let dir = parent.join("docker-dir");
    let built = OciLayoutBuilder::new()
        .plain_layers(layers)
        .config_name(config_name)
        .repo_tag("small:latest")
        .write_docker_save(&dir)
        .unwrap();
    (dir, built)
}

fn small_layers() -> Vec<Vec<u8>> {
    vec![
        layer_tar(&[("etc/", b""), ("etc/one", b"1")]),
        layer_tar(&[("etc/two", b"2")]),
    ]
}

#[test]
fn oci_blob_symlinked_out_of_the_image_is_refused() {
    let s = Store::new("vfs");
    let (host, host_digest) = host_file(&s);
    let img = copy_sample(s.dir.path());
    let blob = top_layer_blob(&img);
    fs::remove_file(&blob).unwrap();
    symlink(&host, &blob).unwrap();
    let (code, stderr) = run_with_deadline(s.cmd(&["import", img.to_str().unwrap()]));
    assert_eq!(code, 1, "{stderr}");
    let name = format!(
        "blobs/sha256/{}",
        blob.file_name().unwrap().to_str().unwrap()
    );
    assert!(
        stderr.contains(&name) && stderr.contains("leaves the image"),
        "{stderr}"
    );
    no_leak(&stderr, &host_digest);
    assert_eq!(s.ok(&["ls"]), "", "a failed import left layers behind");
    // A relative link out (../../..) is refused the same way.
    fs::remove_file(&blob).unwrap();
    symlink("../../../host-secret.tar", &blob).unwrap();
    let msg = s.err(&["import", img.to_str().unwrap()]);
    assert!(
        msg.contains(&name) && msg.contains("leaves the image"),
        "{msg}"
    );
    no_leak(&msg, &host_digest);
    // So is a symlinked directory on the way.
    let blobs = img.join("blobs");
    fs::rename(&blobs, s.scratch("moved-blobs")).unwrap();
    symlink(s.scratch("moved-blobs"), &blobs).unwrap();
    let msg = s.err(&["import", img.to_str().unwrap()]);
    assert!(
        msg.contains("blobs") && msg.contains("leaves the image"),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "");
}

#[test]
fn oci_blob_linked_inside_the_image_is_read() {
    // A link that stays inside the image is only another name for a blob of the image; its
    // digest is checked as always.
    let s = Store::new("vfs");
    let img = copy_sample(s.dir.path());
    let blob = top_layer_blob(&img);
    let elsewhere = img.join("moved-blob");
    fs::rename(&blob, &elsewhere).unwrap();
    symlink("../../moved-blob", &blob).unwrap();
    s.ok(&["import", img.to_str().unwrap()]);
}

#[test]
fn docker_dir_layer_symlinked_out_of_the_image_is_refused() {
    let s = Store::new("vfs");
    let (host, host_digest) = host_file(&s);
    let layers = small_layers();
    let (dir, built) = docker_dir(s.dir.path(), &layers, "config.json");
    let (paths, ids) = (&built.layer_paths, built.layer_ids());
    // A layer shared with the layer before it, linked as docker save does: followed.
    let out = s.ok(&["import", dir.to_str().unwrap()]);
    assert_eq!(out.trim(), ids[1]);
    let s2 = Store::new("vfs");
    fs::remove_file(dir.join(&paths[1])).unwrap();
    symlink(&host, dir.join(&paths[1])).unwrap();
    let (code, stderr) = run_with_deadline(s2.cmd(&["import", dir.to_str().unwrap()]));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&paths[1]) && stderr.contains("leaves the image"),
        "{stderr}"
    );
    no_leak(&stderr, &host_digest);
    assert_eq!(s2.ok(&["ls"]), "");
    // The config too.
    fs::remove_file(dir.join(&paths[1])).unwrap();
    fs::write(dir.join(&paths[1]), &layers[1]).unwrap();
    fs::rename(dir.join("config.json"), s.scratch("config.json")).unwrap();
    symlink(s.scratch("config.json"), dir.join("config.json")).unwrap();
    let msg = s2.err(&["import", dir.to_str().unwrap()]);
    assert!(
        msg.contains("config.json") && msg.contains("leaves the image"),
        "{msg}"
    );
    // And manifest.json, and an index.json next to it.
    for name in ["manifest.json", "index.json"] {
        let _ = fs::remove_file(dir.join(name));
        symlink(&host, dir.join(name)).unwrap();
        let msg = s2.err(&["import", dir.to_str().unwrap()]);
        assert!(
            msg.contains(name) && msg.contains("leaves the image"),
            "{msg}"
        );
        no_leak(&msg, &host_digest);
    }
    assert_eq!(s2.ok(&["ls"]), "");
}

#[test]
fn docker_dir_repeated_layer_linked_inside_is_followed() {
    let s = Store::new("vfs");
    let layers = small_layers();
    let (dir, built) = docker_dir(s.dir.path(), &layers, "config.json");
    let (paths, ids) = (&built.layer_paths, built.layer_ids());
    // Move layer 1 and link its path to the new place inside the image.
    fs::create_dir_all(dir.join("shared")).unwrap();
    fs::rename(dir.join(&paths[1]), dir.join("shared/layer.tar")).unwrap();
    symlink("../shared/layer.tar", dir.join(&paths[1])).unwrap();
    assert_eq!(s.ok(&["import", dir.to_str().unwrap()]).trim(), ids[1]);
}

#[test]
fn dev_zero_and_fifo_blobs_are_refused_without_reading() {
    let s = Store::new("vfs");
    let img = copy_sample(s.dir.path());
    let blob = top_layer_blob(&img);
    let name = format!(
        "blobs/sha256/{}",
        blob.file_name().unwrap().to_str().unwrap()
    );
    fs::remove_file(&blob).unwrap();
    symlink("/dev/zero", &blob).unwrap();
    let (code, stderr) = run_with_deadline(s.cmd(&["import", img.to_str().unwrap()]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&name), "{stderr}");
    fs::remove_file(&blob).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(&blob)
        .status()
        .unwrap();
    assert!(st.success());
    let (code, stderr) = run_with_deadline(s.cmd(&["import", img.to_str().unwrap()]));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&name) && stderr.contains("FIFO"),
        "{stderr}"
    );
    assert_eq!(s.ok(&["ls"]), "");
}

#[test]
fn a_blob_longer_than_declared_is_refused() {
    let s = Store::new("vfs");
    let dir = s.dir.path().join("img");
    let layer = layer_tar(&[("a", b"a")]);
    // The layer blob stored longer than its descriptor, still under the digest's name.
    let hex = sha256(&layer);
    let mut longer = layer.clone();
    longer.extend_from_slice(&[0u8; 4096]);
    let built = OciLayoutBuilder::new()
        .layer(Layer::plain(layer.clone()).stored_as(longer.clone()))
        .write_oci(&dir)
        .unwrap();
    assert_eq!(built.layer_paths, [format!("blobs/sha256/{hex}")]);
    let msg = s.err(&["import", dir.to_str().unwrap()]);
    assert!(
        msg.contains(&format!("sha256:{hex}"))
            && msg.contains(&format!("declared size of {} bytes", layer.len()))
            && msg.contains(&longer.len().to_string()),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "");
}

#[test]
fn a_poisoned_chain_id_is_not_reused() {
    let s = Store::new("vfs");
    let dir = s.dir.path().join("img");
    let layers = small_layers();
    let ids = put_image(&dir, &layers, None);
    // Someone applies other content under the image's first chain id.
    let evil = s.scratch("evil.tar");
    fs::write(&evil, layer_tar(&[("etc/", b""), ("etc/one", b"evil")])).unwrap();
    s.ok(&["apply", &ids[0], evil.to_str().unwrap()]);
    let msg = s.err(&["import", dir.to_str().unwrap()]);
    let want = format!("sha256:{}", sha256(&layers[0]));
    assert!(
        msg.contains(&ids[0]) && msg.contains(&want) && msg.contains("exists with DiffID"),
        "{msg}"
    );
    assert_eq!(
        s.ok(&["ls"]),
        format!("{} -\n", ids[0]),
        "the import changed the store"
    );
    // Removed, the import goes through; imported again, every layer is reused.
    s.ok(&["rm", &ids[0]]);
    s.ok(&["import", dir.to_str().unwrap()]);
    let json: Value =
        serde_json::from_str(&s.ok(&["--json", "import", dir.to_str().unwrap()])).unwrap();
    assert!(
        json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["applied"] == false),
        "{json}"
    );
    // An imported layer is committed: content cannot be applied into it, so its record stands.
    let msg = s.err(&["apply", &ids[1], evil.to_str().unwrap()]);
    assert!(msg.contains(&ids[1]) && msg.contains("committed"), "{msg}");
    s.ok(&["import", dir.to_str().unwrap()]);
}

#[test]
fn apply_records_the_diff_id_import_reuses() {
    let s = Store::new("vfs");
    let dir = s.dir.path().join("img");
    let layers = small_layers();
    let ids = put_image(&dir, &layers, None);
    let l0 = s.scratch("l0.tar");
    fs::write(&l0, &layers[0]).unwrap();
    s.ok(&["apply", &ids[0], l0.to_str().unwrap()]);
    let json: Value =
        serde_json::from_str(&s.ok(&["--json", "import", dir.to_str().unwrap()])).unwrap();
    assert_eq!(json["layers"][0]["applied"], false, "{json}");
    assert_eq!(json["layers"][1]["applied"], true, "{json}");
}

#[test]
fn a_tag_selects_one_image_of_several() {
    let s = Store::new("vfs");
    let dir = s.dir.path().join("img");
    let ids_one = put_image(&dir, &small_layers()[..1], Some("one"));
    let ids_two = put_image(&dir, &[layer_tar(&[("two", b"2")])], Some("v2:two"));
    let msg = s.err(&["import", dir.to_str().unwrap()]);
    assert!(
        msg.contains("one") && msg.contains("v2:two") && msg.contains("PATH:NAME"),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "");
    let spec = format!("{}:v2:two", dir.display());
    assert_eq!(s.ok(&["import", &spec]).trim(), ids_two[0]);
    let spec = format!("{}:one", dir.display());
    assert_eq!(s.ok(&["import", &spec]).trim(), ids_one[0]);
    let spec = format!("{}:three", dir.display());
    let msg = s.err(&["import", &spec]);
    assert!(msg.contains("three") && msg.contains("v2:two"), "{msg}");
}

#[test]
fn docker_save_repo_tags_select_and_manifests_null_falls_back() {
    let s = Store::new("vfs");
    // A config whose name is not its digest (moby reads it by name).
    let other = "e".repeat(64);
    let (dir, built) = docker_dir(s.dir.path(), &small_layers(), &format!("{other}.json"));
    let ids = built.layer_ids();
    // `docker load` reads manifest.json when index.json lists nothing.
    fs::write(
        dir.join("index.json"),
        r#"{"schemaVersion":2,"manifests":null}"#,
    )
    .unwrap();
    let spec = format!("{}:small:latest", dir.display());
    assert_eq!(s.ok(&["import", &spec]).trim(), ids[1]);
    let spec = format!("{}:small", dir.display());
    assert_eq!(s.ok(&["import", &spec]).trim(), ids[1]);
    let spec = format!("{}:other:latest", dir.display());
    let msg = s.err(&["import", &spec]);
    assert!(
        msg.contains("other:latest") && msg.contains("small:latest"),
        "{msg}"
    );
}

/// A tar of `(name, type, data, link)` members, headers written by hand where the `tar` crate
/// would refuse.
fn raw_tar(members: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn image_tar_links_out_and_huge_long_names_are_refused() {
    let s = Store::new("vfs");
    let (_, host_digest) = host_file(&s);
    let dir = s.dir.path().join("img");
    let layer = layer_tar(&[("a", b"a")]);
    let ids = put_image(&dir, std::slice::from_ref(&layer), None);
    let hex = sha256(&layer);
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for e in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        members.push((
            format!("blobs/sha256/{}", e.file_name().to_str().unwrap()),
            fs::read(e.path()).unwrap(),
        ));
    }
    for f in ["index.json", "oci-layout"] {
        members.push((f.to_string(), fs::read(dir.join(f)).unwrap()));
    }
    let build = |blob_member: (u8, &[u8], &str)| {
        let mut list: Vec<(&str, u8, &[u8], &str)> = members
            .iter()
            .filter(|(n, _)| !n.ends_with(&hex))
            .map(|(n, d)| (n.as_str(), b'0', d.as_slice(), ""))
            .collect();
        let name = format!("blobs/sha256/{hex}");
        list.push((&name, blob_member.0, blob_member.1, blob_member.2));
        raw_tar(&list)
    };
    // The plain image tar imports (a long name elsewhere is fine).
    let good = s.scratch("good.tar");
    let mut data = build((b'0', &layer, ""));
    let mut long = raw_tar(&[(&format!("{}/x", "d".repeat(300)), b'0', b"x", "")]);
    data.truncate(data.len() - 1024);
    long.truncate(long.len() - 1024);
    data.extend_from_slice(&long);
    data.extend_from_slice(&[0u8; 1024]);
    fs::write(&good, &data).unwrap();
    assert_eq!(s.ok(&["import", good.to_str().unwrap()]).trim(), ids[0]);
    s.ok(&["rm", &ids[0]]);
    // The blob as a symlink member to a host file, or to /dev/zero.
    for target in ["/etc/passwd", "../../../../host-secret.tar", "/dev/zero"] {
        let bad = s.scratch("bad.tar");
        fs::write(&bad, build((b'2', b"", target))).unwrap();
        let (code, stderr) = run_with_deadline(s.cmd(&["import", bad.to_str().unwrap()]));
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&hex) && stderr.contains("leaves the image"),
            "{stderr}"
        );
        no_leak(&stderr, &host_digest);
    }
    // A character device member as the blob.
    let bad = s.scratch("bad.tar");
    fs::write(&bad, build((b'3', b"", ""))).unwrap();
    let msg = s.err(&["import", bad.to_str().unwrap()]);
    assert!(
        msg.contains(&hex) && msg.contains("not a regular file"),
        "{msg}"
    );
    // A GNU long name header claiming 8 GiB: refused from its header, nothing buffered.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_size(8 << 30);
    h.set_cksum();
    let mut data = h.as_bytes().to_vec();
    data.extend_from_slice(&[b'n'; 8192]);
    let huge = s.scratch("huge.tar");
    fs::write(&huge, &data).unwrap();
    let msg = s.err(&["import", huge.to_str().unwrap()]);
    assert!(msg.contains("huge.tar") && msg.contains("limit"), "{msg}");
    assert_eq!(s.ok(&["ls"]), "");
}

/// `skopeo`, if installed; required under `CI=true` (`.ci/run` installs it).
fn skopeo() -> Option<&'static str> {
    let found = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var("CI").as_deref() == Ok("true") {
        panic!("skopeo is required under CI=true (.ci/run installs the Debian package)");
    }
    found.then_some("skopeo")
}

/// Files of the tree at `dir`: relative path to content (`None` for a directory).
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
            if p.symlink_metadata().unwrap().is_dir() {
                out.insert(rel, None);
                todo.push(p);
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    out
}

#[test]
fn images_made_by_skopeo_import_and_equal_gnu_tar() {
    let Some(skopeo) = skopeo() else {
        eprintln!("skipping: skopeo is not installed");
        test_support::record_skip("skopeo is not installed");
        return;
    };
    let work = Store::new("vfs");
    let layers = vec![
        layer_tar(&[
            ("etc/", b""),
            ("etc/one", b"1"),
            ("bin/", b""),
            ("bin/x", b"x"),
        ]),
        layer_tar(&[("etc/", b""), ("etc/one", b"changed"), ("etc/two", b"2")]),
    ];
    let (dir, built) = docker_dir(work.dir.path(), &layers, "config.json");
    let ids = built.layer_ids();
    let docker_tar = work.scratch("docker.tar");
    tar_dir(&dir, &docker_tar).unwrap();
    // What GNU tar makes of the layers, one after the other.
    let reference = work.scratch("reference");
    fs::create_dir(&reference).unwrap();
    for (i, l) in layers.iter().enumerate() {
        let f = work.scratch(&format!("layer{i}.tar"));
        fs::write(&f, l).unwrap();
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&f)
            .arg("-C")
            .arg(&reference)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let want = tree(&reference);
    let d = work.dir.path().display().to_string();
    let copies: [(&[&str], String, String); 4] = [
        (&[], format!("oci:{d}/oci:one"), format!("{d}/oci:one")),
        (
            &[],
            format!("oci-archive:{d}/oci.tar:one"),
            format!("{d}/oci.tar:one"),
        ),
        (
            &["--dest-compress-format", "zstd", "--dest-compress"],
            format!("oci:{d}/ociz:one"),
            format!("{d}/ociz"),
        ),
        (
            &[],
            format!("docker-archive:{d}/back.tar:small:latest"),
            format!("{d}/back.tar:small"),
        ),
    ];
    for (flags, dest, spec) in copies {
        let st = std::process::Command::new(skopeo)
            .args(["--insecure-policy", "copy", "-q"])
            .args(flags)
            .arg(format!("docker-archive:{}", docker_tar.display()))
            .arg(&dest)
            .status()
            .unwrap();
        assert!(st.success(), "skopeo copy to {dest}");
        let s = Store::new("vfs");
        assert_eq!(s.ok(&["import", &spec]).trim(), ids[1], "{dest}");
        let (mounted, held) = s.look(&ids[1]);
        assert_eq!(tree(&mounted), want, "{dest}");
        s.unlook(&held);
    }
    // A second image in the same layout: a name is needed.
    let st = std::process::Command::new(skopeo)
        .args(["--insecure-policy", "copy", "-q"])
        .arg(format!("docker-archive:{}", docker_tar.display()))
        .arg(format!("oci:{d}/oci:two"))
        .status()
        .unwrap();
    assert!(st.success());
    let msg = work.err(&["import", &format!("{d}/oci")]);
    assert!(msg.contains("one") && msg.contains("two"), "{msg}");
}
