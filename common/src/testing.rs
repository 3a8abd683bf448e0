//! Property-test strategies for the workspace's hostile-input tests (feature `testing`).
//!
//! The tests run a bounded number of cases in CI (proptest's default 256, or what a test
//! sets); the long version is `PROPTEST_CASES=200000 cargo test --workspace fuzz_`.

use proptest::prelude::*;
use serde_json::Value;

/// Short strings biased toward what parsers split on.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_./:;=\\-]{0,24}",
        "\\PC{0,16}",
        Just(String::new()),
    ]
}

/// Any JSON value, nested up to 4 levels, keys drawn from `keys` half of the time (so the
/// documents look enough like the real thing to reach deep into the parser).
pub fn json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        proptest::sample::select(keys).prop_map(String::from),
        text()
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
