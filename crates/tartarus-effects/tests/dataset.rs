//! The dataset builder against its contract (effects-v1 §13): queries parse with precise errors, the
//! selection is deterministic, independent of candidate order, seeded and proportionally stratified.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;

use serde_json::json;
use tartarus_effects::dataset::DATASET_FORMAT;
use tartarus_effects::{build_manifest, Cid, DatasetQuery, EpisodeFacts, FactValue, Filter, Manifest};

fn query(value: serde_json::Value) -> DatasetQuery {
    DatasetQuery::from_value(&value).unwrap()
}

fn query_error(value: serde_json::Value) -> String {
    let err = DatasetQuery::from_value(&value).unwrap_err();
    assert_eq!(err.kind(), "invalid_query", "{err}");
    err.to_string()
}

/// `n` episodes: template py/r/sh in a 5:3:2 ratio, tenants alternating, a score on most.
fn candidates(n: u32) -> Vec<EpisodeFacts> {
    (0..n)
        .map(|i| {
            let template = match i % 10 {
                0..=4 => "py",
                5..=7 => "r",
                _ => "sh",
            };
            let mut fields = BTreeMap::from([
                ("template".to_string(), FactValue::Text(template.into())),
                (
                    "tenant".to_string(),
                    FactValue::Text(if i % 2 == 0 { "team-a" } else { "team-b" }.into()),
                ),
                ("tool_calls".to_string(), FactValue::Int(i64::from(i % 4))),
                ("ok".to_string(), FactValue::Bool(i % 3 != 0)),
            ]);
            if i % 7 != 0 {
                fields.insert(
                    "signal.quality.score".into(),
                    FactValue::Int(i64::from(i * 97 % 10_000)),
                );
            }
            EpisodeFacts {
                episode: Cid::of_object(&format!("episode {i}")).unwrap(),
                fields,
            }
        })
        .collect()
}

fn shuffled(mut items: Vec<EpisodeFacts>, seed: u8) -> Vec<EpisodeFacts> {
    // A fixed permutation: sort by a keyed hash.
    items.sort_by_key(|f| {
        *blake3::Hasher::new()
            .update(&[seed])
            .update(&f.episode.to_bytes())
            .finalize()
            .as_bytes()
    });
    items
}

#[test]
fn test_query_errors_name_the_path() {
    let cases = [
        (
            json!({"filter": {"and": [{"eq": ["tenant", "a"]}, {"gt": ["score", "high"]}]}}),
            "query filter.and[1].gt: expected [field, integer]",
        ),
        (
            json!({"filter": {"bogus": 1}}),
            "query filter: unknown operator \"bogus\"",
        ),
        (
            json!({"filter": {"eq": ["a", 1], "ne": ["b", 2]}}),
            "query filter: expected an object with one operator",
        ),
        (
            json!({"filter": {"or": []}}),
            "query filter.or: expected a non-empty list",
        ),
        (
            json!({"filter": {"not": {"exists": ""}}}),
            "query filter.not.exists: expected a field name",
        ),
        (
            json!({"filter": {"eq": ["a", 1.5]}}),
            "query filter.eq: expected [field, integer, text or boolean]",
        ),
        (
            json!({"filter": {"eq": ["a", null]}}),
            "query filter.eq: expected [field, integer, text or boolean]",
        ),
        (
            json!({"filter": {"ge": ["a", 9_223_372_036_854_775_808u64]}}),
            "query filter.ge: expected [field, integer]",
        ),
        (
            json!({"filter": {"in": ["a", []]}}),
            "query filter.in: expected [field, [integer",
        ),
        (
            json!({"sample": {"seed": 1}}),
            "query sample.size: expected an integer",
        ),
        (
            json!({"sample": {"seed": -1, "size": 3}}),
            "query sample.seed: expected an integer",
        ),
        (
            json!({"sample": {"seed": 1, "size": 0}}),
            "query sample.size: must be at least 1",
        ),
        (
            json!({"sample": {"seed": 1, "size": 2, "rate": 3}}),
            "query sample.rate: unknown field",
        ),
        (json!({"stratify": 3}), "query stratify: expected a field name"),
        (json!({"limit": 3}), "query limit: unknown field"),
        (json!([1]), "query (root): expected an object"),
    ];
    for (value, expected) in cases {
        let message = query_error(value);
        assert!(message.starts_with(expected), "{message}\n  expected: {expected}");
    }
    let mut deep = json!({"exists": "x"});
    for _ in 0..70 {
        deep = json!({ "not": deep });
    }
    assert!(query_error(json!({ "filter": deep })).contains("nested deeper than 64"));
    // From text and through serde, with the same errors.
    assert!(DatasetQuery::from_json("{")
        .unwrap_err()
        .to_string()
        .contains("not JSON"));
    let err = serde_json::from_str::<DatasetQuery>(r#"{"filter": {"lt": ["a"]}}"#).unwrap_err();
    assert!(
        err.to_string().contains("filter.lt: expected [field, integer]"),
        "{err}"
    );
}

#[test]
fn test_query_canonical_form_drops_absent_parts() {
    let text = r#"{"filter": {"and": [{"eq": ["tenant", "team-a"]}, {"ge": ["signal.quality.score", 5000]},
        {"not": {"eq": ["outcome", "timeout"]}}, {"in": ["template", ["py", "r", 3, true]]},
        {"exists": "signal.review.label"}, {"or": [{"lt": ["a", -1]}, {"le": ["a", 2]}, {"gt": ["b", 0]},
        {"ne": ["c", false]}]}]}, "sample": {"size": 100, "seed": 42}, "stratify": null}"#;
    let parsed = DatasetQuery::from_json(text).unwrap();
    assert_eq!(parsed.stratify, None);
    let canonical = serde_json::to_value(&parsed).unwrap();
    let mut expected: serde_json::Value = serde_json::from_str(text).unwrap();
    expected.as_object_mut().unwrap().remove("stratify");
    assert_eq!(canonical, expected);
    assert_eq!(DatasetQuery::from_value(&canonical).unwrap(), parsed);
    assert_eq!(serde_json::to_value(DatasetQuery::default()).unwrap(), json!({}));
}

