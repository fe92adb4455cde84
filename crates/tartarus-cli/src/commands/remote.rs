//! Commands that talk to `tartarus server`: config, create, ps, inspect, exec, logs, cp, kill.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use tartarus_runtime::units::{parse_duration, parse_size};

use tartarus_store::now_ms;

use crate::client::{encode, with_query, Client, Config};

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Set `host` (http://HOST:PORT) or `api-key`
    Set { key: String, value: String },
    /// Show the configuration (the key is masked)
    Show,
}

pub fn config(args: ConfigArgs) -> anyhow::Result<u8> {
    let mut config = Config::load()?;
    match args.command {
        ConfigCommand::Set { key, value } => {
            match key.as_str() {
                "host" => config.host = Some(value),
                "api-key" | "api_key" => config.api_key = Some(value),
                other => anyhow::bail!("unknown setting '{other}': use host or api-key"),
            }
            let path = config.save()?;
            eprintln!("tartarus: saved {}", path.display());
        }
        ConfigCommand::Show => {
            println!("host = {}", config.host.as_deref().unwrap_or("(not set)"));
            let masked = config
                .api_key
                .as_deref()
                .map(|k| format!("{}…", &k[..k.len().min(7)]));
            println!("api-key = {}", masked.as_deref().unwrap_or("(not set)"));
        }
    }
    Ok(0)
}

fn object(pairs: Vec<(String, String)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Start from a template (its image, defaults and warm pool; see `tartarus template ls`)
    #[arg(long, conflicts_with = "image")]
    template: Option<String>,
    /// Start from an OCI image (pulled by the server if needed)
    #[arg(long)]
    image: Option<String>,
    /// Resource class: ember, flame, blaze, inferno or quarantine
    #[arg(long)]
    class: Option<String>,
    /// Memory limit, e.g. 512M
    #[arg(long, value_parser = |s: &str| parse_size(s).map_err(|e| e.to_string()))]
    memory: Option<u64>,
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    /// Lifetime limit, e.g. 10m
    #[arg(long, value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    timeout: Option<Duration>,
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    env: Vec<(String, String)>,
    #[arg(long = "label", short = 'l', value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// none or host-loopback
    #[arg(long)]
    network: Option<String>,
    /// Isolation lane: auto (the policy decides), process or gvisor (see `tartarus runtimes`)
    #[arg(long)]
    runtime: Option<String>,
    /// Print the whole record as JSON instead of the id
    #[arg(long)]
    json: bool,
    /// Optional main command; the sandbox ends when it exits
    #[arg(last = true)]
    cmd: Vec<String>,
}

pub fn create(args: CreateArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    let mut body = json!({
        "env": object(args.env),
        "labels": object(args.labels),
        "resources": {"memory_mb": args.memory.map(|m| m.div_ceil(1 << 20)), "cpus": args.cpus, "pids": args.pids},
    });
    if let Some(t) = args.timeout {
        body["timeout_s"] = json!(t.as_secs().max(1));
    }
    if let Some(n) = args.network {
        body["network"] = json!(n);
    }
    if !args.cmd.is_empty() {
        body["cmd"] = json!(args.cmd);
    }
    if let Some(template) = args.template {
        body["template"] = json!(template);
    }
    if let Some(image) = args.image {
        body["image"] = json!(image);
    }
    if let Some(class) = args.class {
        body["class"] = json!(class);
    }
    if let Some(runtime) = args.runtime {
        body["runtime"] = json!(runtime);
    }
    let record = client.json("POST", "/v1/sandboxes", Some(body))?;
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&record)?),
        false => println!("{}", record["id"].as_str().unwrap_or_default()),
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct PsArgs {
    #[arg(long)]
    status: Option<String>,
    /// key=value
    #[arg(long)]
    label: Option<String>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn duration_text(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn ps(args: PsArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    let mut query = Vec::new();
    if let Some(s) = &args.status {
        query.push(format!("status={}", encode(s)));
    }
    if let Some(l) = &args.label {
        query.push(format!("label={}", encode(l)));
    }
    let path = with_query("/v1/sandboxes", &query);
    let list = client.json("GET", &path, None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:<10} {:<8} {:<10} DURATION",
        "ID", "TEMPLATE", "STATUS", "STARTED"
    );
    for s in list.as_array().into_iter().flatten() {
        let created = s["created_ms"].as_i64().unwrap_or(0);
        let end = s["finished_ms"].as_i64().unwrap_or_else(now_ms);
        println!(
            "{:<16} {:<10} {:<8} {:<10} {}",
            s["id"].as_str().unwrap_or_default(),
            s["template"].as_str().unwrap_or("-"),
            s["status"].as_str().unwrap_or_default(),
            format!("{} ago", duration_text(now_ms() - created)),
            duration_text(end - created),
        );
    }
    Ok(0)
}

pub fn inspect(id: String) -> anyhow::Result<u8> {
    let record = Client::from_env()?.json("GET", &format!("/v1/sandboxes/{}", encode(&id)), None)?;
    if let Some(runtime) = record["runtime"].as_str() {
        let reason = record["runtime_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        eprintln!("lane: {runtime}{reason}");
    }
    println!("{}", serde_json::to_string_pretty(&record)?);
    Ok(0)
}

pub fn kill(id: String) -> anyhow::Result<u8> {
    let record = Client::from_env()?.json("DELETE", &format!("/v1/sandboxes/{}", encode(&id)), None)?;
    eprintln!(
        "tartarus: {} {}",
        record["id"].as_str().unwrap_or(&id),
        record["status"].as_str().unwrap_or("killed")
    );
    Ok(0)
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// One tenant's records (admin keys only; others see their own tenant)
    #[arg(long)]
    tenant: Option<String>,
    /// Only records newer than this, e.g. 1h or 30m
    #[arg(long, value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    since: Option<Duration>,
    #[arg(long)]
    json: bool,
}

/// Prints the audit trail, newest first.
pub fn audit(args: AuditArgs) -> anyhow::Result<u8> {
    let mut query = Vec::new();
    if let Some(t) = &args.tenant {
        query.push(format!("tenant={}", encode(t)));
    }
    if let Some(d) = args.since {
        query.push(format!("since_ms={}", now_ms() - d.as_millis() as i64));
    }
    let path = with_query("/v1/audit", &query);
    let records = Client::from_env()?.json("GET", &path, None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(0);
    }
    println!(
        "{:<10} {:<12} {:<22} {:<20} {:<16} OUTCOME",
        "AGO", "TENANT", "KEY", "ACTION", "TARGET"
    );
    for r in records.as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<12} {:<22} {:<20} {:<16} {}",
            duration_text(now_ms() - r["at_ms"].as_i64().unwrap_or(0)),
            r["tenant"].as_str().unwrap_or_default(),
            r["key_id"].as_str().unwrap_or("-"),
            r["action"].as_str().unwrap_or_default(),
            r["target"].as_str().unwrap_or("-"),
            r["outcome"].as_str().unwrap_or_default(),
        );
    }
    Ok(0)
}

