//! `tartarus node`: run the node agent (`--control URL --token T`), or manage nodes on the control plane
//! (`node token create ID`, `node ls`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tartarus_scheduler::{Resources, Taint, TaintEffect};
use tartarus_server::node_agent::{run, AgentConfig};

use crate::client::Client;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// The control plane's URL (http://HOST:PORT)
    #[arg(long, env = "TARTARUS_CONTROL", value_name = "URL")]
    control: Option<String>,
    /// This node's join token (`tartarus node token create ID` on the control plane)
    #[arg(
        long,
        env = "TARTARUS_NODE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// This node's id (default: the host name)
    #[arg(long)]
    id: Option<String>,
    /// A label the scheduler can select on (repeatable): KEY=VALUE
    #[arg(long = "labels", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A taint (repeatable): KEY=VALUE:NoSchedule or KEY=VALUE:PreferNoSchedule
    #[arg(long = "taint", value_name = "KEY=VALUE:EFFECT")]
    taints: Vec<String>,
    /// How log lines on stderr look: text for people, json (one object a line) for log collectors
    #[arg(long, value_enum, default_value_t = super::server::LogFormat::Text)]
    log_format: super::server::LogFormat,
    /// Where the agent listens
    #[arg(long, default_value = "127.0.0.1:7071")]
    listen: SocketAddr,
    /// Report this many CPUs instead of the machine's
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Dedicate this node to a resource class (repeatable: ember, flame, blaze, inferno)
    #[arg(long = "pool", value_name = "CLASS")]
    pools: Vec<String>,
    /// Make this a quarantine node: it takes only quarantined sandboxes
    #[arg(long)]
    quarantine: bool,
    /// This node's own state (sandboxes, SQLite) (default: DATA_DIR/node, see `apikey --help`)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Report this much memory instead of the machine's (e.g. 8G)
    #[arg(long, value_name = "SIZE", value_parser = |s: &str| tartarus_runtime::units::parse_size(s).map_err(|e| e.to_string()))]
    memory: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Join tokens (admin)
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Remove a node and its token (admin); its sandboxes still running are marked lost
    Rm { id: String },
    /// List registered nodes
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create (or replace) node ID's join token; prints it once
    Create { id: String },
}

fn parse_taint(text: &str) -> anyhow::Result<Taint> {
    let bad = || anyhow!("--taint {text}: use KEY=VALUE:NoSchedule or KEY=VALUE:PreferNoSchedule");
    let (pair, effect) = text.rsplit_once(':').ok_or_else(bad)?;
    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
    let effect = match effect {
        "NoSchedule" => TaintEffect::NoSchedule,
        "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
        _ => return Err(bad()),
    };
    if key.is_empty() {
        return Err(bad());
    }
    Ok(Taint::new(key, value, effect))
}

/// `process,gvisor`: the lanes a node reported (`process` for an agent that reports none).
fn lanes(node: &serde_json::Value) -> String {
    let names: Vec<&str> = node["lanes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|lane| lane["name"].as_str())
        .collect();
    match names.is_empty() {
        true => "process".to_string(),
        false => names.join(","),
    }
}

pub fn run_node(args: NodeArgs) -> anyhow::Result<u8> {
    match args.command {
        Some(NodeCommand::Token {
            command: TokenCommand::Create { id },
        }) => {
            let created = Client::from_env()?.json("POST", "/v1/nodes/tokens", Some(json!({"id": id})))?;
            println!("{}", created["token"].as_str().unwrap_or_default());
            eprintln!("start the agent with: tartarus node --control URL --id {id} --token TOKEN");
            Ok(0)
        }
        Some(NodeCommand::Rm { id }) => {
            Client::from_env()?.json(
                "DELETE",
                &format!("/v1/nodes/{}", crate::client::encode(&id)),
                None,
            )?;
            eprintln!("node {id} removed");
            Ok(0)
        }
        Some(NodeCommand::Ls { json }) => {
            let nodes = Client::from_env()?.json("GET", "/v1/nodes", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
                return Ok(0);
            }
            println!(
                "{:<20} {:<12} {:>6} {:>10} {:<22} {:<22} LABELS",
                "ID", "STATE", "CPUS", "MEMORY", "ADDRESS", "LANES"
            );
            for n in nodes.as_array().into_iter().flatten() {
                let cpus = n["capacity"]["cpu_millis"].as_u64().unwrap_or(0) as f64 / 1000.0;
                let memory = n["capacity"]["memory_bytes"].as_u64().unwrap_or(0) >> 20;
                println!(
                    "{:<20} {:<12} {:>6} {:>8}Mi {:<22} {:<22} {}",
                    n["id"].as_str().unwrap_or_default(),
                    n["state"].as_str().unwrap_or_default(),
                    cpus,
                    memory,
                    n["address"].as_str().unwrap_or_default(),
                    lanes(n),
                    n["labels"]
                );
            }
            Ok(0)
        }
        None => agent(args.agent),
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<u8> {
    super::server::init_daemon(args.log_format);
    let control = args
        .control
        .ok_or_else(|| anyhow!("give the control plane: --control http://HOST:PORT"))?;
    let token = args.token.ok_or_else(|| {
        anyhow!("give this node's join token: --token (from `tartarus node token create ID`)")
    })?;
    let id = match args.id {
        Some(id) => id,
        None => rustix::system::uname().nodename().to_string_lossy().into_owned(),
    };
    let mut labels = BTreeMap::new();
    for label in &args.labels {
        let (k, v) = label
            .split_once('=')
            .ok_or_else(|| anyhow!("--labels {label}: use KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let taints = args
        .taints
        .iter()
        .map(|t| parse_taint(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let capacity = match (args.cpus, args.memory) {
        (None, None) => None,
        (cpus, memory) => {
            let machine = tartarus_server::node_agent::machine_capacity()?;
            if cpus.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
                bail!("--cpus must be a positive number");
            }
            Some(Resources::new(
                cpus.map(|c| (c * 1000.0) as u64).unwrap_or(machine.cpu_millis),
                memory.unwrap_or(machine.memory_bytes),
                machine.gpus,
            ))
        }
    };
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| super::apikey::default_data_dir().join("node"));
    let server = super::server::default_config(args.listen, data_dir)?;
    let config = AgentConfig {
        control,
        token,
        id,
        labels,
        taints,
        listen: args.listen,
        capacity,
        pools: args.pools.iter().cloned().collect(),
        quarantine: args.quarantine,
        server,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config, super::server::print_listening))?;
    Ok(0)
}
