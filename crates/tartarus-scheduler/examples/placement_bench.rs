//! Placement throughput and latency on a simulated cluster in steady state.
//!
//! 100 nodes (by default) of four sizes with zones, disk labels, GPU nodes (pool `inferno`, tainted),
//! dedicated `blaze` nodes, quarantine nodes, spot nodes (a `PreferNoSchedule` taint), some unreachable or
//! draining, and some usage of their own. A seeded stream of requests of every class, some with selectors,
//! affinities, tolerations and spread groups, is reserved through `Cluster::reserve`; once about
//! `--live` reservations exist, each new one is matched by the release of a random old one, so the cluster
//! stays about as full as it is. Each decision (`reserve`, placed or refused) is timed on its own; the
//! throughput counts the whole loop (request building and releases included).
//!
//! ```sh
//! cargo run --release -p tartarus-scheduler --example placement_bench -- --nodes 100 --decisions 100000
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use tartarus_scheduler::{
    Cluster, LabelTerm, Node, NodeState, Request, ReserveError, Resources, Strategy, Taint, TaintEffect,
    Toleration,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

struct Options {
    nodes: usize,
    decisions: usize,
    warmup: usize,
    live: usize,
}

fn main() -> Result<(), Box<dyn Error>> {
    let options = parse_options()?;
    println!(
        "# cargo run --release -p tartarus-scheduler --example placement_bench -- --nodes {} --decisions {} \
         --warmup {} --live {}",
        options.nodes, options.decisions, options.warmup, options.live
    );
    if cfg!(debug_assertions) {
        println!("# warning: a debug build; numbers are only meaningful with --release");
    }
    let nodes = build_nodes(options.nodes)?;
    println!("# {}", describe(&nodes));
    println!(
        "# {} warm-up decisions, then {} measured, per strategy; steady state at about {} reservations",
        options.warmup, options.decisions, options.live
    );
    println!();
    println!(
        "{:<13} {:>13} {:>8} {:>8} {:>8} {:>8} {:>8} {:>14}",
        "strategy", "decisions/s", "mean µs", "p50 µs", "p99 µs", "max µs", "placed", "unschedulable"
    );
    let mut refusals = Vec::new();
    for strategy in [Strategy::LeastLoaded, Strategy::BinPack] {
        let run = run(strategy, nodes.clone(), &options)?;
        let by_class: Vec<String> = run
            .refused_by_class
            .iter()
            .map(|(class, n)| format!("{class} {n}"))
            .collect();
        refusals.push(format!(
            "# {strategy} unschedulable by class: {}",
            by_class.join(", ")
        ));
        let mut latencies = run.latencies;
        latencies.sort_unstable();
        let total: Duration = latencies.iter().sum();
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        let at = |q: usize| latencies[(latencies.len() * q / 100).min(latencies.len() - 1)];
        println!(
            "{:<13} {:>13.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8} {:>14}",
            strategy.as_str(),
            latencies.len() as f64 / run.wall.as_secs_f64(),
            micros(total) / latencies.len() as f64,
            micros(at(50)),
            micros(at(99)),
            micros(latencies[latencies.len() - 1]),
            run.placed,
            run.refused,
        );
    }
    println!();
    for line in refusals {
        println!("{line}");
    }
    Ok(())
}

fn parse_options() -> Result<Options, Box<dyn Error>> {
    let mut options = Options {
        nodes: 100,
        decisions: 100_000,
        warmup: 10_000,
        live: 1_200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: usize = value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a number"))?;
        match flag.as_str() {
            "--nodes" => options.nodes = number,
            "--decisions" => options.decisions = number,
            "--warmup" => options.warmup = number,
            "--live" => options.live = number,
            _ => {
                return Err(format!("unknown option {flag} (--nodes, --decisions, --warmup, --live)").into())
            }
        }
    }
    if options.nodes == 0 || options.decisions == 0 {
        return Err("--nodes and --decisions must be at least 1".into());
    }
    Ok(options)
}

/// Numerical Recipes' 64-bit LCG: the same stream on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const ZONES: [&str; 3] = ["eu-1", "eu-2", "us-1"];

fn build_nodes(count: usize) -> Result<Vec<Node>, Box<dyn Error>> {
    let mut rng = Lcg(0x5eed);
    let sizes = [(8, 32), (16, 64), (32, 128), (64, 256)];
    let mut nodes = Vec::with_capacity(count);
    for i in 0..count {
        let (cores, gib) = sizes[i % sizes.len()];
        let gpus = if i % 10 == 9 { 4 } else { 0 };
        let capacity = Resources::new(cores * 1000, gib * GIB, gpus);
        let mut node = Node::new(format!("node-{i:03}"), capacity)?
            .with_label("zone", ZONES[i % ZONES.len()])
            .with_label("disk", if i % 2 == 0 { "ssd" } else { "hdd" })
            .with_label("rack", format!("r{}", i / 8));
        if gpus > 0 {
            node = node
                .with_pool("inferno")
                .with_taint(Taint::new("gpu", "true", TaintEffect::NoSchedule));
        } else if i % 25 == 0 {
            node = node.with_quarantine(true).with_pool("quarantine");
        } else if i % 10 == 4 {
            node = node.with_pool("blaze");
        }
        if i % 7 == 3 {
            node = node.with_taint(Taint::new("spot", "true", TaintEffect::PreferNoSchedule));
        }
        if i % 33 == 32 {
            node = node.with_state(NodeState::Unreachable);
        } else if i % 47 == 46 {
            node = node.with_state(NodeState::Draining);
        }
        // Up to 20% used by the node's own services.
        let own = Resources::new(
            capacity.cpu_millis * rng.below(21) / 100,
            capacity.memory_bytes * rng.below(21) / 100,
            0,
        );
        node = node.with_allocated(own);
        node.validate()?;
        nodes.push(node);
    }
    Ok(nodes)
}

fn describe(nodes: &[Node]) -> String {
    let count = |f: &dyn Fn(&Node) -> bool| nodes.iter().filter(|n| f(n)).count();
    let cores: u64 = nodes.iter().map(|n| n.capacity.cpu_millis / 1000).sum();
    format!(
        "{} nodes ({} cores): {} GPU (pool inferno, tainted), {} quarantine, {} dedicated to blaze, {} spot \
         (PreferNoSchedule), {} unreachable, {} draining",
        nodes.len(),
        cores,
        count(&|n| n.capacity.gpus > 0),
        count(&|n| n.quarantine),
        count(&|n| n.pools.contains("blaze")),
        count(&|n| n.taints.iter().any(|t| t.key == "spot")),
        count(&|n| n.state == NodeState::Unreachable),
        count(&|n| n.state == NodeState::Draining),
    )
}

/// The `n`-th request of the stream.
fn request(rng: &mut Lcg, n: usize) -> Request {
    let id = format!("sbx-{n}");
    let roll = rng.below(100);
    let mut request = match roll {
        0..=49 => Request::new(id, Resources::new(1000, 512 * MIB, 0)).with_class("ember"),
        50..=74 => Request::new(id, Resources::new(2000, 2 * GIB, 0)).with_class("flame"),
        75..=86 => Request::new(id, Resources::new(4000, 8 * GIB, 0)).with_class("blaze"),
        87..=91 => Request::new(id, Resources::new(8000, 32 * GIB, 1))
            .with_class("inferno")
            .with_toleration(Toleration::exact("gpu", "true")),
        92..=94 => Request::new(id, Resources::new(1000, 512 * MIB, 0)).with_class("quarantine"),
        _ => Request::new(id, Resources::new(500, 256 * MIB, 0)),
    };
    if rng.below(10) < 3 {
        request = request.with_selector("zone", ZONES[rng.below(3) as usize]);
    }
    if rng.below(10) < 2 {
        request = request.with_affinity(LabelTerm::new("disk", "ssd", 50));
    }
    if rng.below(10) == 0 {
        request = request.with_anti_affinity(LabelTerm::has_key("spot", 30));
    } else if rng.below(10) == 0 {
        request = request.with_toleration(Toleration::any_value("spot"));
    }
    if rng.below(10) < 4 {
        request = request.in_group(format!("app-{}", rng.below(20)), true);
    }
    request
}

struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
    placed: usize,
    refused: usize,
    /// Refused decisions by the request's class.
    refused_by_class: BTreeMap<String, usize>,
}

