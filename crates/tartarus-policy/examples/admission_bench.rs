//! Admission latency: 100 policies (20 defaults, 80 tenant overrides, 20 template rules each), then 1k untimed and
//! 100k timed admissions — `effective` + `admit` — for random tenants and templates, printing p50/p99/max.
//!
//! `cargo run --release -p tartarus-policy --example admission_bench`

use std::hint::black_box;
use std::time::{Duration, Instant};

use tartarus_policy::{admit, effective, parse_policy, AdmissionRequest, NetworkRequest, Policy, Usage};

const POLICIES: u32 = 100;
const DEFAULTS: u32 = 20;
const TEMPLATES: u32 = 20;
const TENANTS: u64 = 400;
const ADMISSIONS: usize = 100_000;
/// Untimed rounds first, so the caches and the allocator are warm.
const WARM_UP: usize = 1_000;

fn main() {
    let policies: Vec<Policy> = (0..POLICIES)
        .map(
            |i| match parse_policy(&policy_text(i), &format!("policy-{i}.yaml")) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            },
        )
        .collect();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut samples = Vec::with_capacity(ADMISSIONS);
    let (mut accepted, mut rejected) = (0u32, 0u32);
    for round in 0..WARM_UP + ADMISSIONS {
        let tenant = format!("team-{}", rng.next() % TENANTS);
        // One request in 10 names a template without rules.
        let template = format!("tpl-{}", rng.next() % (TEMPLATES as u64 + 2));
        let mut request = AdmissionRequest {
            tenant,
            template: Some(template),
            network: match rng.next() % 4 {
                0 => NetworkRequest::Egress,
                _ => NetworkRequest::None,
            },
            quarantined: rng.next() % 50 == 0,
            ..AdmissionRequest::default()
        };
        let usage = Usage {
            sandboxes: (rng.next() % 45) as u32,
            cpu_cores: (rng.next() % 16) as f64,
            memory_mb: rng.next() % 65536,
            template_instances: (rng.next() % 25) as u32,
        };

        let start = Instant::now();
        let policy = effective(&policies, &request.tenant, request.template.as_deref());
        let decision = admit(&mut request, &policy, &usage);
        let elapsed = start.elapsed();

        if round < WARM_UP {
            continue;
        }
        samples.push(elapsed);
        match black_box(decision).accepted() {
            true => accepted += 1,
            false => rejected += 1,
        }
    }
    samples.sort_unstable();
    let at = |q: f64| micros(samples[((samples.len() - 1) as f64 * q) as usize]);
    println!(
        "{ADMISSIONS} admissions (effective + admit) over {POLICIES} policies ({DEFAULTS} defaults, {} overrides, \
         {TEMPLATES} template rules each), {TENANTS} tenants: {accepted} accepted, {rejected} rejected",
        POLICIES - DEFAULTS
    );
    println!(
        "p50 {:.2} us  p99 {:.2} us  max {:.2} us",
        at(0.50),
        at(0.99),
        micros(samples[samples.len() - 1])
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Policies 0-19 are defaults; 20-99 override four tenants each (tenants 320-399 have none), the even ones
/// allowing egress.
fn policy_text(i: u32) -> String {
    let mut text = format!("id: policy-{i}\nversion: 1\n");
    if i >= DEFAULTS {
        let first = 4 * (i - DEFAULTS);
        text += &format!(
            "tenants: [team-{first}, team-{}, team-{}, team-{}]\n",
            first + 1,
            first + 2,
            first + 3
        );
        match i % 2 {
            0 => {
                text +=
                    "network: {egress: true, allowed_egress_ports: [443], denied_cidrs: [198.51.100.0/24]}\n"
            }
            _ => text += "network: {egress: false}\n",
        }
        text += "resources: {max_sandboxes: 40, max_cpu_cores: 4, classes: [ember, flame, blaze]}\n";
    } else {
        text += "resources: {max_duration: 30m, max_sandboxes: 50, max_total_cpu_cores: 24}\n";
        text += "security: {extra_denied_syscalls: [mincore]}\n";
    }
    text += "templates:\n";
    for t in 0..TEMPLATES {
        let class = ["ember", "flame", "blaze"][((i + t) % 3) as usize];
        text += &format!(
            "  - {{id: tpl-{t}, max_instances: {}, default_timeout: {}m, class: {class}}}\n",
            20 + (i + t) % 10,
            5 + t % 10
        );
    }
    text
}

/// A small deterministic generator (the bench needs no crate for randomness).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
