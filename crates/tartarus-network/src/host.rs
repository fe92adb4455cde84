//! Driving the host: the `ip` and `nft` programs, the lock that serialises address allocation, and
//! reading back the ruleset (as `nft -j` JSON, whose structure is stable where the text form is not).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::contract::{self, chain_name, TABLE};
use crate::{netns_name, veth_name, NetworkConfig, NetworkError};

/// Where the named-namespace files of `ip netns` live.
const NETNS_DIR: &str = "/run/netns";
/// Serialises bridge/table creation and address allocation between supervisors.
const LOCK_FILE: &str = "/run/tartarus/network.lock";

/// The two programs, resolved once.
pub(crate) struct Tools {
    ip: PathBuf,
    nft: PathBuf,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    // Root's PATH usually has the sbin directories, but a sudo or service environment may not.
    let found = path
        .split(':')
        .filter(|d| d.starts_with('/'))
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

impl Tools {
    pub fn find() -> Result<Tools, NetworkError> {
        let ip = find_program("ip").ok_or(NetworkError::ToolMissing {
            program: "ip",
            package: "iproute2",
        })?;
        let nft = find_program("nft").ok_or(NetworkError::ToolMissing {
            program: "nft",
            package: "nftables",
        })?;
        Ok(Tools { ip, nft })
    }

