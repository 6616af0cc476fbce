//! `info ID` and `ls --json`: each layer's parent, kind, DiffID, creation time, size and mount
//! count (issue 14).

use sha2::{Digest, Sha256};

use crate::util::{Store, layer_tar};

driver_test!(info_and_ls_json_show_a_layers_bookkeeping, |driver| {
    let s = Store::new(driver);
    let tar = layer_tar(&[("etc/", b""), ("etc/hostname", b"box\n")]);
    let want_diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    let file = s.scratch("base.tar");
    std::fs::write(&file, &tar).unwrap();
    s.ok(&["apply", "base", file.to_str().unwrap()]);
    s.ok(&["create", "--parent", "base", "--rw", "ctr"]);
    s.ok(&["mount", "ctr"]);

    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "info", "base"])).unwrap();
    assert_eq!(v["id"], "base");
    assert_eq!(v["parent"], serde_json::Value::Null);
    assert_eq!(v["kind"], "image");
    assert_eq!(v["read_write"], false);
    assert_eq!(v["diff_id"], want_diff_id.as_str());
    assert_eq!(v["size"], 4);
    assert_eq!(v["mount_count"], 0);
    let created = v["created"]
        .as_str()
        .expect("the target dir's filesystem has birth times");
    let t = humantime::parse_rfc3339(created).unwrap();
    let age = std::time::SystemTime::now().duration_since(t).unwrap();
    assert!(age.as_secs() < 600, "created {created}");

    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "info", "ctr"])).unwrap();
    assert_eq!(v["parent"], "base");
    assert_eq!(v["kind"], "read-write");
    assert_eq!(v["diff_id"], serde_json::Value::Null);
    assert_eq!(v["mount_count"], 1);
    assert_eq!(v["size"], 0);

    let text = s.ok(&["info", "ctr"]);
    for line in [
        "id:          ctr",
        "parent:      base",
        "kind:        read-write",
    ] {
        assert!(text.contains(line), "{text}");
    }
    assert!(text.contains("mount_count: 1"), "{text}");

    let ls: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "ls"])).unwrap();
    let ls = ls["layers"].as_array().unwrap();
    assert_eq!(ls.len(), 2);
    assert_eq!(ls[0]["id"], "base");
    assert_eq!(ls[0]["diff_id"], want_diff_id.as_str());
    assert_eq!(ls[1]["kind"], "read-write");
    assert_eq!(ls[1]["mount_count"], 1);
    assert!(ls[0].get("size").is_none(), "ls does not compute sizes");

    let e = s.err(&["info", "nosuch"]);
    assert!(e.contains("nosuch"), "{e}");
    s.ok(&["unmount", "ctr"]);
});
