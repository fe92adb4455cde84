//! Policy and template documents (`tartarus-policy`, `tartarus-image/src/template.rs`, over
//! `tartarus-document`): YAML or JSON text from API callers and `-f FILE`.
//!
//! Properties: an error's position is inside the text; an accepted document validates, and both its
//! canonical JSON (what the server stores) and its YAML (what it shows) parse back to the same document; an
//! accepted policy's effective policy admits and compiles any request without panicking, and an accepted
//! request compiles to constraints within the policy's maxima.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tartarus_document::{line_column, DocumentError};
use tartarus_image::template::{parse_template, Template};
use tartarus_policy::{admit, compile, effective, parse_policy, AdmissionRequest, Policy, Usage};

/// A reported position is a real line and column of `text`, whether the parser or a search of the text
/// found it (both count lines the YAML way).
fn check_location(text: &str, error: &DocumentError) {
    assert!(!error.message.is_empty());
    if let Some((line, column)) = error.location {
        let (lines, _) = line_column(text, text.len());
        assert!(line >= 1 && column >= 1, "{error}");
        // The parser may point one past the last line (at the end of input).
        assert!(line <= lines + 1, "{error}: line {line} of {lines}");
    }
}

fn policy(text: &str) {
    let policy = match parse_policy(text, "fuzz.yaml") {
        Ok(policy) => policy,
        Err(e) => return check_location(text, &e),
    };
    policy.validate().expect("an accepted policy validates");
    let json = policy.to_json();
    let from_json = parse_policy(&json, "stored.json").unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(from_json, policy, "{json}");
    assert_eq!(
        serde_json::from_str::<Policy>(&json).expect("stored JSON reads"),
        policy
    );
    let yaml = policy.to_yaml();
    let from_yaml = parse_policy(&yaml, "shown.yaml").unwrap_or_else(|e| panic!("{e}: {yaml}"));
    assert_eq!(from_yaml, policy, "{yaml}");

    let tenant = policy
        .tenants
        .as_ref()
        .and_then(|t| t.first())
        .cloned()
        .unwrap_or_else(|| "fuzz".into());
    let template = policy.templates.first().map(|t| t.id.clone());
    let effective = effective(std::slice::from_ref(&policy), &tenant, template.as_deref());
    let max = effective.resources.clone();
    let plain = AdmissionRequest {
        tenant: tenant.clone(),
        template: template.clone(),
        ..AdmissionRequest::default()
    };
    let at_maxima = AdmissionRequest {
        class: max.classes.first().cloned(),
        cpus: Some(max.max_cpu_cores),
        memory_mb: Some(max.max_memory_mb),
        timeout: Some(max.max_duration),
        pids: Some(u64::from(max.max_pids)),
        ..plain.clone()
    };
    for mut request in [plain, at_maxima] {
        let decision = admit(&mut request, &effective, &Usage::default());
        if !decision.accepted() {
            continue;
        }
        let constraints = compile(&effective, &request);
        if let Some(cpus) = constraints.cpus {
            assert!(
                cpus > 0.0 && cpus <= max.max_cpu_cores + 1e-9,
                "cpus {cpus} over {}",
                max.max_cpu_cores
            );
        }
        if let Some(memory) = constraints.memory_mb {
            assert!(
                memory <= max.max_memory_mb,
                "memory {memory} over {}",
                max.max_memory_mb
            );
        }
        if let Some(timeout) = constraints.timeout {
            assert!(
                timeout <= max.max_duration,
                "timeout {timeout:?} over {:?}",
                max.max_duration
            );
        }
        assert!(
            constraints.pids <= u64::from(max.max_pids),
            "pids {} over {}",
            constraints.pids,
            max.max_pids
        );
    }
}

fn template(text: &str) {
    let template = match parse_template(text, "fuzz.yaml") {
        Ok(template) => template,
        Err(e) => return check_location(text, &e),
    };
    template.validate().expect("an accepted template validates");
    let json = template.to_json();
    let from_json = parse_template(&json, "stored.json").unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(from_json, template, "{json}");
    assert_eq!(
        serde_json::from_str::<Template>(&json).expect("stored JSON reads"),
        template
    );
    let yaml = template.to_yaml();
    let from_yaml = parse_template(&yaml, "shown.yaml").unwrap_or_else(|e| panic!("{e}: {yaml}"));
    assert_eq!(from_yaml, template, "{yaml}");
    if let Some(timeout) = template.timeout() {
        assert!(timeout > std::time::Duration::ZERO && timeout <= tartarus_image::template::MAX_TIMEOUT);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    policy(text);
    template(text);
});
