//! Alternates runs of command A and command B (argument lists separated by `--vs--`), timing each from
//! spawn to exit, and prints p50/p95 of each and the p50 ratio A/B as the last line.
//!
//! Usage: spawn-timer RUNS LABEL_A LABEL_B CMD_A... --vs-- CMD_B...

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_once(cmd: &[String]) -> Duration {
    let start = Instant::now();
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd[0]));
    let elapsed = start.elapsed();
    assert!(status.success(), "{} failed: {status}", cmd.join(" "));
    elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: spawn-timer RUNS LABEL_A LABEL_B CMD_A... --vs-- CMD_B...";
    let runs: usize = args.first().and_then(|r| r.parse().ok()).expect(usage);
    let (label_a, label_b) = (args.get(1).expect(usage), args.get(2).expect(usage));
    let rest = &args[3..];
    let split = rest.iter().position(|a| a == "--vs--").expect(usage);
    let (cmd_a, cmd_b) = (&rest[..split], &rest[split + 1..]);
    assert!(!cmd_a.is_empty() && !cmd_b.is_empty(), "{usage}");
    for _ in 0..20 {
        run_once(cmd_a);
        run_once(cmd_b);
    }
    let mut a = Vec::with_capacity(runs);
    let mut b = Vec::with_capacity(runs);
    for _ in 0..runs {
        a.push(run_once(cmd_a));
        b.push(run_once(cmd_b));
    }
    a.sort();
    b.sort();
    for (label, samples) in [(label_a, &a), (label_b, &b)] {
        println!(
            "{label:<10} runs {runs}  p50 {:.2} ms  p95 {:.2} ms",
            percentile(samples, 0.5),
            percentile(samples, 0.95)
        );
    }
    println!(
        "p50 ratio {label_a}/{label_b}: {:.2}",
        percentile(&a, 0.5) / percentile(&b, 0.5)
    );
}