    fn run(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, NetworkError> {
        let command_line = || {
            let name = program.file_name().unwrap_or_default().to_string_lossy();
            format!("{name} {}", args.join(" "))
        };
        let host = |what| move |source| NetworkError::Host { what, source };
        let mut child = Command::new(program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(host("starting ip or nft"))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads its whole input before it prints anything, so this cannot deadlock on stdout.
            pipe.write_all(text.as_bytes())
                .map_err(host("writing rules to nft"))?;
        }
        let output = child.wait_with_output().map_err(host("waiting for ip or nft"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(NetworkError::Command {
                command: command_line(),
                stderr: stderr.trim().lines().take(6).collect::<Vec<_>>().join("; "),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn ip(&self, args: &[&str]) -> Result<String, NetworkError> {
        self.run(&self.ip, args, None)
    }

    pub(crate) fn ip_batch(&self, netns: &str, commands: &str) -> Result<String, NetworkError> {
        self.run(&self.ip, &["-n", netns, "-batch", "-"], Some(commands))
    }

    /// Applies `rules` as one transaction: all of it or nothing.
    pub fn nft_apply(&self, rules: &str) -> Result<(), NetworkError> {
        self.run(&self.nft, &["-f", "-"], Some(rules)).map(drop)
    }

    pub fn nft_json(&self, args: &[&str]) -> Result<Value, NetworkError> {
        let mut all = vec!["-j", "-a"];
        all.extend_from_slice(args);
        let text = self.run(&self.nft, &all, None)?;
        serde_json::from_str(&text).map_err(|e| NetworkError::Command {
            command: format!("nft {}", all.join(" ")),
            stderr: format!("unreadable JSON: {e}"),
        })
    }

    /// The table of `family` as JSON, or `None` when it does not exist.
    fn table(&self, family: &str) -> Option<Value> {
        self.nft_json(&["list", "table", family, TABLE]).ok()
    }
}

/// An exclusive `flock` on the network lock file, released on drop.
pub(crate) struct TransactionLock {
    _file: OwnedFd,
}

impl TransactionLock {
    pub fn acquire() -> Result<TransactionLock, NetworkError> {
        let host = |what| move |source| NetworkError::Host { what, source };
        let dir = Path::new(LOCK_FILE).parent().unwrap_or(Path::new("/run"));
        std::fs::create_dir_all(dir).map_err(host("creating /run/tartarus"))?;
        let file = rustix::fs::open(
            LOCK_FILE,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| NetworkError::Host {
            what: "opening the network lock",
            source: e.into(),
        })?;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(NetworkError::Host {
                        what: "locking the network lock",
                        source: e.into(),
                    })
                }
            }
        }
        Ok(TransactionLock { _file: file })
    }
}

/// `net.ipv4.ip_forward=1` in the current network namespace (sandboxes' packets are routed by it).
pub(crate) fn enable_forwarding() -> Result<(), NetworkError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| NetworkError::Host {
        what: "enabling IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)",
        source,
    })
}

pub(crate) fn ensure_bridge(tools: &Tools, config: &NetworkConfig) -> Result<(), NetworkError> {
    let bridge = config.bridge.as_str();
    if tools.ip(&["link", "show", "dev", bridge]).is_err() {
        tools.ip(&["link", "add", bridge, "type", "bridge"])?;
    }
    let address = format!("{}/{}", config.gateway, config.subnet.prefix());
    tools.ip(&["addr", "replace", &address, "dev", bridge])?;
    tools.ip(&["link", "set", "dev", bridge, "up"]).map(drop)
}

pub(crate) fn ensure_table(tools: &Tools, config: &NetworkConfig) -> Result<(), NetworkError> {
    let (inet, bridge) = contract::render_base(&config.bridge, config.subnet);
    if tools.table("inet").is_none() {
        tools.nft_apply(&inet)?;
    }
    if tools.table("bridge").is_none() {
        tools.nft_apply(&bridge)?;
    }
    Ok(())
}

/// Every rule of `table` as `(chain, handle, comment)`.
fn rules(table: &Value) -> Vec<(String, u64, Option<String>)> {
    let items = table.get("nftables").and_then(Value::as_array);
    items
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule"))
        .filter_map(|rule| {
            let chain = rule.get("chain")?.as_str()?.to_string();
            let handle = rule.get("handle")?.as_u64()?;
            let comment = rule.get("comment").and_then(Value::as_str).map(str::to_string);
            Some((chain, handle, comment))
        })
        .collect()
}

fn chains(table: &Value) -> Vec<String> {
    let items = table.get("nftables").and_then(Value::as_array);
    items
        .into_iter()
        .flatten()
        .filter_map(|item| Some(item.get("chain")?.get("name")?.as_str()?.to_string()))
        .collect()
}

/// The `key=value` field of one of our rule comments.
fn comment_field<'a>(comment: &'a str, key: &str) -> Option<&'a str> {
    let mut words = comment.split_whitespace();
    if words.next() != Some("tartarus") {
        return None;
    }
    words.find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The first address of the bridge network that no sandbox's rules claim.
pub(crate) fn free_address(tools: &Tools, config: &NetworkConfig) -> Result<Ipv4Addr, NetworkError> {
    let table = tools.table("inet").unwrap_or(Value::Null);
    let used: Vec<Ipv4Addr> = rules(&table)
        .iter()
        .filter_map(|(_, _, c)| comment_field(c.as_deref()?, "addr")?.parse().ok())
        .collect();
    config
        .subnet
        .ipv4_hosts()
        .find(|a| *a != config.gateway && !used.contains(a))
        .ok_or(NetworkError::AddressesExhausted(config.subnet))
}

/// The named namespace with loopback and `eth0` (its peer an isolated port of the bridge); returns the
/// namespace, held open.
pub(crate) fn create_namespace(
    tools: &Tools,
    config: &NetworkConfig,
    id: &str,
    address: Ipv4Addr,
) -> Result<OwnedFd, NetworkError> {
    let netns = netns_name(id);
    let veth = veth_name(id);
    tools.ip(&["netns", "add", &netns])?;
    let path = format!("{NETNS_DIR}/{netns}");
    let fd = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| NetworkError::Host {
        what: "opening the sandbox's network namespace",
        source: e.into(),
    })?;
    tools.ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
    ])?;
    tools.ip(&["link", "set", "dev", &veth, "master", &config.bridge])?;
    // Isolated before up: no frame ever passes between two sandboxes' ports.
    tools.ip(&[
        "link",
        "set",
        "dev",
        &veth,
        "type",
        "bridge_slave",
        "isolated",
        "on",
    ])?;
    tools.ip(&["link", "set", "dev", &veth, "up"])?;
    let inside = format!(
        "link set dev lo up\n\
         addr add {address}/{prefix} dev eth0\n\
         link set dev eth0 up\n\
         route add default via {gateway} dev eth0\n",
        prefix = config.subnet.prefix(),
        gateway = config.gateway,
    );
    tools.ip_batch(&netns, &inside)?;
    Ok(fd)
}

