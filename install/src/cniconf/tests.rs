use super::*;

fn p(name: &str) -> PathBuf {
    PathBuf::from(format!("/etc/cni/net.d/{name}"))
}

#[test]
fn files_load_like_libcni_loads_them() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "a.conflist",
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
            None,
        ),
        (
            "a.conf",
            r#"{"name":"n","cniVersion":"1.0.0","type":"bridge"}"#,
            None,
        ),
        ("a.json", r#"{"name":"n","type":"bridge"}"#, None),
        (
            "a.conflist",
            r#"{"name":"n","plugins":[]}"#,
            Some("\"plugins\" is empty"),
        ),
        (
            "a.conflist",
            r#"{"plugins":[{"type":"x"}]}"#,
            Some("non-empty \"name\""),
        ),
        (
            "a.conflist",
            r#"{"name":"n","plugins":[{"type":"x"},{}]}"#,
            Some("plugins[1] has no \"type\""),
        ),
        (
            "a.conflist",
            r#"{"name":"n"}"#,
            Some("needs a \"plugins\" list"),
        ),
        (
            "a.conf",
            r#"{"name":"n","plugins":[{"type":"x"}]}"#,
            Some("needs a \"type\""),
        ),
        ("a.conf", r#"[1]"#, Some("JSON object")),
        (
            "a.conf",
            r#"{"type":"x","cniVersion":1}"#,
            Some("cniVersion must be a string"),
        ),
        ("a.conflist", "{", Some("not valid JSON")),
    ];
    for (name, text, want_err) in cases {
        let got = parse(&p(name), text.as_bytes());
        match (want_err, got) {
            (None, Ok(n)) => assert_eq!(n.name(), "n"),
            (Some(w), Err(e)) => assert!(e.to_string().contains(w), "{name} {text}: {e}"),
            (w, got) => panic!("{name} {text}: expected {w:?}, got {got:?}"),
        }
    }
}

#[test]
fn our_entry_goes_last_and_comes_out_whole() {
    let net = parse(
        &p("10-x.conflist"),
        br#"{"cniVersion":"1.0.0","name":"x","extra":{"k":1},"plugins":[{"type":"a"},{"type":"ambit-cni","old":true},{"type":"b"}]}"#,
    )
    .unwrap();
    let entry = serde_json::json!({"type": "ambit-cni", "name": "ambit-cni"});
    let list = with_entry(&net, &entry).unwrap();
    let types: Vec<_> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["a", "b", "ambit-cni"]);
    assert_eq!(list["extra"], serde_json::json!({"k": 1}));
    let keys: Vec<_> = list.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["cniVersion", "name", "extra", "plugins"],
        "key order kept"
    );
    let back = without_entry(&net).unwrap();
    assert_eq!(back["plugins"].as_array().unwrap().len(), 2);
    assert!(with_entry(&net, &serde_json::json!({"type": "other"})).is_err());
    let clean = parse(
        &p("a.conflist"),
        br#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"a"}]}"#,
    )
    .unwrap();
    assert_eq!(without_entry(&clean), None);
}

mod fuzz {
    use super::*;
    use ambit_common::testing::json;
    use proptest::prelude::*;

    proptest! {
        /// Any file in the configuration directory: loaded like libcni or refused; chaining into
        /// whatever loads keeps every other plugin, in order, with ours last, and removing ours
        /// gives back exactly the original plugins.
        #[test]
        fn fuzz_conf_files(
            v in json(&["cniVersion", "name", "plugins", "type", "ambit-cni", "1.0.0", "0.3.1", "ipam"]),
            ext in proptest::sample::select(&["conf", "conflist", "json"][..]),
        ) {
            let path = PathBuf::from(format!("/etc/cni/net.d/10-x.{ext}"));
            let Ok(net) = parse(&path, &serde_json::to_vec(&v).unwrap()) else {
                return Ok(());
            };
            let entry = serde_json::json!({"type": PLUGIN_TYPE, "name": PLUGIN_TYPE});
            let theirs: Vec<Value> = net.list["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE))
                .cloned()
                .collect();
            if let Ok(list) = with_entry(&net, &entry) {
                let plugins = list["plugins"].as_array().unwrap();
                prop_assert_eq!(&plugins[..plugins.len() - 1], &theirs[..]);
                prop_assert_eq!(plugins.last(), Some(&entry));
                let rendered = render(&list);
                let again = parse(&PathBuf::from("/etc/cni/net.d/10-x.conflist"), &rendered).unwrap();
                prop_assert!(again.has_entry(&entry));
                let back = without_entry(&again).unwrap();
                prop_assert_eq!(back["plugins"].as_array().unwrap(), &theirs);
            }
        }
    }
}
