//! `tartarus shim`: argument parsing for the supervisor of one service sandbox; the shim itself is
//! `tartarus_shim::serve`.

use std::path::PathBuf;

use clap::Args;
use tartarus_runtime::process::ProcessRuntime;
use tartarus_shim::serve::ShimPaths;

use super::run::runtime_config;

#[derive(Args, Debug)]
pub struct ShimArgs {
    /// Unix socket to serve requests on (created, mode 0600)
    #[arg(long)]
    socket: PathBuf,
    /// The sandbox spec as JSON (a file)
    #[arg(long)]
    spec: PathBuf,
    /// Where to write the result record when the sandbox ends
    #[arg(long)]
    result: Option<PathBuf>,
    /// File that receives the main command's stdout and stderr
    #[arg(long)]
    log: Option<PathBuf>,
}

pub fn run(args: ShimArgs) -> anyhow::Result<u8> {
    let paths = ShimPaths {
        socket: args.socket,
        spec: args.spec,
        result: args.result,
        log: args.log,
    };
    let runtime = ProcessRuntime::new(runtime_config());
    Ok(tartarus_shim::serve::run(&paths, &runtime)?)
}
