//! Verifiable effects from the command line: `tartarus blob`, `tool`, `receipts`, `episode`, `signal`,
//! `evaluator`, `dataset` and `keys`. Verification (`blob verify`, `receipts verify`, `episode verify`)
//! runs locally and needs no server: only the bytes and the public keys you trust.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tartarus_effects::Signed;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tartarus_effects::episode::{verify_episode_car, EpisodeKeys, Signal, SIGNAL_FORMAT};
use tartarus_effects::{verify_range, Cid, Keyring, PublicKeys, Receipt};

use crate::client::{encode, with_query, Client};
use crate::commands::policy::read_source;

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn parse_cid(text: &str) -> anyhow::Result<Cid> {
    text.parse::<Cid>()
        .map_err(|e| anyhow::anyhow!("'{text}' is not a content id: {e}"))
}

fn write_output(output: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    match output {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
        }
        _ => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()?;
            Ok(())
        }
    }
}

// ---- blob ----

#[derive(Args, Debug)]
pub struct BlobArgs {
    #[command(subcommand)]
    command: BlobCommand,
}

#[derive(Subcommand, Debug)]
enum BlobCommand {
    /// Store a file (or - for standard input) on the server; prints its id
    Put { file: PathBuf },
    /// Fetch a blob, verified against its id (to FILE with -o, else standard output)
    #[command(
        after_help = "With --range A-B (inclusive byte offsets) the server sends a range proof, and \
                            only bytes that the proof ties to the id are written."
    )]
    Get {
        cid: String,
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[arg(long, value_name = "A-B")]
        range: Option<String>,
    },
    /// Check that a local file has this id (offline)
    Verify { cid: String, file: PathBuf },
    /// Drop your tenant's reference to a blob
    Rm { cid: String },
    /// Remove blobs no tenant references (admin)
    Gc,
}

pub fn blob(args: BlobArgs) -> anyhow::Result<u8> {
    match args.command {
        BlobCommand::Verify { cid, file } => {
            let expected = parse_cid(&cid)?;
            let mut hasher = blake3::Hasher::new();
            let mut input: Box<dyn Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(
                    std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?,
                )
            };
            std::io::copy(&mut input, &mut hasher)?;
            let actual = Cid::from_digest(tartarus_effects::Codec::Raw, *hasher.finalize().as_bytes());
            if actual != expected {
                eprintln!("tartarus: {} is {actual}, not {expected}", file.display());
                return Ok(1);
            }
            eprintln!("ok: {} is {expected}", file.display());
            Ok(0)
        }
        BlobCommand::Put { file } => {
            let client = Client::from_env()?;
            let answer = if file.as_os_str() == "-" {
                client.put_reader("/v1/blobs", std::io::stdin())?
            } else {
                let f =
                    std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
                client.put_reader("/v1/blobs", f)?
            };
            println!("{}", answer["cid"].as_str().unwrap_or_default());
            let dedup = if answer["stored"] == false {
                " (already stored)"
            } else {
                ""
            };
            eprintln!("{} bytes{dedup}", answer["size"]);
            Ok(0)
        }
        BlobCommand::Get { cid, output, range } => {
            let client = Client::from_env()?;
            let id = parse_cid(&cid)?;
            match range {
                None => {
                    // Verified again here, as it arrives: a server (or disk) that changed a byte is caught.
                    let mut reader = client.get_reader(&format!("/v1/blobs/{id}"))?;
                    let mut bytes = Vec::new();
                    reader.read_to_end(&mut bytes).context("reading the blob")?;
                    let actual = Cid::of_bytes(&bytes);
                    if actual != id {
                        bail!("the server sent bytes whose id is {actual}, not {id}: refusing them");
                    }
                    write_output(output.as_deref(), &bytes)?;
                }
                Some(range) => {
                    let (start, end) = range
                        .split_once('-')
                        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                        .filter(|(a, b)| a <= b)
                        .ok_or_else(|| anyhow::anyhow!("--range must be A-B with A <= B (byte offsets)"))?;
                    let len = end - start + 1;
                    let path = with_query(
                        &format!("/v1/blobs/{id}"),
                        &[format!("offset={start}"), format!("len={len}")],
                    );
                    let mut proof = Vec::new();
                    client.get_reader(&path)?.read_to_end(&mut proof)?;
                    let data = verify_range(&id, start, len, &proof)
                        .map_err(|e| anyhow::anyhow!("the range proof does not verify: {e}"))?;
                    write_output(output.as_deref(), &data)?;
                }
            }
            Ok(0)
        }
        BlobCommand::Rm { cid } => {
            let client = Client::from_env()?;
            client.json("DELETE", &format!("/v1/blobs/{}", parse_cid(&cid)?), None)?;
            Ok(0)
        }
        BlobCommand::Gc => {
            let client = Client::from_env()?;
            let report = client.json("POST", "/v1/blobs/gc", None)?;
            println!(
                "{} blobs removed, {} bytes freed",
                report["blobs_removed"], report["bytes_freed"]
            );
            Ok(0)
        }
    }
}

