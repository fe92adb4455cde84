//! `tartarus e2b env`: the environment that points the unmodified E2B SDKs at a Tartarus server.

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct E2bArgs {
    #[command(subcommand)]
    command: E2bCommand,
}

#[derive(Subcommand, Debug)]
enum E2bCommand {
    /// Print `export` lines for E2B's SDKs: `eval "$(tartarus e2b env)"`
    Env(EnvArgs),
}

#[derive(Args, Debug)]
struct EnvArgs {
    /// The server (default: TARTARUS_HOST, else the config file)
    #[arg(long)]
    host: Option<String>,
    /// The API key the SDK uses (default: TARTARUS_API_KEY, else the config file)
    #[arg(long)]
    api_key: Option<String>,
}

pub fn run(args: E2bArgs) -> anyhow::Result<u8> {
    match args.command {
        E2bCommand::Env(args) => {
            let (host, key) = crate::client::host_and_key(args.host, args.api_key)?;
            print!("{}", env_lines(&host, &key));
            Ok(0)
        }
    }
}

/// The lines for a server at `host` (a URL) and a Tartarus key.
pub fn env_lines(host: &str, key: &str) -> String {
    let base = format!("{}{}", host.trim_end_matches('/'), tartarus_server::e2b::PREFIX);
    let key = tartarus_server::e2b::e2b_api_key(key);
    [
        ("E2B_API_URL", base.as_str()),
        ("E2B_SANDBOX_URL", base.as_str()),
        ("E2B_API_KEY", key.as_str()),
    ]
    .iter()
    .map(|(name, value)| format!("export {name}={}\n", shell_quote(value)))
    .collect()
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lines_point_both_urls_at_the_prefix_and_carry_the_key_in_the_sdk_form() {
        let lines = super::env_lines("http://127.0.0.1:8080/", "tk_1");
        assert_eq!(
            lines,
            "export E2B_API_URL='http://127.0.0.1:8080/e2b'\n\
             export E2B_SANDBOX_URL='http://127.0.0.1:8080/e2b'\n\
             export E2B_API_KEY='e2b_746b5f31'\n"
        );
    }
}