fn is_missing(e: &NetworkError) -> bool {
    matches!(e, NetworkError::Command { stderr, .. }
        if stderr.contains("Cannot find device") || stderr.contains("does not exist")
            || stderr.contains("No such file"))
}

pub(crate) fn delete_link(tools: &Tools, veth: &str) -> Result<(), NetworkError> {
    match tools.ip(&["link", "del", "dev", veth]) {
        Err(e) if !is_missing(&e) => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn delete_namespace(tools: &Tools, netns: &str) -> Result<(), NetworkError> {
    if !Path::new(NETNS_DIR).join(netns).exists() {
        return Ok(());
    }
    match tools.ip(&["netns", "del", netns]) {
        Err(e) if !is_missing(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Removes every rule and chain of sandbox `id`, in both families, in one transaction.
pub(crate) fn delete_rules(tools: &Tools, id: &str) -> Result<(), NetworkError> {
    let chain = chain_name(id);
    let mut transaction = String::new();
    for family in ["inet", "bridge"] {
        let Some(table) = tools.table(family) else {
            continue;
        };
        for (rule_chain, handle, comment) in rules(&table) {
            if comment.as_deref().and_then(|c| comment_field(c, "id")) == Some(id) {
                transaction.push_str(&format!(
                    "delete rule {family} {TABLE} {rule_chain} handle {handle}\n"
                ));
            }
        }
        if chains(&table).contains(&chain) {
            transaction.push_str(&format!(
                "flush chain {family} {TABLE} {chain}\ndelete chain {family} {TABLE} {chain}\n"
            ));
        }
    }
    if transaction.is_empty() {
        return Ok(());
    }
    tools.nft_apply(&transaction)
}

/// `(id, owner pid)` of every sandbox with rules in this network namespace.
pub(crate) fn sandbox_owners(tools: &Tools) -> Vec<(String, u32)> {
    let Some(table) = tools.table("inet") else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = Vec::new();
    for (_, _, comment) in rules(&table) {
        let Some(comment) = comment else { continue };
        let id = comment_field(&comment, "id");
        let owner = comment_field(&comment, "owner").and_then(|o| o.parse().ok());
        if let (Some(id), Some(owner)) = (id, owner) {
            if !out.iter().any(|(i, _)| i == id) {
                out.push((id.to_string(), owner));
            }
        }
    }
    out
}

/// The sum of every counter's packets in an `nft -j list …` answer.
pub(crate) fn sum_counters(json: &Value) -> u64 {
    let items = json.get("nftables").and_then(Value::as_array);
    items
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule")?.get("expr")?.as_array())
        .flatten()
        .filter_map(|expr| expr.get("counter")?.get("packets")?.as_u64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_fields_are_read_only_from_our_comments() {
        let c = "tartarus id=abc owner=12 addr=10.88.0.2";
        assert_eq!(comment_field(c, "id"), Some("abc"));
        assert_eq!(comment_field(c, "owner"), Some("12"));
        assert_eq!(comment_field("other id=abc", "id"), None);
        assert_eq!(comment_field(c, "i"), None);
    }

    #[test]
    fn counters_and_rules_are_read_from_nft_json() {
        let json: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}}, {"chain": {"name": "sb_x", "handle": 3}},
            {"rule": {"chain": "sb_x", "handle": 5, "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
            {"rule": {"chain": "forward", "handle": 9, "comment": "tartarus id=x owner=1 addr=10.88.0.2",
                      "expr": [{"counter": {"packets": 4, "bytes": 1}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(sum_counters(&json), 7);
        assert_eq!(chains(&json), ["sb_x"]);
        let r = rules(&json);
        assert_eq!(r[1].0, "forward");
        assert_eq!(r[1].1, 9);
    }
}