// ---- tool ----

#[derive(Args, Debug)]
pub struct ToolArgs {
    #[command(subcommand)]
    command: ToolCommand,
}

#[derive(Subcommand, Debug)]
enum ToolCommand {
    /// Declare or replace a tool from a YAML or JSON file (admin)
    #[command(
        after_help = "Example file:\n  name: charge\n  kind: http\n  url: https://payments.example/v1/charges\n  \
                            headers: {Authorization: Bearer sk_live_...}\n  timeout_s: 30\n\n\
                            Sandboxes call it through /run/tartarus/gateway.sock:\n  \
                            curl --unix-socket /run/tartarus/gateway.sock -H 'Idempotency-Key: order-7' \\\n    \
                            -d '{\"amount\":100}' http://gateway/v1/tools/charge"
    )]
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List declared tools
    Ls,
    /// Remove a tool (admin)
    Rm { name: String },
}

pub fn tool(args: ToolArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        ToolCommand::Apply { file } => {
            let (text, source) = read_source(&file, "tool")?;
            let value: Value =
                serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            let tool = client.json("POST", "/v1/tools", Some(value))?;
            eprintln!("tool '{}' declared", tool["name"].as_str().unwrap_or_default());
        }
        ToolCommand::Ls => {
            for tool in client
                .json("GET", "/v1/tools", None)?
                .as_array()
                .into_iter()
                .flatten()
            {
                let target = match tool["kind"].as_str() {
                    Some("http") => tool["url"].as_str().unwrap_or_default().to_string(),
                    _ => tool["command"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" "))
                        .unwrap_or_default(),
                };
                println!(
                    "{:<24} {:<8} {target}",
                    tool["name"].as_str().unwrap_or_default(),
                    tool["kind"].as_str().unwrap_or_default()
                );
            }
        }
        ToolCommand::Rm { name } => {
            client.json("DELETE", &format!("/v1/tools/{}", encode(&name)), None)?;
        }
    }
    Ok(0)
}

// ---- receipts ----

#[derive(Args, Debug)]
pub struct ReceiptsArgs {
    #[command(subcommand)]
    command: ReceiptsCommand,
}

