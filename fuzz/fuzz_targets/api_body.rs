//! The API's JSON request bodies (`tartarus-server`, through its hidden `fuzzing` entry points, which run
//! the routes' own parsing and checks): sandbox create, exec, templates, policies, evaluators, tools, node
//! registration, node-side placements, dataset queries. The first byte picks the route, the rest is the
//! body (at most the server's body limit).
//!
//! Properties: a create the API accepts is a spec that validates and survives the JSON the store keeps
//! and the shim reads (so it executes as it was checked); only an admin key on a server that allows it
//! gets the host's network or a host directory as root; an accepted exec is a shim request that fits the
//! shim's request line and reads back as sent; an accepted template or policy validates and reads back
//! from its stored JSON; every other accepted body satisfies its own validation again.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use tartarus_effects::dataset::Manifest;
use tartarus_effects::{build_manifest, Cid, DatasetQuery, EpisodeFacts, FactValue};
use tartarus_image::template::Template;
use tartarus_runtime::{NetworkMode, RootSpec, SandboxSpec};
use tartarus_server::fuzzing::{self, HostAccess, Role};
use tartarus_shim::protocol::{self, Request, RequestLine, MAX_REQUEST_BYTES};

const ROLES: [Role; 3] = [Role::Admin, Role::User, Role::Viewer];

/// What the server keeps of a spec and the shim executes: it must read back strictly as it was.
fn survives_storage(spec: &SandboxSpec) {
    spec.validate().expect("an accepted spec validates");
    let stored = serde_json::to_string(spec).expect("a spec serialises");
    let executed = SandboxSpec::from_json_strict(&stored)
        .unwrap_or_else(|e| panic!("the shim cannot read a stored spec: {e}: {stored}"));
    assert_eq!(&executed, spec, "{stored}");
}

fn create(selector: u8, body: &[u8]) {
    let role = ROLES[usize::from((selector >> 3) & 0x03) % ROLES.len()];
    let host = HostAccess {
        network: selector & 0x40 != 0,
        rootfs: selector & 0x80 != 0,
    };
    let Ok((request, spec)) = fuzzing::create_sandbox(body, role, host) else {
        return;
    };
    survives_storage(&spec);
    assert!(spec.service, "an API sandbox is a service sandbox");
    if spec.network == NetworkMode::HostLoopback {
        assert!(
            role == Role::Admin && host.network,
            "host network for {role:?} with {host:?}"
        );
    }
    if let RootSpec::Directory(_) = spec.root {
        assert!(
            role == Role::Admin && host.rootfs,
            "host rootfs for {role:?} with {host:?}"
        );
    }
    assert!(spec.mounts.is_empty(), "a request cannot bind host paths");
    assert_eq!(spec.command, request.cmd.unwrap_or_default());
}

fn exec(body: &[u8]) {
    let mut base = SandboxSpec::new(vec!["/bin/sh".into()]);
    base.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    base.workdir = Some("/work".into());
    let Ok((body, request)) = fuzzing::exec(body, base) else {
        return;
    };
    assert!(!request.command.is_empty());
    if let Some(t) = body.timeout_s {
        assert!(t > 0.0 && t <= 86_400.0);
        assert!(request.timeout_ms.is_some_and(|ms| ms <= 86_400_000));
    }
    let line = protocol::encode(&RequestLine::new(Request::Exec(request.clone())));
    assert!(
        line.len() <= MAX_REQUEST_BYTES,
        "an accepted exec of {} bytes is a shim request of {} bytes, over the shim's {MAX_REQUEST_BYTES}",
        body.stdin.as_ref().map_or(0, String::len),
        line.len()
    );
    let read: RequestLine = protocol::decode(&line[..line.len() - 1]).expect("the shim reads the request");
    assert_eq!(read.request, Request::Exec(request));
}

fn template(body: &[u8]) {
    let Ok(template) = fuzzing::template(body) else {
        return;
    };
    template.validate().expect("an accepted template validates");
    let stored = template.to_json();
    assert_eq!(
        serde_json::from_str::<Template>(&stored).expect("a stored template reads"),
        template
    );
}

fn policy(body: &[u8]) {
    let Ok(policy) = fuzzing::policy(body) else {
        return;
    };
    policy.validate().expect("an accepted policy validates");
    let stored = policy.to_json();
    let read = tartarus_policy::parse_policy(&stored, "stored.json")
        .unwrap_or_else(|e| panic!("a stored policy does not parse: {e}: {stored}"));
    assert_eq!(read, policy);
}

fn others(selector: u8, body: &[u8]) {
    match selector % 5 {
        0 => {
            if let Ok((name, kid)) = fuzzing::evaluator(body) {
                assert!(!name.is_empty() && name.len() <= 64);
                assert!(!kid.is_empty());
            }
        }
        1 => {
            if let Ok(tool) = fuzzing::tool(body) {
                let stored = serde_json::to_string(&tool).expect("a tool serialises");
                let read = fuzzing::tool(stored.as_bytes()).expect("a stored tool reads and validates");
                assert_eq!(read, tool);
            }
        }
        2 => {
            if let Ok(report) = fuzzing::node_report(body) {
                report.validate().expect("an accepted report validates");
            }
        }
        3 => {
            if let Ok(spec) = fuzzing::node_sandbox(body) {
                survives_storage(&spec);
                assert_eq!(
                    spec.root,
                    RootSpec::HostSystem,
                    "a node runs placements on its host root only"
                );
            }
        }
        _ => {
            if let Ok(query) = fuzzing::dataset_query(body) {
                let json = serde_json::to_string(&query).expect("a query serialises");
                let read = fuzzing::dataset_query(json.as_bytes()).expect("a query reads its own JSON");
                assert_eq!(read, query, "{json}");
                dataset(&query);
            }
        }
    }
}

/// A dataset built by a query over a few episodes: a deterministic subset that reads back as stored.
fn dataset(query: &DatasetQuery) {
    let candidates: Vec<EpisodeFacts> = (0..8u8)
        .map(|i| EpisodeFacts {
            episode: Cid::of_bytes(&[i]),
            fields: BTreeMap::from([
                ("score".to_string(), FactValue::Int(i64::from(i) - 3)),
                ("label".to_string(), FactValue::Text(format!("l{}", i % 3))),
                ("ok".to_string(), FactValue::Bool(i % 2 == 0)),
            ]),
        })
        .collect();
    let Ok(manifest) = build_manifest(query, &candidates) else {
        return;
    };
    assert!(manifest.matched <= candidates.len() as u64);
    assert!(manifest.episodes.len() as u64 <= manifest.matched);
    let unique: BTreeSet<&Cid> = manifest.episodes.iter().collect();
    assert_eq!(unique.len(), manifest.episodes.len(), "an episode taken twice");
    assert!(manifest
        .episodes
        .iter()
        .all(|e| candidates.iter().any(|c| c.episode == *e)));
    assert_eq!(
        build_manifest(query, &candidates).expect("the same query again"),
        manifest
    );
    let bytes = manifest.to_bytes().expect("a manifest encodes");
    assert_eq!(
        Manifest::from_bytes(&bytes).expect("a manifest reads back"),
        manifest
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    if body.len() > tartarus_server::MAX_BODY {
        return;
    }
    match selector & 0x07 {
        0 | 1 => create(selector, body),
        2 => exec(body),
        3 => template(body),
        4 => policy(body),
        _ => others(selector >> 3, body),
    }
});