pub fn quarantine(id: String) -> anyhow::Result<u8> {
    Client::from_env()?.json("POST", &format!("/v1/sandboxes/{}/quarantine", encode(&id)), None)?;
    eprintln!("tartarus: {id} quarantined: network cut off, processes frozen");
    Ok(0)
}

pub fn set_paused(id: String, paused: bool, to_disk: bool) -> anyhow::Result<u8> {
    let op = if paused { "pause" } else { "resume" };
    let body = to_disk.then(|| serde_json::json!({ "mode": "disk" }));
    let record = Client::from_env()?.json("POST", &format!("/v1/sandboxes/{}/{op}", encode(&id)), body)?;
    let on_disk = match record["paused_to"].as_str() {
        Some("disk") => " (on disk)",
        _ => "",
    };
    eprintln!(
        "tartarus: {} {}{on_disk}",
        record["id"].as_str().unwrap_or(&id),
        record["status"].as_str().unwrap_or(op)
    );
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    id: String,
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    env: Vec<(String, String)>,
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    #[arg(long, value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    timeout: Option<Duration>,
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

/// Runs a command in a sandbox; exits with the command's exit code.
pub fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    let mut body = json!({
        "cmd": args.cmd,
        "env": object(args.env),
        "cwd": args.workdir,
    });
    if let Some(t) = args.timeout {
        body["timeout_s"] = json!(t.as_secs_f64());
    }
    if !std::io::stdin().is_terminal() {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        if !input.is_empty() {
            body["stdin"] = json!(input);
        }
    }
    body["stream"] = json!(true);
    // Server-Sent Events: `stdout`/`stderr` carry a JSON string each; `exit` ends the stream.
    let reader = client.post_stream(&format!("/v1/sandboxes/{}/exec", encode(&args.id)), body)?;
    let mut event = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
        let line = line?;
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_string();
            continue;
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data: Value = serde_json::from_str(data.trim())?;
        match event.as_str() {
            "stdout" => {
                let mut out = std::io::stdout().lock();
                out.write_all(data.as_str().unwrap_or_default().as_bytes())?;
                out.flush()?;
            }
            "stderr" => std::io::stderr().write_all(data.as_str().unwrap_or_default().as_bytes())?,
            "exit" => {
                if data["timed_out"] == true {
                    eprintln!("tartarus: timed out; the command was killed");
                }
                return Ok(data["exit_code"].as_i64().unwrap_or(125).clamp(0, 255) as u8);
            }
            _ => {}
        }
    }
    anyhow::bail!("the server closed the exec stream before the command ended")
}

pub fn logs(id: String, follow: bool) -> anyhow::Result<u8> {
    let path = format!(
        "/v1/sandboxes/{}/logs{}",
        encode(&id),
        if follow { "?follow=true" } else { "" }
    );
    let mut reader = Client::from_env()?.get_reader(&path)?;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    Ok(0)
}

/// `cp SRC DST`: one side is `SANDBOX_ID:/path`, the other a host path (`-` for stdin/stdout).
pub fn cp(src: String, dst: String) -> anyhow::Result<u8> {
    let remote = |s: &str| {
        s.split_once(':')
            .filter(|(id, path)| !id.is_empty() && path.starts_with('/'))
            .map(|(a, b)| (a.to_string(), b.to_string()))
    };
    let client = Client::from_env()?;
    match (remote(&src), remote(&dst)) {
        (None, Some((id, path))) => {
            let bytes = match src.as_str() {
                "-" => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
                file => std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {file}: {e}"))?,
            };
            client.put_bytes(&format!("/v1/sandboxes/{}/files?path={}", encode(&id), encode(&path)), &bytes)?;
        }
        (Some((id, path)), None) => {
            let mut reader = client.get_reader(&format!("/v1/sandboxes/{}/files?path={}", encode(&id), encode(&path)))?;
            match dst.as_str() {
                "-" => {
                    std::io::copy(&mut reader, &mut std::io::stdout().lock())?;
                }
                file => {
                    let mut out = std::fs::File::create(file).map_err(|e| anyhow::anyhow!("cannot write {file}: {e}"))?;
                    std::io::copy(&mut reader, &mut out)?;
                }
            }
        }
        _ => anyhow::bail!("give exactly one side as SANDBOX_ID:/absolute/path, e.g. `tartarus cp ./data.csv sb_1234:/tmp/data.csv`"),
    }
    Ok(0)
}