#[derive(Subcommand, Debug)]
enum ReceiptsCommand {
    /// List receipts of tool calls
    Ls {
        #[arg(long)]
        sandbox: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show a receipt; with -o write its signed envelope (for `receipts verify`)
    Show {
        id: String,
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Verify a receipt file offline: its signature, and the request/response bytes if given
    Verify {
        file: PathBuf,
        /// Public keys to trust (the server's GET /v1/keys, or DATA_DIR/keys/public-keys.json); without
        /// it they are fetched from the configured server
        #[arg(long)]
        keys: Option<PathBuf>,
        /// The exact request body sent to the tool
        #[arg(long)]
        request: Option<PathBuf>,
        /// The exact response body received
        #[arg(long)]
        response: Option<PathBuf>,
    },
}

fn load_public_keys(path: Option<&Path>) -> anyhow::Result<PublicKeys> {
    match path {
        Some(path) => Ok(PublicKeys::load(path)?),
        None => {
            let text = Client::from_env()
                .context("no --keys given, and the server's keys cannot be fetched")?
                .get_text("/v1/keys")?;
            Ok(PublicKeys::from_json(&text, Path::new("GET /v1/keys"))?)
        }
    }
}

pub fn receipts(args: ReceiptsArgs) -> anyhow::Result<u8> {
    match args.command {
        ReceiptsCommand::Verify {
            file,
            keys,
            request,
            response,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let keys = load_public_keys(keys.as_deref())?;
            let read = |p: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
                p.as_ref()
                    .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
                    .transpose()
            };
            let (request, response) = (read(&request)?, read(&response)?);
            let verified = Receipt::verify(&keys, &bytes).and_then(|(envelope, receipt)| {
                receipt.check_bytes(request.as_deref(), response.as_deref())?;
                Ok((envelope, receipt))
            });
            match verified {
                Ok((envelope, receipt)) => {
                    eprintln!(
                        "ok: receipt {} signed by key {}: tool '{}' called by sandbox {} ({}), status {}{}",
                        Cid::of_encoded(&bytes)?,
                        envelope.kid,
                        receipt.tool,
                        receipt.sandbox,
                        receipt.tenant,
                        receipt.status,
                        match (&request, &response) {
                            (None, None) => String::new(),
                            _ => "; the given bytes match its hashes".to_string(),
                        }
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!(
                        "tartarus: receipt {} refused ({}): {}",
                        file.display(),
                        e.kind(),
                        crate::error_chain(&e)
                    );
                    Ok(1)
                }
            }
        }
        ReceiptsCommand::Ls { sandbox, json } => {
            let client = Client::from_env()?;
            let query: Vec<String> = sandbox.iter().map(|s| format!("sandbox={}", encode(s))).collect();
            let list = client.json("GET", &with_query("/v1/receipts", &query), None)?;
            if json {
                print_json(&list);
                return Ok(0);
            }
            println!(
                "{:<60} {:<16} {:<16} {:<7} {:<5} KEY",
                "ID", "SANDBOX", "TOOL", "STATUS", "CODE"
            );
            for r in list.as_array().into_iter().flatten() {
                println!(
                    "{:<60} {:<16} {:<16} {:<7} {:<5} {}",
                    r["id"].as_str().unwrap_or_default(),
                    r["sandbox"].as_str().unwrap_or_default(),
                    r["tool"].as_str().unwrap_or_default(),
                    r["status"].as_str().unwrap_or_default(),
                    r["code"]
                        .as_i64()
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    r["idempotency_key"].as_str().unwrap_or("-"),
                );
            }
            Ok(0)
        }
        ReceiptsCommand::Show { id, output } => {
            let client = Client::from_env()?;
            let view = client.json("GET", &format!("/v1/receipts/{}", encode(&id)), None)?;
            match output {
                Some(path) => {
                    let envelope = base64::engine::general_purpose::STANDARD
                        .decode(view["envelope"].as_str().unwrap_or_default())
                        .context("the server sent an unreadable envelope")?;
                    write_output(Some(&path), &envelope)?;
                    eprintln!("wrote the signed receipt to {}", path.display());
                }
                None => print_json(&view),
            }
            Ok(0)
        }
    }
}

// ---- episode ----

#[derive(Args, Debug)]
pub struct EpisodeArgs {
    #[command(subcommand)]
    command: EpisodeCommand,
}

#[derive(Subcommand, Debug)]
enum EpisodeCommand {
    /// List episodes (one per ended sandbox)
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one episode's fields and signals (by episode id or sandbox id)
    Show { id: String },
    /// Write an episode as a CAR file (to standard output unless -o)
    Export {
        id: String,
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Verify an exported episode offline: every block, signature and link
    Verify {
        file: PathBuf,
        /// Keys to trust: a file of `{"server": <public keys>, "evaluators": {...}}` or the server's public
        /// keys alone; without it the keys inside the file are used (which proves integrity, not origin)
        #[arg(long)]
        keys: Option<PathBuf>,
        /// An evaluator's public keys to trust for its signals (NAME=FILE, repeatable; with --keys)
        #[arg(long = "evaluator", value_name = "NAME=FILE")]
        evaluators: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn episode(args: EpisodeArgs) -> anyhow::Result<u8> {
    match args.command {
        EpisodeCommand::Verify {
            file,
            keys,
            evaluators,
            json,
        } => {
            let mut trusted = match &keys {
                None if !evaluators.is_empty() => {
                    bail!("--evaluator needs --keys (the server's keys to trust)")
                }
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Some(match EpisodeKeys::from_json(&text) {
                        Ok(keys) => keys,
                        Err(_) => EpisodeKeys {
                            server: PublicKeys::from_json(&text, path)?,
                            evaluators: Default::default(),
                        },
                    })
                }
            };
            for spec in &evaluators {
                let (name, path) = spec
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--evaluator {spec}: use NAME=FILE"))?;
                if let Some(trusted) = trusted.as_mut() {
                    trusted
                        .evaluators
                        .insert(name.to_string(), PublicKeys::load(Path::new(path))?);
                }
            }
            let input: Box<dyn Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?,
                ))
            };
            match verify_episode_car(input, trusted.as_ref()) {
                Ok(v) => {
                    if json {
                        print_json(&json!({
                            "episode": v.id.to_string(), "sandbox": v.episode.sandbox, "tenant": v.episode.tenant,
                            "outcome": v.episode.outcome, "trace_records": v.records.len(),
                            "receipts": v.receipts.len(), "signals": v.signals.len(),
                            "blobs_included": v.blobs_included,
                            "blobs_missing": v.blobs_missing.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                            "keys_embedded": v.keys_embedded,
                        }));
                    }
                    eprintln!(
                        "ok: episode {} of sandbox {} ({}): {} trace records, {} receipts, {} signals, {} blobs \
                         included, {} not included",
                        v.id,
                        v.episode.sandbox,
                        v.episode.outcome,
                        v.records.len(),
                        v.receipts.len(),
                        v.signals.len(),
                        v.blobs_included,
                        v.blobs_missing.len()
                    );
                    if v.keys_embedded {
                        eprintln!(
                            "note: signatures were checked against the keys inside the file; pass --keys with \
                             keys you trust to check who signed"
                        );
                    }
                    Ok(0)
                }
                Err(e) => {
                    eprintln!(
                        "tartarus: episode {} refused ({}): {}",
                        file.display(),
                        e.kind(),
                        crate::error_chain(&e)
                    );
                    Ok(1)
                }
            }
        }
        EpisodeCommand::Ls { json } => {
            let client = Client::from_env()?;
            let list = client.json("GET", "/v1/episodes", None)?;
            if json {
                print_json(&list);
                return Ok(0);
            }
            println!("{:<60} {:<16} {:<10} OUTCOME", "ID", "SANDBOX", "TENANT");
            for e in list.as_array().into_iter().flatten() {
                println!(
                    "{:<60} {:<16} {:<10} {}",
                    e["id"].as_str().unwrap_or_default(),
                    e["sandbox"].as_str().unwrap_or_default(),
                    e["tenant"].as_str().unwrap_or_default(),
                    e["facts"]["outcome"].as_str().unwrap_or_default()
                );
            }
            Ok(0)
        }
        EpisodeCommand::Show { id } => {
            let client = Client::from_env()?;
            let mut view = client.json("GET", &format!("/v1/episodes/{}", encode(&id)), None)?;
            let signals = client.json("GET", &format!("/v1/episodes/{}/signals", encode(&id)), None)?;
            view["signals"] = signals;
            print_json(&view);
            Ok(0)
        }
        EpisodeCommand::Export { id, output } => {
            let client = Client::from_env()?;
            let mut reader = client.get_reader(&format!("/v1/episodes/{}/export", encode(&id)))?;
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes)?;
            write_output(output.as_deref(), &bytes)?;
            Ok(0)
        }
    }
}

