//! `tartarus envd`: the E2B-compatible in-sandbox daemon (`tartarus_envd`), run by the server as a
//! sandbox's main command.

use std::net::SocketAddr;

use clap::Args;

#[derive(Args, Debug)]
pub struct EnvdArgs {
    /// Address to serve the envd API on
    #[arg(long, default_value = "127.0.0.1:49983")]
    listen: SocketAddr,
}

pub fn run(args: EnvdArgs) -> anyhow::Result<u8> {
    let code = tartarus_envd::run(args.listen);
    Ok(if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        crate::EXIT_TARTARUS_ERROR
    })
}
