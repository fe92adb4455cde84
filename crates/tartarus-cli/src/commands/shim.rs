//! `tartarus shim`: argument parsing for the supervisor of one service sandbox; the shim itself is
//! `tartarus_shim::serve`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use tartarus_runtime::lanes::{self, LaneName};
use tartarus_shim::protocol::{self, Handshake, HandshakeState, StartFailure, StartFailureKind};
use tartarus_shim::serve::ShimPaths;

use super::run::lane_config;

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
    /// Continue the sandbox from this sealed snapshot directory (written by a pause to disk of a sandbox of
    /// the same spec) instead of starting it
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// The lane to run the sandbox on (process or gvisor)
    #[arg(long, value_name = "LANE", default_value = "process", value_parser = parse_lane)]
    runtime: LaneName,
}

fn parse_lane(s: &str) -> Result<LaneName, String> {
    s.parse().map_err(|e: lanes::UnknownLane| e.to_string())
}

pub fn run(args: ShimArgs) -> anyhow::Result<u8> {
    let paths = ShimPaths {
        socket: args.socket,
        spec: args.spec,
        result: args.result,
        log: args.log,
        restore: args.restore,
    };
    let opened = lane_config().and_then(|config| Ok(lanes::open(args.runtime, &config)?));
    let runtime = match opened {
        Ok(runtime) => runtime,
        Err(e) => {
            // The host cannot run this lane: the starter reads it in the handshake, as any other host
            // failure.
            let failed = Handshake {
                v: protocol::VERSION,
                state: HandshakeState::Failed(StartFailure {
                    kind: StartFailureKind::Host,
                    exit_code: 125,
                    message: format!("{e:#}"),
                }),
            };
            let mut out = std::io::stdout();
            let _ = out.write_all(&protocol::encode(&failed));
            let _ = out.flush();
            return Ok(125);
        }
    };
    Ok(tartarus_shim::serve::run(&paths, runtime.as_ref())?)
}
