//! `tartarus policy apply | ls | get | show | history | rollback | rm` and `tartarus events`: clients of
//! `/v1/policies` and `/v1/events`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tartarus_runtime::units::parse_duration;
use tartarus_store::now_ms;

use crate::client::{encode, with_query, Client};

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Validate a policy file (YAML or JSON) and put it in force as the policy's next revision
    #[command(after_help = "Example: tartarus policy apply -f production-default.yaml")]
    Apply {
        /// The policy file, or - for standard input
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List the policies in force
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show the revision of a policy in force, as JSON
    Get { id: String },
    /// Show a policy, or with --effective the policy a tenant's creates are judged by now (the policies
    /// in force merged, or the built-in default policy when none is), as JSON
    #[command(after_help = "Example: tartarus policy show --effective --tenant team-a")]
    Show {
        /// A policy in force (as `get`); omit with --effective
        #[arg(required_unless_present = "effective", conflicts_with = "effective")]
        id: Option<String>,
        #[arg(long)]
        effective: bool,
        /// The tenant (default: the key's; another tenant's needs an admin key)
        #[arg(long, requires = "effective")]
        tenant: Option<String>,
        /// A template whose rules apply
        #[arg(long, requires = "effective")]
        template: Option<String>,
    },
    /// Every revision of a policy, oldest first
    History {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put an earlier revision back in force (as a new revision)
    Rollback {
        id: String,
        /// The revision to restore (see `tartarus policy history ID`)
        #[arg(long, value_name = "N")]
        to: i64,
    },
    /// Take a policy out of force (its history stays; roll back to restore it)
    Rm { id: String },
}

/// Reads a file named on the command line, or standard input for `-`; returns the text and a name for
/// error messages.
pub fn read_source(file: &Path, what: &str) -> anyhow::Result<(String, String)> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the {what} from standard input"))?;
        return Ok((text, "<stdin>".to_string()));
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.file_name().unwrap_or(file.as_os_str());
    Ok((text, name.to_string_lossy().into_owned()))
}

pub fn run(args: PolicyArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        PolicyCommand::Apply { file } => {
            let (text, source) = read_source(&file, "policy")?;
            let view = client.json(
                "POST",
                "/v1/policies",
                Some(json!({"yaml": text, "source": source})),
            )?;
            eprintln!(
                "tartarus: policy {} revision {} in force",
                view["id"].as_str().unwrap_or_default(),
                view["revision"]
            );
            Ok(0)
        }
        PolicyCommand::Ls { json } => {
            let list = client.json("GET", "/v1/policies", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!("{:<28} {:>8} {:<24} APPLIED", "ID", "REVISION", "AUTHOR");
            for p in list.as_array().into_iter().flatten() {
                print_revision(p);
            }
            Ok(0)
        }
        PolicyCommand::Get { id } => {
            let view = client.json("GET", &format!("/v1/policies/{}", encode(&id)), None)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(0)
        }
        PolicyCommand::Show {
            id,
            effective,
            tenant,
            template,
        } => {
            let path = match (effective, id) {
                (false, Some(id)) => format!("/v1/policies/{}", encode(&id)),
                _ => {
                    let mut query = Vec::new();
                    if let Some(t) = &tenant {
                        query.push(format!("tenant={}", encode(t)));
                    }
                    if let Some(t) = &template {
                        query.push(format!("template={}", encode(t)));
                    }
                    with_query("/v1/policies/effective", &query)
                }
            };
            let view = client.json("GET", &path, None)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(0)
        }
        PolicyCommand::History { id, json } => {
            let list = client.json("GET", &format!("/v1/policies/{}/history", encode(&id)), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!("{:<28} {:>8} {:<24} APPLIED", "ID", "REVISION", "AUTHOR");
            for p in list.as_array().into_iter().flatten() {
                print_revision(p);
            }
            Ok(0)
        }
        PolicyCommand::Rollback { id, to } => {
            let view = client.json(
                "POST",
                &format!("/v1/policies/{}/rollback", encode(&id)),
                Some(json!({"to": to})),
            )?;
            eprintln!(
                "tartarus: policy {id} revision {to} in force again as revision {}",
                view["revision"]
            );
            Ok(0)
        }
        PolicyCommand::Rm { id } => {
            client.json("DELETE", &format!("/v1/policies/{}", encode(&id)), None)?;
            eprintln!("tartarus: policy {id} is no longer in force");
            Ok(0)
        }
    }
}

fn print_revision(p: &Value) {
    let what = match (p["policy"].is_null(), p["rollback_of"].as_i64()) {
        (true, _) => " (removed)".to_string(),
        (false, Some(n)) => format!(" (rollback to {n})"),
        _ => String::new(),
    };
    println!(
        "{:<28} {:>8} {:<24} {}{what}",
        p["id"].as_str().unwrap_or_default(),
        p["revision"],
        p["author"].as_str().unwrap_or_default(),
        ago(p["created_ms"].as_i64().unwrap_or(0)),
    );
}

fn ago(at_ms: i64) -> String {
    format!("{} ago", super::remote::duration_text(now_ms() - at_ms))
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this category: enforcement, admission, lifecycle, dead_letter
    #[arg(long)]
    category: Option<String>,
    /// Only events of this sandbox
    #[arg(long)]
    sandbox: Option<String>,
    /// Admins: only this tenant's events
    #[arg(long)]
    tenant: Option<String>,
    /// Only events newer than this, e.g. 1h
    #[arg(long, value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    since: Option<Duration>,
    #[arg(long)]
    json: bool,
}

pub fn events(args: EventsArgs) -> anyhow::Result<u8> {
    let mut query = Vec::new();
    for (key, value) in [
        ("category", &args.category),
        ("sandbox", &args.sandbox),
        ("tenant", &args.tenant),
    ] {
        if let Some(v) = value {
            query.push(format!("{key}={}", encode(v)));
        }
    }
    if let Some(d) = args.since {
        query.push(format!("since_ms={}", now_ms() - d.as_millis() as i64));
    }
    let path = with_query("/v1/events", &query);
    let events = Client::from_env()?.json("GET", &path, None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(0);
    }
    println!(
        "{:<10} {:<12} {:<22} {:<16} {:<12} MESSAGE",
        "AGO", "CATEGORY", "KIND", "SANDBOX", "TENANT"
    );
    for e in events.as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<12} {:<22} {:<16} {:<12} {}",
            ago(e["at_ms"].as_i64().unwrap_or(0)),
            e["category"].as_str().unwrap_or_default(),
            e["kind"].as_str().unwrap_or_default(),
            e["sandbox"].as_str().unwrap_or("-"),
            e["tenant"].as_str().unwrap_or("-"),
            e["message"].as_str().unwrap_or_default(),
        );
    }
    Ok(0)
}