// ---- signal and evaluator ----

#[derive(Args, Debug)]
pub struct SignalArgs {
    #[command(subcommand)]
    command: SignalCommand,
}

#[derive(Subcommand, Debug)]
enum SignalCommand {
    /// Create an evaluator key directory (signing.key 0600, public-keys.json); prints the public key
    Keygen { dir: PathBuf },
    /// Sign a score or label for an episode with an evaluator key and send it
    #[command(
        after_help = "Example: tartarus signal add bafyr4i... --evaluator grader --key-dir ~/.grader \
                            --name correctness --score 9000 --label pass"
    )]
    Add {
        /// The episode's id (or its sandbox's id)
        episode: String,
        #[arg(long)]
        evaluator: String,
        /// The evaluator's key directory (from `signal keygen`)
        #[arg(long)]
        key_dir: PathBuf,
        /// What is being judged (e.g. correctness)
        #[arg(long)]
        name: String,
        /// An integer score on the evaluator's own scale (e.g. basis points)
        #[arg(long, allow_hyphen_values = true)]
        score: Option<i64>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        comment: Option<String>,
    },
}

pub fn signal(args: SignalArgs) -> anyhow::Result<u8> {
    match args.command {
        SignalCommand::Keygen { dir } => {
            let keyring = Keyring::load_or_create(&dir)?;
            let public = keyring.public_keys();
            let json: Value = serde_json::from_str(&public.to_json())?;
            let key = json["keys"][0]["public_key"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            println!("{key}");
            eprintln!(
                "key {} in {}; register it with: tartarus evaluator add NAME --public-key {key}",
                keyring.current_kid(),
                dir.display()
            );
            Ok(0)
        }
        SignalCommand::Add {
            episode,
            evaluator,
            key_dir,
            name,
            score,
            label,
            comment,
        } => {
            let client = Client::from_env()?;
            let view = client.json("GET", &format!("/v1/episodes/{}", encode(&episode)), None)?;
            let id = parse_cid(view["id"].as_str().unwrap_or_default())?;
            let keyring = Keyring::load_or_create(&key_dir)?;
            let signal = Signal {
                format: SIGNAL_FORMAT.to_string(),
                episode: id,
                evaluator,
                name,
                score,
                label,
                comment,
                at: tartarus_store::now_ms().max(0) as u64,
            };
            let envelope = signal.sign(&keyring)?.encode()?;
            let stored = client.post_bytes(
                &format!("/v1/episodes/{id}/signals"),
                "application/cbor",
                &envelope,
            )?;
            println!("{}", stored["id"].as_str().unwrap_or_default());
            Ok(0)
        }
    }
}

#[derive(Args, Debug)]
pub struct EvaluatorArgs {
    #[command(subcommand)]
    command: EvaluatorCommand,
}

#[derive(Subcommand, Debug)]
enum EvaluatorCommand {
    /// Allow a public key to sign signals as NAME (admin)
    Add {
        name: String,
        /// 64 hex digits (from `tartarus signal keygen`)
        #[arg(long)]
        public_key: String,
    },
    /// List evaluator keys
    Ls,
}

pub fn evaluator(args: EvaluatorArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        EvaluatorCommand::Add { name, public_key } => {
            let added = client.json(
                "POST",
                "/v1/evaluators",
                Some(json!({"name": name, "public_key": public_key})),
            )?;
            eprintln!(
                "evaluator '{}' may sign with key {}",
                name,
                added["kid"].as_str().unwrap_or_default()
            );
        }
        EvaluatorCommand::Ls => {
            for key in client
                .json("GET", "/v1/evaluators", None)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:<24} {}",
                    key["name"].as_str().unwrap_or_default(),
                    key["kid"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(0)
}

// ---- dataset and keys ----

#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[command(subcommand)]
    command: DatasetCommand,
}

#[derive(Subcommand, Debug)]
enum DatasetCommand {
    /// Build a dataset from a query file (JSON); prints the manifest's id
    #[command(
        after_help = "Example query:\n  {\"filter\": {\"and\": [{\"eq\": [\"outcome\", \"exited\"]}, \
                            {\"ge\": [\"signal.correctness.score\", 5000]}]},\n   \"sample\": {\"seed\": 42, \"size\": 100}, \
                            \"stratify\": \"template\"}\n\nThe same query over the same episodes gives the same id; \
                            fetch the manifest with `tartarus blob get ID`."
    )]
    Build {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List datasets built
    Ls,
}

pub fn dataset(args: DatasetArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        DatasetCommand::Build { file } => {
            let (text, _) = read_source(&file, "query")?;
            let built = client.post_bytes("/v1/datasets", "application/json", text.as_bytes())?;
            println!("{}", built["id"].as_str().unwrap_or_default());
            eprintln!("{} episodes of {} matching", built["episodes"], built["matched"]);
        }
        DatasetCommand::Ls => {
            for d in client
                .json("GET", "/v1/datasets", None)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:<60} {:>6} {}",
                    d["id"].as_str().unwrap_or_default(),
                    d["episodes"],
                    d["query"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Print the server's public keys (what receipts and episodes verify against)
    Show,
    /// Retire the server's signing key and sign with a new one from now on (admin)
    Rotate,
}

pub fn keys(args: KeysArgs) -> anyhow::Result<u8> {
    let client = Client::from_env()?;
    match args.command {
        KeysCommand::Show => println!("{}", client.get_text("/v1/keys")?),
        KeysCommand::Rotate => print_json(&client.json("POST", "/v1/keys/rotate", None)?),
    }
    Ok(0)
}