#[test]
fn test_filter_semantics_on_missing_fields_and_types() {
    let fields = BTreeMap::from([
        ("n".to_string(), FactValue::Int(5)),
        ("t".to_string(), FactValue::Text("5".into())),
        ("b".to_string(), FactValue::Bool(true)),
    ]);
    let holds = |value: serde_json::Value| query(json!({ "filter": value })).filter.unwrap().matches(&fields);
    assert!(holds(json!({"eq": ["n", 5]})));
    assert!(
        !holds(json!({"eq": ["t", 5]})),
        "no coercion between text and integer"
    );
    assert!(
        !holds(json!({"eq": ["b", 1]})),
        "no coercion between boolean and integer"
    );
    assert!(holds(json!({"ne": ["t", 5]})), "another type is not equal");
    assert!(!holds(json!({"eq": ["missing", 5]})));
    assert!(
        !holds(json!({"ne": ["missing", 5]})),
        "a comparison on a missing field is false"
    );
    assert!(holds(json!({"not": {"eq": ["missing", 5]}})));
    assert!(!holds(json!({"gt": ["t", 1]})), "ordering compares integers only");
    assert!(holds(json!({"ge": ["n", 5]})) && holds(json!({"le": ["n", 5]})));
    assert!(!holds(json!({"lt": ["n", 5]})) && !holds(json!({"gt": ["n", 5]})));
    assert!(holds(json!({"in": ["b", [false, true]]})));
    assert!(!holds(json!({"in": ["missing", [1]]})));
    assert!(holds(json!({"exists": "t"})) && !holds(json!({"exists": "missing"})));
    assert!(holds(json!({"or": [{"exists": "missing"}, {"exists": "n"}]})));
    assert!(!holds(json!({"and": [{"exists": "missing"}, {"exists": "n"}]})));
    assert_eq!(
        query(json!({"filter": {"exists": "x"}})).filter,
        Some(Filter::Exists("x".into()))
    );
}

#[test]
fn test_manifest_is_deterministic_and_order_independent() {
    let q = query(json!({"filter": {"eq": ["tenant", "team-a"]}, "sample": {"seed": 42, "size": 10}}));
    let all = candidates(100);
    let first = build_manifest(&q, &all).unwrap();
    let bytes = first.to_bytes().unwrap();
    assert_eq!(build_manifest(&q, &all).unwrap().to_bytes().unwrap(), bytes);
    for seed in 0..5 {
        assert_eq!(
            build_manifest(&q, &shuffled(all.clone(), seed))
                .unwrap()
                .to_bytes()
                .unwrap(),
            bytes
        );
    }
    assert_eq!(first.format, DATASET_FORMAT);
    assert_eq!(first.matched, 50);
    assert_eq!(first.episodes.len(), 10);
    assert!(first.strata.is_empty());
    assert_eq!(first.id().unwrap(), Cid::of_bytes(&bytes));
    assert_eq!(Manifest::from_bytes(&bytes).unwrap(), first);
    // The sample is the 10 smallest keys: BLAKE3(seed LE ‖ binary CID).
    let key = |cid: &Cid| {
        *blake3::Hasher::new()
            .update(&42u64.to_le_bytes())
            .update(&cid.to_bytes())
            .finalize()
            .as_bytes()
    };
    let mut expected: Vec<Cid> = all
        .iter()
        .filter(|f| f.fields["tenant"] == FactValue::Text("team-a".into()))
        .map(|f| f.episode)
        .collect();
    expected.sort_by_key(key);
    expected.truncate(10);
    assert_eq!(first.episodes, expected);
}

