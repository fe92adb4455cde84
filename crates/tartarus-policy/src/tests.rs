//! Parsing (good and bad, with positions), round trips, and many policies under admission.

use std::time::Duration;

use crate::*;

/// The seed policy of issue 7, with its two contradictions resolved (egress on; max_duration 15m so the
/// template's 10m default fits).
const SEED: &str = "\
id: production-default
version: 1                       # the author's own number
tenants: [team-a]
network: {egress: true, deny_private: true, deny_metadata: true, allowed_egress_ports: [80, 443], allowed_cidrs: [], denied_cidrs: [], dns: true, rate_limit_kbps: 0}
resources: {max_cpu_cores: 4, max_memory_mb: 8192, max_duration: 15m, max_sandboxes: 50, max_total_cpu_cores: 16, max_total_memory_mb: 65536, classes: [ember, flame, blaze]}
security: {allow_host_network: false, allow_rootfs: false, allow_writable_mounts: false, extra_denied_syscalls: [ptrace]}
enforcement: {on_timeout: kill, on_resource_violation: throttle, on_network_violation: quarantine}
templates: [{id: python-ds, allowed_callers: [team-a], max_instances: 20, default_timeout: 10m, class: flame}]
";

fn parse(text: &str) -> Policy {
    parse_policy(text, "p.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// The error's full text and its key.
fn error(text: &str) -> (String, Option<String>) {
    let e = parse_policy(text, "p.yaml").unwrap_err();
    (e.to_string(), e.key)
}

#[test]
fn test_parse_seed_policy() {
    let p = parse(SEED);
    assert_eq!(p.id, "production-default");
    assert_eq!(p.version, Some(1));
    assert_eq!(p.tenants.as_deref(), Some(&["team-a".to_string()][..]));
    assert_eq!(p.network.allowed_egress_ports.as_deref(), Some(&[80, 443][..]));
    assert_eq!(p.resources.max_cpu_cores, Some(4.0));
    assert_eq!(p.resources.max_duration.as_deref(), Some("15m"));
    assert_eq!(
        p.enforcement.on_network_violation,
        Some(NetworkViolationAction::Quarantine)
    );
    assert_eq!(p.templates[0].class.as_deref(), Some("flame"));
}

#[test]
fn test_parse_minimal_and_empty_sections() {
    let p = parse("id: empty\nnetwork: {}\nresources: {}\n");
    assert_eq!(p, parse("id: empty\n"));
    assert!(p.is_default());
}

#[test]
fn test_parse_json_with_tabs() {
    let p = parse(
        "{\n\t\"id\": \"j\",\n\t\"network\": {\"egress\": true, \"allowed_cidrs\": [\"2001:db8::/32\"]}\n}\n",
    );
    assert_eq!(p.network.allowed_cidrs.unwrap()[0].to_string(), "2001:db8::/32");
}

#[test]
fn test_parse_ipv6_cidrs_unquoted_in_flow_and_block_yaml() {
    let flow = parse("id: v6\nnetwork: {egress: true, denied_cidrs: [2001:db8::/32, fd00:ec2::254/128]}\n");
    let block = parse(
        "id: v6\nnetwork:\n  egress: true\n  denied_cidrs:\n    - 2001:db8::/32\n    - fd00:ec2::254/128\n",
    );
    assert_eq!(flow, block);
}

#[test]
fn test_round_trip_json_and_yaml() {
    let p = parse(SEED);
    let json = p.to_json();
    assert_eq!(parse_policy(&json, "p.json").unwrap(), p);
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
    assert_eq!(parse_policy(&p.to_yaml(), "p.yaml").unwrap(), p);
    // Canonical: the same policy written differently stores the same.
    let block = "id: production-default\ntenants:\n  - team-a\nversion: 1\n";
    assert_eq!(
        parse(block).to_json(),
        parse("{version: 1, tenants: [team-a], id: production-default}").to_json()
    );
    assert_eq!(
        parse("id: c\nnetwork: {egress: true, allowed_cidrs: [2001:DB8::/32]}\n").to_json(),
        r#"{"id":"c","network":{"egress":true,"allowed_cidrs":["2001:db8::/32"]},"resources":{},"security":{},"enforcement":{}}"#
    );
}

#[test]
fn test_error_unknown_key_points_at_it() {
    let (text, key) = error("id: x\nnetwork:\n  egress: true\n  egres_ports: [80]\n");
    assert!(
        text.starts_with("p.yaml:4:3: network: unknown field `egres_ports`, expected one of"),
        "{text}"
    );
    assert_eq!(key.as_deref(), Some("network.egres_ports"));

    let (text, key) =
        error("id: x\nnetwork: {egress: true}\ntemplates:\n  - id: a\n  - id: b\n    clas: flame\n");
    assert!(
        text.starts_with("p.yaml:6:5: templates[1]: unknown field `clas`"),
        "{text}"
    );
    assert_eq!(key.as_deref(), Some("templates[1].clas"));

    let (text, _) = error("id: x\nquota: {}\n");
    assert!(text.starts_with("p.yaml:2:1: unknown field `quota`"), "{text}");
}

#[test]
fn test_error_bad_values_point_at_the_item() {
    let cases = [
        (
            "id: x\nnetwork: {egress: true, allowed_egress_ports: [80, 0]}\n",
            "p.yaml:2:52: network.allowed_egress_ports[1]: port 0 is out of range: use 1-65535",
            "network.allowed_egress_ports[1]",
        ),
        (
            "id: x\nnetwork:\n  egress: true\n  allowed_egress_ports:\n    - 443\n    - 70000\n",
            "p.yaml:6:7: network.allowed_egress_ports[1]: port 70000 is out of range: use 1-65535",
            "network.allowed_egress_ports[1]",
        ),
        (
            "id: x\nnetwork: {egress: true, allowed_cidrs: [10.0.0.0/8, 10.0.0.1/8]}\n",
            "p.yaml:2:53: network.allowed_cidrs[1]: invalid CIDR '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8",
            "network.allowed_cidrs[1]",
        ),
        (
            "id: x\nnetwork:\n  denied_cidrs:\n    - 2001:db8::1/32\n",
            "p.yaml:4:7: network.denied_cidrs[0]: invalid CIDR '2001:db8::1/32' has host bits set: the network is 2001:db8::/32",
            "network.denied_cidrs[0]",
        ),
        (
            "id: x\nnetwork: {denied_cidrs: [10.0.0.0]}\n",
            "p.yaml:2:26: network.denied_cidrs[0]: invalid CIDR '10.0.0.0' has no prefix length: write it as ADDRESS/PREFIX, e.g. 10.0.0.0/8 or 192.0.2.7/32",
            "network.denied_cidrs[0]",
        ),
        (
            "id: x\nresources:\n  max_duration: 5 minutes\n",
            "p.yaml:3:17: resources.max_duration: invalid duration '5 minutes': use a number with a unit ms, s, m or h (e.g. 30s, 1m30s, 250ms)",
            "resources.max_duration",
        ),
        (
            "id: x\nresources: {classes: [ember, volcano]}\n",
            "p.yaml:2:30: resources.classes[1]: unknown resource class 'volcano': use one of ember, flame, blaze, inferno, quarantine",
            "resources.classes[1]",
        ),
        (
            "id: x\nsecurity:\n  extra_denied_syscalls: [ptrace, ptrac]\n",
            "p.yaml:3:35: security.extra_denied_syscalls[1]: unknown system call 'ptrac': use an x86_64 syscall name such as ptrace",
            "security.extra_denied_syscalls[1]",
        ),
        (
            "id: x\nenforcement: {on_network_violation: warn}\n",
            "p.yaml:2:37: enforcement.on_network_violation: unknown variant `warn`, expected one of `log`, `kill`, `quarantine`",
            "enforcement.on_network_violation",
        ),
        (
            "id: x\nenforcement: {on_timeout: throttle}\n",
            "p.yaml:2:27: enforcement.on_timeout: unknown variant `throttle`, expected `kill`",
            "enforcement.on_timeout",
        ),
        (
            "id: x\nresources: {max_cpu_cores: -1}\n",
            "p.yaml:2:28: resources.max_cpu_cores: -1 CPU cores is out of range: use more than 0 and at most 4096",
            "resources.max_cpu_cores",
        ),
        (
            "id: x\nresources: {max_memory_mb: 1.5}\n",
            "p.yaml:2:28: resources.max_memory_mb: expected a whole number of MiB, found 1.5",
            "resources.max_memory_mb",
        ),
        (
            "id: x\nnetwork: {egress: yes}\n",
            "p.yaml:2:19: network.egress: invalid type: string \"yes\", expected a boolean",
            "network.egress",
        ),
        (
            "id: x\ntemplates: [{id: a, default_timeout: 8d}]\n",
            "p.yaml:2:38: templates[0].default_timeout: invalid duration '8d': use a number with a unit ms, s, m or h (e.g. 30s, 1m30s, 250ms)",
            "templates[0].default_timeout",
        ),
    ];
    for (text, want, want_key) in cases {
        let (got, key) = error(text);
        assert_eq!(got, want, "{text}");
        assert_eq!(key.as_deref(), Some(want_key), "{text}");
    }
}

#[test]
fn test_error_missing_id_and_bad_yaml() {
    let (text, key) = error("network: {}\n");
    assert!(text.starts_with("p.yaml:1:1: missing field `id`"), "{text}");
    assert_eq!(key.as_deref(), Some("id"));
    let (text, _) = error("id: x\nnetwork: {egress: true\n");
    assert!(text.starts_with("p.yaml:3:1: "), "{text}");
    let (text, _) = error("id: x\nid: y\n");
    assert!(text.contains("duplicate"), "{text}");
}

#[test]
fn test_contradictions_are_errors_naming_the_key() {
    let cases = [
        (
            // The seed as issue 7 wrote it: ports and dns with egress off.
            "id: seed\nnetwork: {egress: false, deny_private: true, allowed_egress_ports: [80, 443], dns: true}\n",
            "p.yaml:2:46: network.allowed_egress_ports is set while network.egress is false, so it could never apply: remove it, or set egress: true",
            "network.allowed_egress_ports",
        ),
        (
            "id: x\nnetwork:\n  egress: false\n  dns: true\n",
            "p.yaml:4:3: network.dns is set while network.egress is false, so it could never apply: remove it, or set egress: true",
            "network.dns",
        ),
        (
            "id: x\nnetwork: {egress: false, allowed_cidrs: [192.0.2.0/24]}\n",
            "p.yaml:2:26: network.allowed_cidrs is set while network.egress is false, so it could never apply: remove it, or set egress: true",
            "network.allowed_cidrs",
        ),
        (
            "id: x\nnetwork: {egress: false, rate_limit_kbps: 10}\n",
            "p.yaml:2:26: network.rate_limit_kbps is set while network.egress is false, so it could never apply: remove it, or set egress: true",
            "network.rate_limit_kbps",
        ),
        (
            "id: x\nnetwork: {egress: true, allowed_egress_ports: []}\n",
            "p.yaml:2:25: network.allowed_egress_ports is empty: list the ports egress may reach (e.g. [443]), or set network.egress: false",
            "network.allowed_egress_ports",
        ),
        (
            "id: x\ntenants: []\n",
            "p.yaml:2:1: tenants is empty: list the tenants this policy overrides, or remove the key to make it a default for every tenant",
            "tenants",
        ),
        (
            "id: x\ntenants: [team-a, team-b, team-a]\n",
            "p.yaml:2:27: tenants: 'team-a' is listed twice",
            "tenants",
        ),
        (
            "id: Bad_Id\n",
            "p.yaml:1:1: id 'Bad_Id' is invalid: use 1-63 lower-case letters, digits and '-', starting with a letter or digit",
            "id",
        ),
        (
            "id: x\nresources: {max_cpu_cores: 8, max_total_cpu_cores: 4}\n",
            "p.yaml:2:13: resources.max_cpu_cores: 8 is more than resources.max_total_cpu_cores (4): one sandbox could never use it",
            "resources.max_cpu_cores",
        ),
        (
            "id: x\nresources:\n  max_memory_mb: 4096\n  max_total_memory_mb: 2048\n",
            "p.yaml:3:3: resources.max_memory_mb: 4096 is more than resources.max_total_memory_mb (2048): one sandbox could never use it",
            "resources.max_memory_mb",
        ),
        (
            "id: x\nresources: {max_cpu_cores: 2, classes: [ember, flame, blaze]}\n",
            "p.yaml:2:55: resources.classes: class blaze needs 4 CPU cores, more than resources.max_cpu_cores (2)",
            "resources.classes",
        ),
        (
            // The seed's template: a 10m default under a 5m maximum.
            "id: x\nresources: {max_duration: 5m}\ntemplates:\n  - id: other\n    class: ember\n  - id: python-ds\n    default_timeout: 10m\n",
            "p.yaml:7:5: templates[1].default_timeout: 10m is longer than resources.max_duration (5m): no sandbox could run that long",
            "templates[1].default_timeout",
        ),
        (
            "id: x\nresources: {classes: [ember]}\ntemplates: [{id: py, class: flame}]\n",
            "p.yaml:3:22: templates[0].class: class flame is not in resources.classes: add it there or pick a listed one",
            "templates[0].class",
        ),
        (
            "id: x\nresources: {max_memory_mb: 1024}\ntemplates: [{id: py, class: flame}]\n",
            "p.yaml:3:22: templates[0].class: class flame needs 2048 MiB, more than resources.max_memory_mb (1024)",
            "templates[0].class",
        ),
        (
            "id: x\nresources: {max_sandboxes: 5}\ntemplates: [{id: py, max_instances: 6}]\n",
            "p.yaml:3:22: templates[0].max_instances: 6 is more than resources.max_sandboxes (5): the tenant could never reach it",
            "templates[0].max_instances",
        ),
        (
            "id: x\ntemplates: [{id: py}, {id: r}, {id: py}]\n",
            "p.yaml:2:33: templates[2].id: template 'py' has a rule already: merge the two entries",
            "templates[2].id",
        ),
        (
            "id: x\ntemplates: [{id: py, allowed_callers: [team-a, 'team b']}]\n",
            "p.yaml:2:49: templates[0].allowed_callers: 'team b' is not a tenant name: use 1-128 characters without spaces",
            "templates[0].allowed_callers",
        ),
    ];
    for (text, want, want_key) in cases {
        let (got, key) = error(text);
        assert_eq!(got, want, "{text}");
        assert_eq!(key.as_deref(), Some(want_key), "{text}");
    }
}

#[test]
fn test_overlapping_allow_and_deny_is_accepted() {
    let p =
        parse("id: x\nnetwork: {egress: true, allowed_cidrs: [10.0.0.0/8], denied_cidrs: [10.1.0.0/16]}\n");
    assert_eq!(p.network.denied_cidrs.unwrap().len(), 1);
}

#[test]
fn test_validate_checks_policies_built_in_code() {
    let mut p = parse("id: code\n");
    p.network.allowed_egress_ports = Some(vec![0]);
    let e = p.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "code: network.allowed_egress_ports: port 0 is out of range: use 1-65535"
    );
    p.network.allowed_egress_ports = None;
    p.security.extra_denied_syscalls = Some(vec!["nope".into()]);
    assert_eq!(
        p.validate().unwrap_err().key.as_deref(),
        Some("security.extra_denied_syscalls")
    );
    p.security.extra_denied_syscalls = None;
    p.resources.max_duration = Some("forever".into());
    assert_eq!(
        p.validate().unwrap_err().key.as_deref(),
        Some("resources.max_duration")
    );
}

/// 100 policies (25 defaults, 75 overrides of 4 tenants each, 20 template rules apiece), and admission for
/// every tenant against what the rules say.
#[test]
fn test_many_policies_admit_correctly() {
    let policies: Vec<Policy> = (0..100).map(|i| parse(&generated_policy(i))).collect();
    assert_eq!(policies.iter().filter(|p| p.is_default()).count(), 25);

    for round in 0..2_000u32 {
        let t = round % 310; // tenants 300-309 have no override
        let tenant = format!("team-{t}");
        let template = format!("tpl-{}", round % 23); // tpl-20..22 have no rule
        let policy = effective(&policies, &tenant, Some(&template));

        // The last default (24) sets the defaults; overrides name tenants 4(i-25)..4(i-25)+3.
        let override_id = (t < 300).then(|| 25 + t / 4);
        let mut want_sources: Vec<String> = (0..25).map(|i| format!("policy-{i}")).collect();
        want_sources.extend(override_id.map(|i| format!("policy-{i}")));
        assert_eq!(policy.sources, want_sources);
        let egress = override_id.is_some_and(|i| i % 2 == 0);
        assert_eq!(policy.network.egress, egress, "{tenant}");

        let mut request = AdmissionRequest {
            tenant: tenant.clone(),
            template: Some(template.clone()),
            network: if round % 3 == 0 {
                NetworkRequest::Egress
            } else {
                NetworkRequest::None
            },
            ..AdmissionRequest::default()
        };
        let usage = Usage {
            sandboxes: round % 60,
            ..Usage::default()
        };
        let decision = admit(&mut request, &policy, &usage);

        let has_rule = round % 23 < 20;
        let max_sandboxes = if override_id.is_some() { 40 } else { 50 };
        let want = if round % 3 == 0 && !egress {
            Some(("security", 403))
        } else if usage.sandboxes >= max_sandboxes {
            Some(("quota", 429))
        } else {
            None
        };
        let got = decision.rejection.as_ref().map(|r| (r.judge, r.status));
        assert_eq!(got, want, "{tenant} {template} {usage:?}: {decision:?}");
        if want.is_none() {
            let class = if has_rule { "flame" } else { "ember" };
            assert_eq!(request.cpus, resource_class(class).map(|c| c.cpus));
            let timeout = if has_rule {
                Duration::from_secs(600)
            } else {
                Duration::from_secs(1800)
            };
            assert_eq!(request.timeout, Some(timeout));
            let constraints = compile(&policy, &request);
            assert_eq!(
                matches!(constraints.network, NetworkContract::Egress { .. }),
                round % 3 == 0
            );
        }
    }
}

/// Policy `i` of the many-policies test and the admission bench: 0-24 are defaults, 25-99 override tenants
/// `team-{4(i-25)}` to `team-{4(i-25)+3}`, even overrides allowing egress; each has 20 template rules.
pub(crate) fn generated_policy(i: u32) -> String {
    let mut text = format!("id: policy-{i}\nversion: {i}\n");
    if i >= 25 {
        let first = 4 * (i - 25);
        text += &format!(
            "tenants: [team-{first}, team-{}, team-{}, team-{}]\n",
            first + 1,
            first + 2,
            first + 3
        );
        text += &format!("network: {{egress: {}}}\n", i % 2 == 0);
        text += "resources: {max_sandboxes: 40}\n";
    } else {
        text += "resources: {max_duration: 30m, max_sandboxes: 50, max_cpu_cores: 4}\n";
    }
    text += "templates:\n";
    for t in 0..20 {
        text += &format!("  - {{id: tpl-{t}, max_instances: 30, default_timeout: 10m, class: flame}}\n");
    }
    text
}

#[test]
fn test_the_crate_docs_example_parses() {
    let docs: String = include_str!("lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let yaml = docs
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let p = parse(yaml);
    assert_eq!(p.templates[0].id, "python-ds");
    assert_eq!(
        p.security.extra_denied_syscalls.as_deref(),
        Some(&["mincore".to_string()][..])
    );
}

#[test]
fn test_contradiction_in_json_points_at_the_quoted_key() {
    let text = "{\n  \"id\": \"j\",\n  \"network\": {\"egress\": false, \"dns\": true}\n}\n";
    let e = parse_policy(text, "p.json").unwrap_err();
    assert_eq!(e.location, Some((3, 32)), "{e}");
    assert_eq!(e.key.as_deref(), Some("network.dns"));
}

#[test]
fn test_a_json_policy_with_a_bad_second_template_rule_is_located_and_does_not_hang() {
    // Found by the api_body fuzz target: locating the rule searched on from inside the first quoted
    // `"id"` key, found that key again, and looped forever (a policy apply held a thread at 100% CPU).
    let text = "{\n  \"id\": \"p\",\n  \"resources\": {\"max_duration\": \"1m\"},\n  \"templates\": [\n    \
                {\"id\": \"a\"},\n    {\"id\": \"b\", \"default_timeout\": \"10m\"}\n  ]\n}\n";
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || drop(done.send(parse_policy(text, "p.json"))));
    let result = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("parse_policy did not return within 10 s");
    let e = result.unwrap_err();
    assert_eq!(e.location, Some((6, 17)), "{e}");
    assert_eq!(e.key.as_deref(), Some("templates[1].default_timeout"));
}
