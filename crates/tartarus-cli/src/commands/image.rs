//! `tartarus image pull | ls | inspect | rm | prune`: the local image store of the data directory.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tartarus_image::pull::{self, Progress, PullOptions};
use tartarus_image::runspec::open_store;

use super::apikey::default_data_dir;

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The data directory holding the image store (default: $TARTARUS_DATA_DIR, else /var/lib/tartarus as
    /// root, else ~/.local/share/tartarus)
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Download an image from a registry into the local store
    #[command(after_help = "Examples:\n  tartarus image pull python:3.11-slim\n  \
        tartarus image pull --insecure 127.0.0.1:5000/team/tool:1\n  \
        echo \"$TOKEN\" | tartarus image pull --username bot --password-stdin ghcr.io/org/img:2")]
    Pull(PullArgs),
    /// List pulled images
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show an image's configuration and layers as JSON
    Inspect { reference: String },
    /// Forget an image (its layers stay until `prune`)
    Rm { reference: String },
    /// Remove layers no pulled image uses
    Prune,
}

#[derive(Args, Debug)]
struct PullArgs {
    /// Use plain HTTP (only for a registry on loopback)
    #[arg(long)]
    insecure: bool,
    /// Registry user name (otherwise credentials come from the Docker config, else anonymous)
    #[arg(long, requires = "password_stdin")]
    username: Option<String>,
    /// Read the registry password or token from standard input
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// Reference, e.g. python:3.11-slim, ghcr.io/org/image:tag or registry/repo@sha256:...
    reference: String,
}

pub fn run(args: ImageArgs) -> anyhow::Result<u8> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let store = open_store(&data_dir)
        .with_context(|| format!("opening the image store in {}", data_dir.display()))?;
    match args.command {
        ImageCommand::Pull(pull_args) => {
            let credentials = match pull_args.username {
                Some(user) => {
                    let mut password = String::new();
                    std::io::stdin()
                        .read_to_string(&mut password)
                        .context("reading the password from standard input")?;
                    Some((user, password.trim_end_matches(['\r', '\n']).to_string()))
                }
                None => None,
            };
            let options = PullOptions {
                insecure: pull_args.insecure,
                credentials,
            };
            let progress: Arc<dyn Progress> = match std::io::stderr().is_terminal() {
                true => Arc::new(Bars::default()),
                false => Arc::new(Lines),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let record = runtime.block_on(pull::pull(&store, &pull_args.reference, &options, progress))?;
            println!("pulled {} {}", record.reference, record.digest);
            Ok(0)
        }
        ImageCommand::Ls { json } => {
            let images = store.list()?;
            if json {
                let rows: Vec<_> = images
                    .iter()
                    .map(
                        |i| serde_json::json!({"reference": i.reference, "digest": i.digest, "size": i.size}),
                    )
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<60} {:<19} {:>10}", "REFERENCE", "DIGEST", "SIZE");
                for image in images {
                    let short = image.digest.trim_start_matches("sha256:").get(..12).unwrap_or("");
                    println!(
                        "{:<60} sha256:{short} {:>10}",
                        image.reference,
                        human_size(image.size)
                    );
                }
            }
            Ok(0)
        }
        ImageCommand::Inspect { reference } => {
            let image = store.get(&reference)?;
            let mut layers = Vec::new();
            for digest in &image.layers {
                let layer = store.layer(digest)?.context("layer record vanished")?;
                layers.push(serde_json::json!({
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "unpacked_size": layer.unpacked_size,
                    "diff_id": layer.diff_id,
                }));
            }
            let doc = serde_json::json!({
                "reference": image.reference,
                "digest": image.digest,
                "size": image.size,
                "pulled_ms": image.pulled_ms,
                "config": image.config,
                "layers": layers,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
        ImageCommand::Rm { reference } => {
            if !store.remove(&reference)? {
                anyhow::bail!("image {reference} is not in the local store (see `tartarus image ls`)");
            }
            println!("removed {reference}; run `tartarus image prune` to free its unused layers");
            Ok(0)
        }
        ImageCommand::Prune => {
            let report = store.prune()?;
            println!("removed {} layers, {}", report.layers, human_size(report.bytes));
            Ok(0)
        }
    }
}

fn short(digest: &str) -> &str {
    digest.trim_start_matches("sha256:").get(..12).unwrap_or(digest)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// Plain lines, for logs and pipes.
struct Lines;

impl Progress for Lines {
    fn manifest(&self, reference: &str, digest: &str, layers: usize) {
        println!("pulling {reference} ({digest}, {layers} layers)");
    }
    fn layer_started(&self, digest: &str, size: u64) {
        println!("layer {} downloading {}", short(digest), human_size(size));
    }
    fn layer_bytes(&self, _: &str, _: u64) {}
    fn layer_done(&self, digest: &str, fetched: bool) {
        match fetched {
            true => println!("layer {} done", short(digest)),
            false => println!("layer {} already present", short(digest)),
        }
    }
}

/// Progress bars on a terminal.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn manifest(&self, reference: &str, digest: &str, layers: usize) {
        let _ = self.multi.println(format!(
            "pulling {reference} ({}, {layers} layers)",
            short(digest)
        ));
    }
    fn layer_started(&self, digest: &str, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(short(digest).to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(digest.to_string(), bar);
        }
    }
    fn layer_bytes(&self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
            bar.inc(bytes);
        }
    }
    fn layer_done(&self, digest: &str, fetched: bool) {
        match self.bars.lock().ok().and_then(|mut b| b.remove(digest)) {
            Some(bar) => bar.finish_with_message("done"),
            None if !fetched => {
                let _ = self.multi.println(format!("{} already present", short(digest)));
            }
            None => {}
        }
    }
}