#[test]
fn test_another_seed_selects_differently() {
    let all = candidates(100);
    let a = build_manifest(&query(json!({"sample": {"seed": 1, "size": 10}})), &all).unwrap();
    let b = build_manifest(&query(json!({"sample": {"seed": 2, "size": 10}})), &all).unwrap();
    assert_ne!(a.episodes, b.episodes);
    assert_ne!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
}

#[test]
fn test_without_sample_all_matches_in_cid_order() {
    let all = candidates(30);
    let manifest = build_manifest(
        &query(json!({"filter": {"exists": "signal.quality.score"}})),
        &all,
    )
    .unwrap();
    let mut expected: Vec<Cid> = all
        .iter()
        .filter(|f| f.fields.contains_key("signal.quality.score"))
        .map(|f| f.episode)
        .collect();
    expected.sort();
    assert_eq!(manifest.matched, expected.len() as u64);
    assert_eq!(manifest.episodes, expected);
    // A sample larger than the matches takes them all.
    let big = build_manifest(&query(json!({"sample": {"seed": 0, "size": 1000}})), &all).unwrap();
    assert_eq!(big.episodes.len(), 30);
}

#[test]
fn test_stratified_allocation_is_proportional_and_sums_to_size() {
    let all = candidates(100); // py 50, r 30, sh 20
    let manifest = build_manifest(
        &query(json!({"sample": {"seed": 7, "size": 10}, "stratify": "template"})),
        &shuffled(all.clone(), 3),
    )
    .unwrap();
    assert_eq!(
        manifest.strata,
        BTreeMap::from([("py".to_string(), 5), ("r".to_string(), 3), ("sh".to_string(), 2)])
    );
    assert_eq!(manifest.episodes.len(), 10);
    // Episodes come by stratum, in stratum order.
    let template = |cid: &Cid| all.iter().find(|f| f.episode == *cid).unwrap().fields["template"].clone();
    let order: Vec<FactValue> = manifest.episodes.iter().map(template).collect();
    let mut sorted = order.clone();
    sorted.sort_by_key(|v| format!("{v:?}"));
    assert_eq!(order, sorted);

    // 7 of 10: 3.5, 2.1, 1.4 → 3, 2, 1, and the one left goes to the largest remainder (py).
    let seven = build_manifest(
        &query(json!({"sample": {"seed": 7, "size": 7}, "stratify": "template"})),
        &all,
    )
    .unwrap();
    assert_eq!(seven.strata.values().copied().collect::<Vec<_>>(), vec![4, 2, 1]);
    for size in 1..=40u64 {
        let m = build_manifest(
            &query(json!({"sample": {"seed": 9, "size": size}, "stratify": "tool_calls"})),
            &all,
        )
        .unwrap();
        assert_eq!(m.strata.values().sum::<u64>(), size);
        assert_eq!(m.episodes.len() as u64, size);
    }
}

#[test]
fn test_stratum_of_a_missing_field_is_the_empty_string() {
    let all = candidates(21); // episodes 0, 7, 14 have no score
    let manifest = build_manifest(&query(json!({"stratify": "signal.quality.score"})), &all).unwrap();
    assert_eq!(manifest.strata[""], 3);
    assert_eq!(manifest.episodes.len(), 21);
    let by_bool = build_manifest(&query(json!({"stratify": "ok"})), &all).unwrap();
    assert_eq!(by_bool.strata.keys().collect::<Vec<_>>(), vec!["false", "true"]);
}

#[test]
fn test_duplicate_candidates_are_refused() {
    let mut all = candidates(3);
    all.push(all[0].clone());
    let err = build_manifest(&DatasetQuery::default(), &all).unwrap_err();
    assert_eq!(err.kind(), "invalid_object");
}
