//! `tartarus conformance run DIR`: checks the effects format's golden vectors (conformance/v1) against this
//! build, so any implementation change that alters a byte is caught.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    #[command(subcommand)]
    command: ConformanceCommand,
}

#[derive(Subcommand, Debug)]
enum ConformanceCommand {
    /// Run every vector under DIR (e.g. conformance/v1); exits 1 when any fails
    Run { dir: PathBuf },
}

pub fn run(args: ConformanceArgs) -> anyhow::Result<u8> {
    let ConformanceCommand::Run { dir } = args.command;
    let report = tartarus_effects::run_conformance(&dir)?;
    for failure in &report.failed {
        println!("FAIL {}: {}", failure.vector, failure.reason);
    }
    println!(
        "{} vectors: {} passed, {} failed ({})",
        report.passed.len() + report.failed.len(),
        report.passed.len(),
        report.failed.len(),
        dir.display()
    );
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}
