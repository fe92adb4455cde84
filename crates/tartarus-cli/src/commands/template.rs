//! `tartarus template create | ls | inspect | rm`: templates on the server (clients of `/v1/templates`), and
//! `tartarus init template`, which writes a commented starting template locally, without a server.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tartarus_image::template::{init_template_yaml, parse_template, Template};

use crate::client::{encode, Client};

#[derive(Args, Debug)]
pub struct TemplateArgs {
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Subcommand, Debug)]
enum TemplateCommand {
    /// Upload a template (YAML or JSON) to the server; replaces one you own with the same id
    #[command(
        after_help = "Examples:\n  tartarus template create -f templates/python-ds.yaml\n  \
        tartarus init template --name my-python --from python:3.11 | tartarus template create -f -"
    )]
    Create {
        /// The template file, or - for standard input
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List the templates you can use
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show a template as YAML (with --json: the server's record as JSON)
    Inspect {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (sandboxes made from it keep running)
    Rm { id: String },
}

pub fn run(args: TemplateArgs) -> anyhow::Result<u8> {
    match args.command {
        TemplateCommand::Create { file } => create(file),
        TemplateCommand::Ls { json } => ls(json),
        TemplateCommand::Inspect { id, json } => inspect(&id, json),
        TemplateCommand::Rm { id } => rm(&id),
    }
}

/// The server validates (and names `source` in its errors), so the CLI refuses exactly what the API does.
fn create(file: PathBuf) -> anyhow::Result<u8> {
    let (text, source) = super::policy::read_source(&file, "template")?;
    let body = json!({"yaml": text, "source": source});
    let record = Client::from_env()?.json("POST", "/v1/templates", Some(body))?;
    let id = record["id"].as_str().unwrap_or_default();
    eprintln!("tartarus: template {id} saved");
    println!("{id}");
    Ok(0)
}

fn ls(as_json: bool) -> anyhow::Result<u8> {
    let list = Client::from_env()?.json("GET", "/v1/templates", None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let rows: Vec<[String; 5]> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let def = &t["template"];
            let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
            [
                text(&t["id"]),
                text(&def["name"]),
                text(&def["base_image"]),
                t["tenant"].as_str().unwrap_or("(shared)").to_string(),
                def["pool"]["size"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    let header = ["ID", "NAME", "IMAGE", "TENANT", "POOL"].map(String::from);
    let mut widths = [0; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(0)
}

fn inspect(id: &str, as_json: bool) -> anyhow::Result<u8> {
    let record = Client::from_env()?.json("GET", &format!("/v1/templates/{}", encode(id)), None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&record)?);
        return Ok(0);
    }
    let template: Template = serde_json::from_value(record["template"].clone())
        .context("the server sent a template this tartarus cannot read; try --json")?;
    print!("{}", template.to_yaml());
    Ok(0)
}

fn rm(id: &str) -> anyhow::Result<u8> {
    Client::from_env()?.json("DELETE", &format!("/v1/templates/{}", encode(id)), None)?;
    eprintln!("tartarus: template {id} removed");
    Ok(0)
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(subcommand)]
    what: InitCommand,
}

#[derive(Subcommand, Debug)]
enum InitCommand {
    /// Write a commented template to start from (standard output unless -o)
    #[command(
        after_help = "Example:\n  tartarus init template --name my-python --from python:3.11 -o my-python.yaml"
    )]
    Template {
        /// The template's name; its id is the name in lower case with '-' for other characters
        #[arg(long)]
        name: String,
        /// The image the template starts from, e.g. python:3.11
        #[arg(long, value_name = "IMAGE")]
        from: String,
        /// Write to this file (which must not exist) instead of standard output
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

pub fn init(args: InitArgs) -> anyhow::Result<u8> {
    let InitCommand::Template { name, from, output } = args.what;
    let yaml = init_template_yaml(&name, &from);
    // The skeleton is valid by construction except for what was passed in (an image with spaces, say).
    parse_template(&yaml, "template").map_err(|e| anyhow::anyhow!("{}", e.message))?;
    match output {
        None => print!("{yaml}"),
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.write_all(yaml.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("tartarus: wrote {}", path.display());
        }
    }
    Ok(0)
}
