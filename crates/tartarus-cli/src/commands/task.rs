//! `tartarus task create | get | ls | cancel | logs` and `tartarus project create | ls`: agent tasks on the
//! server (clients of `/v1/tasks` and `/v1/projects`, docs/tasks.md).

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{encode, Client};

#[derive(Args, Debug)]
pub struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// Run an agent on a project's repository; prints the task id
    #[command(
        after_help = "Example:\n  tartarus task create --project demo --agent script --prompt \"add a README section\""
    )]
    Create {
        /// The project's name or id
        #[arg(long)]
        project: String,
        /// What the agent is asked to do (given on its stdin)
        #[arg(long)]
        prompt: String,
        /// One of the server's --agent-type names
        #[arg(long = "agent", value_name = "AGENT_TYPE")]
        agent_type: String,
        /// The task this one is a sub-task of
        #[arg(long, value_name = "TASK")]
        parent: Option<String>,
        /// Wait until the task ends and exit 0 only if it succeeded
        #[arg(long)]
        wait: bool,
    },
    /// Show a task (status, branch, output or error, events) as JSON
    Get { id: String },
    /// List your tasks, newest first
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Print a task's logs (the agent's output and the steps around it)
    Logs { id: String },
    /// Cancel a task: a pending one ends now, a running one's sandbox is killed
    Cancel { id: String },
}

#[derive(Args, Debug)]
pub struct ProjectArgs {
    #[command(subcommand)]
    command: ProjectCommand,
}

#[derive(Subcommand, Debug)]
enum ProjectCommand {
    /// Register a repository; credentials come from TARTARUS_GIT_USERNAME and TARTARUS_GIT_PASSWORD
    /// (never from arguments, which other users can see)
    Create {
        name: String,
        #[arg(long = "repo", value_name = "URL")]
        repo_url: String,
        #[arg(long, default_value = "main")]
        branch: String,
        #[arg(long)]
        template: Option<String>,
    },
    /// List your projects
    Ls,
}

pub fn run(args: TaskArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        TaskCommand::Create {
            project,
            prompt,
            agent_type,
            parent,
            wait,
        } => {
            let body = json!({"project": project, "prompt": prompt, "agent_type": agent_type, "parent_task_id": parent});
            let task = client.json("POST", "/v1/tasks", Some(body))?;
            let id = task["id"]
                .as_str()
                .context("the server answered without a task id")?
                .to_string();
            println!("{id}");
            if !wait {
                return Ok(0);
            }
            loop {
                let task = client.json("GET", &format!("/v1/tasks/{}", encode(&id)), None)?;
                match task["status"].as_str() {
                    Some("succeeded") => {
                        eprintln!(
                            "tartarus: {id} succeeded: {}",
                            task["output"].as_str().unwrap_or_default()
                        );
                        return Ok(0);
                    }
                    Some("failed" | "cancelled") => {
                        eprintln!(
                            "tartarus: {id} {}: {}",
                            task["status"].as_str().unwrap_or_default(),
                            task["error"].as_str().unwrap_or_default()
                        );
                        return Ok(1);
                    }
                    _ => std::thread::sleep(std::time::Duration::from_millis(500)),
                }
            }
        }
        TaskCommand::Get { id } => print(&client.json("GET", &format!("/v1/tasks/{}", encode(&id)), None)?),
        TaskCommand::Ls { json: true } => print(&client.json("GET", "/v1/tasks", None)?),
        TaskCommand::Ls { json: false } => {
            let list = client.json("GET", "/v1/tasks", None)?;
            println!(
                "{:<22} {:<10} {:<12} {:<10} PROMPT",
                "ID", "STATUS", "PROJECT", "AGENT"
            );
            for t in list.as_array().into_iter().flatten() {
                let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
                let prompt: String = text(&t["prompt"])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(50)
                    .collect();
                println!(
                    "{:<22} {:<10} {:<12} {:<10} {prompt}",
                    text(&t["id"]),
                    text(&t["status"]),
                    text(&t["project"]),
                    text(&t["agent_type"])
                );
            }
            Ok(0)
        }
        TaskCommand::Logs { id } => {
            let logs = client.get_text(&format!("/v1/tasks/{}/logs", encode(&id)))?;
            print!("{logs}");
            Ok(0)
        }
        TaskCommand::Cancel { id } => {
            let task = client.json("POST", &format!("/v1/tasks/{}/cancel", encode(&id)), None)?;
            eprintln!(
                "tartarus: {id} {}",
                if task["status"] == "cancelled" {
                    "cancelled"
                } else {
                    "cancelling"
                }
            );
            Ok(0)
        }
    }
}

pub fn run_project(args: ProjectArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        ProjectCommand::Create {
            name,
            repo_url,
            branch,
            template,
        } => {
            let credentials = match (
                std::env::var("TARTARUS_GIT_USERNAME"),
                std::env::var("TARTARUS_GIT_PASSWORD"),
            ) {
                (Ok(username), Ok(password)) => Some(json!({"username": username, "password": password})),
                _ => None,
            };
            let body = json!({"name": name, "repo_url": repo_url, "default_branch": branch,
                              "template": template, "credentials": credentials});
            let project = client.json("POST", "/v1/projects", Some(body))?;
            println!("{}", project["id"].as_str().unwrap_or_default());
            Ok(0)
        }
        ProjectCommand::Ls => print(&client.json("GET", "/v1/projects", None)?),
    }
}

fn print(value: &Value) -> anyhow::Result<u8> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(0)
}
