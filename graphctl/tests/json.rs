//! `--json` everywhere: every command's document and error objects checked against
//! `graphctl/schema/v1.json`, on both drivers.

use std::path::Path;
use std::sync::OnceLock;

use crate::util::{Store, layer_tar, sample_image};

/// The compiled schema, read from the file users are pointed at.
fn schema() -> &'static jsonschema::Validator {
    static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/v1.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&value)
            .unwrap()
    })
}

/// Parses `text` as one JSON document, checks it against the schema and that it is the
/// document of `command`; returns it.
fn checked(text: &str, command: Option<&str>) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {text}"));
    let errors: Vec<String> = schema()
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{text}\ndoes not match the schema:\n{}",
        errors.join("\n")
    );
    assert_eq!(v["schema_version"], 1, "{text}");
    assert_eq!(v["command"].as_str(), command, "{text}");
    v
}

/// Runs `graphctl --json ARGS` expecting success; returns the checked document.
fn json_ok(s: &Store, command: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    checked(&s.ok(&all), Some(command))
}

/// Runs `graphctl --json ARGS` expecting exit status `code` and a JSON error on stderr of
/// `kind`; returns the error object.
fn json_err(s: &Store, args: &[&str], code: i32, kind: &str) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (stdout, stderr) = s.cmd(&all).status(code);
    assert!(stdout.is_empty(), "an error printed on stdout: {stdout}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON error on stderr: {stderr}"));
    let command = serde_json::from_str::<serde_json::Value>(line).unwrap()["command"]
        .as_str()
        .map(str::to_string);
    let v = checked(line, command.as_deref());
    assert_eq!(v["error"]["kind"], kind, "{line}");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    v["error"].clone()
}

driver_test!(every_command_matches_the_schema, |driver| {
    let s = Store::new(driver);
    let tar = s.scratch("base.tar");
    std::fs::write(
        &tar,
        layer_tar(&[("etc/hostname", b"box\n"), ("bin/sh", b"#!")]),
    )
    .unwrap();
    let tar = tar.to_str().unwrap();

    let d = json_ok(&s, "drivers", &["drivers"]);
    assert!(
        d["drivers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == driver)
    );
    let st = json_ok(&s, "status", &["status"]);
    assert_eq!(st["driver"], driver);

    let a = json_ok(&s, "apply", &["apply", "base", tar]);
    assert_eq!(a["size"], 6, "numbers are numbers: {a}");
    assert_eq!(a["created"], true);
    assert!(a["diff_id"].as_str().unwrap().starts_with("sha256:"));
    // The driver's layer count, typed.
    let st = json_ok(&s, "status", &["status"]);
    assert_eq!(st["status"]["layers"], 1, "{st}");

    let c = json_ok(&s, "create", &["create", "--rw", "--parent", "base", "ctr"]);
    assert_eq!(c["kind"], "read-write");
    let m = json_ok(&s, "mount", &["mount", "ctr"]);
    assert_eq!(m["read_only"], false);
    let path = m["path"].as_str().unwrap().to_string();
    std::fs::write(Path::new(&path).join("new"), b"n").unwrap();
    std::fs::remove_file(Path::new(&path).join("etc/hostname")).unwrap();
    let list = json_ok(&s, "mount", &["mount"]);
    assert_eq!(list["mounts"][0]["id"], "ctr", "{list}");
    assert_eq!(list["mounts"][0]["path"], path.as_str());

    let ch = json_ok(&s, "changes", &["changes", "ctr"]);
    let kinds: Vec<(&str, &str)> = ch["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("modify", "/etc"),
            ("delete", "/etc/hostname"),
            ("add", "/new")
        ]
    );
    let ds = json_ok(&s, "diff-size", &["diff-size", "ctr"]);
    assert_eq!(ds["size"], 1);
    let co = json_ok(&s, "commit", &["commit", "ctr", "img"]);
    assert_eq!(co["parent"], "base");
    let out = s.scratch("img.tar.gz");
    let b = json_ok(
        &s,
        "diff",
        &[
            "diff",
            "img",
            "-o",
            out.to_str().unwrap(),
            "--compress",
            "gzip",
        ],
    );
    assert_eq!(
        b["diff_id"], co["diff_id"],
        "the committed DiffID is the diff's"
    );
    let ex = s.scratch("flat.tar");
    json_ok(&s, "export", &["export", "img", "-o", ex.to_str().unwrap()]);

    let ls = json_ok(&s, "ls", &["ls"]);
    assert_eq!(ls["layers"].as_array().unwrap().len(), 3);
    let info = json_ok(&s, "info", &["info", "img"]);
    assert_eq!(info["diff_id"], co["diff_id"]);
    assert!(info["disk_usage"]["inodes"].as_u64().unwrap() > 0);
    let usage = json_ok(&s, "usage", &["usage"]);
    assert_eq!(usage["layers"].as_array().unwrap().len(), 3);
    let tree = json_ok(&s, "tree", &["tree"]);
    assert_eq!(tree["layers"][0]["id"], "base");
    assert_eq!(tree["layers"][1]["depth"], 1);
    let e = json_ok(&s, "exists", &["exists", "img"]);
    assert_eq!(e["exists"], true);
    let (out, _) = s.cmd(&["--json", "exists", "nope"]).status(1);
    assert_eq!(checked(&out, Some("exists"))["exists"], false);

    let u = json_ok(&s, "unmount", &["unmount", "ctr"]);
    assert_eq!(u["mount_count"], 0);
    json_ok(&s, "mount", &["mount", "ctr"]);
    let all = json_ok(&s, "unmount", &["unmount", "--all"]);
    assert_eq!(all["released"], serde_json::json!(["ctr"]));
    let cl = json_ok(&s, "cleanup", &["cleanup"]);
    assert_eq!(cl["released"], serde_json::json!([]));
    let rm = json_ok(&s, "rm", &["rm", "ctr"]);
    assert_eq!(rm["id"], "ctr");

    let im = json_ok(&s, "import", &["import", sample_image().to_str().unwrap()]);
    assert!(im["top"].is_string());
});

driver_test!(errors_are_json_objects_on_stderr, |driver| {
    let s = Store::new(driver);
    let e = json_err(&s, &["rm", "nope"], 1, "not_found");
    assert!(e["hint"].is_string());
    json_err(&s, &["info", "../x"], 1, "invalid_id");
    json_err(&s, &["exists", "../x"], 125, "invalid_id");
    json_err(&s, &["no-such-command"], 2, "usage");
    // A bad layer tar: the tar code's own kind.
    let bad = s.scratch("bad.tar");
    std::fs::write(&bad, escaping_tar()).unwrap();
    json_err(&s, &["apply", "l", bad.to_str().unwrap()], 1, "bad_entry");
    json_err(&s, &["diff", "l"], 1, "invalid_argument");
    json_err(&s, &["completions", "bash"], 1, "invalid_argument");
    // The image importer's own kinds.
    let missing = s.scratch("no-such-image");
    json_err(&s, &["import", missing.to_str().unwrap()], 1, "open");
});

/// A tar whose one entry is named `../escape` (the tar crate's builder refuses to write one).
fn escaping_tar() -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    let name = b"../escape";
    h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(1);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}