fn run(strategy: Strategy, nodes: Vec<Node>, options: &Options) -> Result<Run, Box<dyn Error>> {
    let mut cluster = Cluster::new(nodes)?;
    let mut rng = Lcg(42);
    let mut live: Vec<String> = Vec::with_capacity(options.live + 1);
    let mut latencies = Vec::with_capacity(options.decisions);
    let (mut placed, mut refused) = (0, 0);
    let mut refused_by_class = BTreeMap::new();
    let mut started = Instant::now();
    for n in 0..options.warmup + options.decisions {
        if n == options.warmup {
            started = Instant::now();
        }
        let request = request(&mut rng, n);
        let before = Instant::now();
        let outcome = cluster.reserve(&request, strategy);
        let took = before.elapsed();
        let measured = n >= options.warmup;
        match outcome {
            Ok(reserved) => {
                placed += usize::from(measured);
                live.push(reserved.reservation.request_id);
            }
            Err(ReserveError::Unschedulable(_)) if measured => {
                refused += 1;
                let class = request.class.clone().unwrap_or_else(|| "(none)".to_string());
                *refused_by_class.entry(class).or_default() += 1;
            }
            Err(ReserveError::Unschedulable(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if measured {
            latencies.push(took);
        }
        if live.len() > options.live {
            let victim = live.swap_remove(rng.below(live.len() as u64) as usize);
            cluster.release(&victim).ok_or("a live reservation was missing")?;
        }
    }
    Ok(Run {
        latencies,
        wall: started.elapsed(),
        placed,
        refused,
        refused_by_class,
    })
}
