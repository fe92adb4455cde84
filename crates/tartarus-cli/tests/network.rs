//! End-to-end behaviour of `tartarus run --network egress`: the contract's precedence, DNS, isolation
//! between sandboxes, blocked-packet counts, and that nothing is left behind.
//!
//! Safety: every test builds its whole world inside network namespaces it creates. An outer namespace
//! (`tt-test-<random>`), linked to nothing real, stands for the host: it runs the supervisor (`nsenter
//! --net=… tartarus run`), so the bridge, NAT and rules live there; "remote hosts" are further namespaces
//! linked by veth only to the outer one, with test addresses. No packet is sent from, and no rule is
//! changed in, the host's own network namespace. Every namespace is removed by a Drop guard, also when a
//! test panics.
//!
//! The supervisor enters the outer namespace with `nsenter`, not `ip netns exec`: the latter remounts
//! `/sys` without the cgroup trees, where a root supervisor puts every sandbox's default limits.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, code, result_record, stderr, stdout, world_executable_bin};

/// The sandbox bridge network inside each test's outer namespace.
const BRIDGE_CIDR: &str = "10.99.0.1/24";
const PUBLIC: &str = "203.0.113.10";
const PUBLIC_2: &str = "198.51.100.10";
const PRIVATE: &str = "10.77.0.10";
const METADATA: &str = "169.254.169.254";

/// A TCP server on every port given as an argument, answering each connection with a line (port 81: 256
/// KiB of data); it runs until its stdin closes.
const SERVER: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        c.sendall(b"x" * (256 << 10) if port == 81 else b"hello\n")
        c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
sys.stdin.read()
"#;

/// Polls a connect to each port on the local host until it succeeds (at most 10 s).
const READY: &str = r#"
import socket, sys, time
deadline = time.monotonic() + 10
for p in sys.argv[1:]:
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(p)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("server on port %s never came up" % p)
            time.sleep(0.02)
"#;

/// Run inside a sandbox: tries each HOST:PORT and prints `HOST:PORT ok` or `HOST:PORT <error>` (the
/// exception's class, and its errno when it has one: a dropped packet is a bare `TimeoutError`).
const PROBE: &str = r#"
import socket, sys
for t in sys.argv[1:]:
    h, p = t.rsplit(":", 1)
    try:
        s = socket.create_connection((h, int(p)), timeout=1.5)
        print(t, "ok" if s.recv(16) == b"hello\n" else "wrong-answer", flush=True)
    except OSError as e:
        print(t, type(e).__name__ + (":%d" % e.errno if e.errno else ""), flush=True)
"#;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is required");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), stderr(&out));
}

/// The outer namespace of one test and its remote hosts; removes everything on drop.
struct Lab {
    outer: String,
    hosts: Vec<String>,
    servers: Vec<Child>,
    /// `/etc/netns/<outer>`, and whether `/etc/netns` itself was created for it.
    etc: Option<(PathBuf, bool)>,
}

impl Lab {
    fn new() -> Lab {
        let outer = format!("tt-test-{}", tartarus_hostsys::random_hex(4).unwrap());
        ip(&["netns", "add", &outer]);
        let lab = Lab {
            outer,
            hosts: Vec::new(),
            servers: Vec::new(),
            etc: None,
        };
        ip(&["-n", &lab.outer, "link", "set", "dev", "lo", "up"]);
        lab
    }

    /// A remote host at `addr/prefix` behind the outer namespace's `gateway`, serving `ports`.
    fn host(mut self, tag: &str, addr: &str, gateway: &str, prefix: u8, ports: &[u16]) -> Lab {
        let name = format!("{}-{tag}", self.outer);
        ip(&["netns", "add", &name]);
        self.hosts.push(name.clone());
        let link = format!("h{}", self.hosts.len());
        let outer = self.outer.clone();
        ip(&[
            "-n", &outer, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&[
            "-n",
            &outer,
            "addr",
            "add",
            &format!("{gateway}/{prefix}"),
            "dev",
            &link,
        ]);
        ip(&["-n", &outer, "link", "set", "dev", &link, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/{prefix}"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "dev", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "dev", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", gateway]);
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let server = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c", SERVER])
            .args(&ports)
            .stdin(Stdio::piped())
            .spawn()
            .expect("start a test server");
        self.servers.push(server);
        let ready = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c", READY])
            .args(&ports)
            .output()
            .unwrap();
        assert!(ready.status.success(), "{}", stderr(&ready));
        self
    }

    /// The usual world: a public host (ports 80, 8080 and 53), a private one and a metadata endpoint.
    fn standard() -> Lab {
        Lab::new()
            .host("pub", PUBLIC, "203.0.113.1", 24, &[80, 8080, 53, 81])
            .host("priv", PRIVATE, "10.77.0.1", 24, &[80])
            .host("meta", METADATA, "169.254.0.1", 16, &[80])
    }

    /// Services on every port given, bound to 0.0.0.0 in the outer namespace: the host's own services
    /// (sshd, a node agent, an API), on its bridge address and on every address it has towards the lab
    /// (203.0.113.1, 10.77.0.1, …).
    fn host_services(mut self, ports: &[u16]) -> Lab {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let mut args = vec!["-c", SERVER];
        args.extend_from_slice(&ports);
        let server = self
            .command("python3", &args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("start a host service");
        self.servers.push(server);
        let mut args = vec!["-c", READY];
        args.extend_from_slice(&ports);
        let ready = self.command("python3", &args).output().unwrap();
        assert!(ready.status.success(), "{}", stderr(&ready));
        self
    }

    /// Makes the supervisor see `text` as its /etc/resolv.conf (bound over it in a mount namespace of its
    /// own, as `ip netns exec` does with `/etc/netns/<name>`).
    fn resolv_conf(mut self, text: &str) -> Lab {
        let parent = PathBuf::from("/etc/netns");
        let created_parent = !parent.exists();
        let dir = parent.join(&self.outer);
        std::fs::create_dir_all(&dir).unwrap();
        self.etc = Some((dir.clone(), created_parent));
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        self
    }

    /// `program args…` in the outer namespace (nsenter execs it: its pid is the program's).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.outer)).arg("--");
        if let Some((dir, _)) = &self.etc {
            c.args([
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "/bin/sh",
                "-c",
            ])
            .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
            .arg(dir.join("resolv.conf"));
        }
        c.arg(program)
            .args(args)
            .env("TARTARUS_BRIDGE_CIDR", BRIDGE_CIDR)
            .stdin(Stdio::null());
        c
    }

    /// `tartarus run --json [flags] -- cmd…` as the supervisor inside the outer namespace.
    fn run(&self, flags: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--json"];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        self.command(bin(), &args).output().expect("run tartarus")
    }

    /// Runs [`PROBE`] in an egress sandbox with `flags`; returns each target's result and the record.
    fn probe(&self, flags: &[&str], targets: &[&str]) -> (HashMap<String, String>, serde_json::Value) {
        let mut all = vec!["--network", "egress"];
        all.extend_from_slice(flags);
        let mut cmd = vec!["/usr/bin/python3", "-c", PROBE];
        cmd.extend_from_slice(targets);
        let out = self.run(&all, &cmd);
        assert_eq!(
            code(&out),
            0,
            "stdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        let results = stdout(&out)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, r)| (t.to_string(), r.to_string()))
            .collect();
        let record = result_record(&out);
        self.assert_clean(record["id"].as_str().unwrap());
        (results, record)
    }

    fn ruleset(&self) -> String {
        let out = self.command("nft", &["list", "ruleset"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    }

    /// Nothing of sandbox `id` is left: no chain in the outer ruleset, no named namespace, no veth.
    fn assert_clean(&self, id: &str) {
        let ruleset = self.ruleset();
        assert!(
            !ruleset.contains(&format!("chain sb_{id}")),
            "sandbox chain left behind:\n{ruleset}"
        );
        assert!(
            !ruleset.contains(&format!("id={id}")),
            "sandbox rule left behind:\n{ruleset}"
        );
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let listed = stdout(&netns);
        assert!(
            !listed.lines().any(|l| l.starts_with(&format!("tartarus-{id}"))),
            "namespace left behind: {listed}"
        );
        let links = self.command("ip", &["-o", "link"]).output().unwrap();
        assert!(!stdout(&links).contains(&format!("tt{id}")), "{}", stdout(&links));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for name in self.hosts.iter().chain(std::iter::once(&self.outer)) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        if let Some((dir, created_parent)) = &self.etc {
            let _ = std::fs::remove_dir_all(dir);
            if *created_parent {
                // Fails, as it should, while another test still uses it.
                let _ = std::fs::remove_dir(PathBuf::from("/etc/netns"));
            }
        }
    }
}

fn target(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

fn assert_reached(results: &HashMap<String, String>, t: &str) {
    assert_eq!(results.get(t).map(String::as_str), Some("ok"), "{t}: {results:?}");
}

/// Dropped, not refused: the packet never got to the host.
fn assert_blocked(results: &HashMap<String, String>, t: &str) {
    assert_eq!(
        results.get(t).map(String::as_str),
        Some("TimeoutError"),
        "{t}: {results:?}"
    );
}

#[test]
fn allowed_port_is_reachable_and_other_ports_are_blocked_and_counted() {
    let lab = Lab::standard();
    let (p80, p8080) = (target(PUBLIC, 80), target(PUBLIC, 8080));
    let (results, record) = lab.probe(&["--allow-port", "80"], &[&p80, &p8080]);
    assert_reached(&results, &p80);
    assert_blocked(&results, &p8080);
    assert!(record["blocked_packets"].as_u64().unwrap() > 0, "{record}");
}

#[test]
fn only_allowed_cidrs_are_reachable() {
    let lab = Lab::standard().host("pub2", PUBLIC_2, "198.51.100.1", 24, &[80]);
    let (allowed, other) = (target(PUBLIC, 80), target(PUBLIC_2, 80));
    let (results, record) = lab.probe(&["--allow-cidr", "203.0.113.0/24"], &[&allowed, &other]);
    assert_reached(&results, &allowed);
    assert_blocked(&results, &other);
    assert!(record["blocked_packets"].as_u64().unwrap() > 0);

    let (results, record) = lab.probe(&[], &[&allowed, &other]);
    assert_reached(&results, &allowed);
    assert_reached(&results, &other);
    assert_eq!(record["blocked_packets"], 0);
}

#[test]
fn private_hosts_are_blocked_by_default_and_reachable_with_allow_private() {
    let lab = Lab::standard();
    let private = target(PRIVATE, 80);
    let (results, _) = lab.probe(&[], &[&private]);
    assert_blocked(&results, &private);
    let (results, _) = lab.probe(&["--allow-private"], &[&private]);
    assert_reached(&results, &private);
}

#[test]
fn metadata_is_blocked_even_with_allow_private_and_a_covering_allowed_cidr() {
    let lab = Lab::standard();
    let metadata = target(METADATA, 80);
    let (results, record) = lab.probe(
        &[
            "--allow-private",
            "--allow-cidr",
            "169.254.0.0/16",
            "--allow-cidr",
            "169.254.169.254/32",
        ],
        &[&metadata],
    );
    assert_blocked(&results, &metadata);
    assert!(record["blocked_packets"].as_u64().unwrap() > 0);
}

#[test]
fn a_denied_cidr_beats_an_allowed_one() {
    let lab = Lab::standard();
    let public = target(PUBLIC, 80);
    let (results, _) = lab.probe(
        &["--allow-cidr", "203.0.113.0/24", "--deny-cidr", "203.0.113.10/32"],
        &[&public],
    );
    assert_blocked(&results, &public);
}

#[test]
fn dns_port_is_dropped_without_dns_and_open_to_the_host_resolver_with_it() {
    let lab = Lab::standard().resolv_conf(&format!("nameserver {PUBLIC}\n"));
    let (dns, web) = (target(PUBLIC, 53), target(PUBLIC, 80));
    let (results, _) = lab.probe(&["--allow-port", "53", "--allow-port", "80"], &[&dns, &web]);
    assert_blocked(&results, &dns);
    assert_reached(&results, &web);

    let (results, _) = lab.probe(&["--dns", "--allow-port", "80"], &[&dns, &web]);
    assert_reached(&results, &dns);
    assert_reached(&results, &web);
    let out = lab.run(
        &["--network", "egress", "--dns"],
        &["/bin/cat", "/etc/resolv.conf"],
    );
    assert_eq!(stdout(&out), format!("nameserver {PUBLIC}\n"), "{}", stderr(&out));
}

/// H6: services of the host itself — bound to 0.0.0.0, on its public-looking address 203.0.113.1, on its
/// bridge address, on its private address 10.77.0.1 — are unreachable from an egress sandbox, with or
/// without `--allow-private`, while upstreams in other namespaces are reachable. With `--dns`, a resolver
/// on the host is reached on port 53 and on nothing else.
#[test]
fn test_the_host_itself_is_unreachable_from_an_egress_sandbox_but_upstreams_are_reachable() {
    let lab = Lab::standard()
        .resolv_conf("nameserver 203.0.113.1\n")
        .host_services(&[9090, 53]);
    let (public, bridge, private) = (
        target("203.0.113.1", 9090),
        target("10.99.0.1", 9090),
        target("10.77.0.1", 9090),
    );
    let upstream = target(PUBLIC, 80);
    let (results, record) = lab.probe(&[], &[&public, &bridge, &upstream]);
    assert_blocked(&results, &public);
    assert_blocked(&results, &bridge);
    assert_reached(&results, &upstream);
    assert!(record["blocked_packets"].as_u64().unwrap() > 0, "{record}");

    let (results, _) = lab.probe(&["--allow-private"], &[&private, &public, &target(PRIVATE, 80)]);
    assert_blocked(&results, &private);
    assert_blocked(&results, &public);
    assert_reached(&results, &target(PRIVATE, 80));

    let resolver = target("203.0.113.1", 53);
    let (results, _) = lab.probe(&["--dns"], &[&resolver, &public, &upstream]);
    assert_reached(&results, &resolver);
    assert_blocked(&results, &public);
    assert_reached(&results, &upstream);
}

#[test]
fn two_egress_sandboxes_cannot_reach_each_other() {
    let lab = Lab::standard();
    // The first sandbox listens on its eth0 address (checking it can reach itself there) and stays up
    // until its stdin closes, reporting any connection it accepted.
    let listener = r#"
import select, socket, sys
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("203.0.113.10", 9))
addr = probe.getsockname()[0]
s = socket.socket()
s.bind((addr, 9000))
s.listen(4)
socket.create_connection((addr, 9000), timeout=2).close()
s.accept()[0].close()
print(addr, flush=True)
r, _, _ = select.select([s, sys.stdin], [], [], 30)
print("accepted" if s in r else "nothing", flush=True)
"#;
    let mut first = lab
        .command(
            bin(),
            &[
                "run",
                "--network",
                "egress",
                "--allow-private",
                "--",
                "/usr/bin/python3",
                "-c",
                listener,
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let addr = lines.next().expect("the listener's address").unwrap();
    assert!(addr.starts_with("10.99.0."), "{addr}");

    let peer = format!("{addr}:9000");
    let (results, _) = lab.probe(&["--allow-private"], &[&peer, &target(PUBLIC, 80)]);
    assert_ne!(results.get(&peer).map(String::as_str), Some("ok"), "{results:?}");
    assert_reached(&results, &target(PUBLIC, 80));

    drop(first.stdin.take());
    let verdict = lines.next().expect("the listener's verdict").unwrap();
    assert_eq!(verdict, "nothing");
    assert!(first.wait().unwrap().success());
}

#[test]
fn network_none_has_no_route_at_all() {
    let lab = Lab::standard();
    let script = format!("{PROBE}\nprint(sorted(n for _, n in socket.if_nameindex()))");
    let out = lab.run(&[], &["/usr/bin/python3", "-c", &script, &target(PUBLIC, 80)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let unreachable = libc::ENETUNREACH;
    assert_eq!(
        stdout(&out),
        format!("{} OSError:{unreachable}\n['lo']\n", target(PUBLIC, 80))
    );
    assert!(
        !lab.ruleset().contains("tartarus"),
        "none must not touch the firewall"
    );
}

#[test]
fn a_bad_cidr_is_a_clear_error_and_creates_nothing() {
    let lab = Lab::new();
    for (flag, value, needle) in [
        (
            "--allow-cidr",
            "203.0.113.1/24",
            "allowed CIDR: '203.0.113.1/24' has host bits set: the network is 203.0.113.0/24",
        ),
        (
            "--deny-cidr",
            "10.0.0.0/40",
            "denied CIDR: '10.0.0.0/40' has prefix length '40': use 0-32",
        ),
        (
            "--allow-cidr",
            "example.com",
            "allowed CIDR: 'example.com' is not an IPv4 or IPv6 address",
        ),
    ] {
        let out = lab.run(&["--network", "egress", flag, value], &["/bin/true"]);
        assert_eq!(code(&out), 125, "{flag} {value}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    assert!(!lab.ruleset().contains("tartarus"), "{}", lab.ruleset());
    let links = lab.command("ip", &["-o", "link"]).output().unwrap();
    assert!(!stdout(&links).contains("tartarus0"), "{}", stdout(&links));

    let out = lab.run(&["--allow-cidr", "203.0.113.0/24"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("--allow-cidr needs --network egress"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn rootless_egress_is_refused_clearly() {
    let lab = Lab::new();
    let (_dir, path) = world_executable_bin();
    let path = path.to_str().unwrap();
    let out = lab
        .command(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                path,
                "run",
                "--network",
                "egress",
                "--",
                "/bin/true",
            ],
        )
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("network egress needs root"),
        "{}",
        stderr(&out)
    );
    assert!(!lab.ruleset().contains("tartarus"));
}

#[test]
fn gc_removes_the_network_of_a_killed_supervisor() {
    let lab = Lab::standard();
    let mut supervisor = lab
        .command(
            bin(),
            &[
                "run",
                "--network",
                "egress",
                "--",
                "/bin/sh",
                "-c",
                "echo up; exec sleep 60",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(supervisor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "up");
    assert!(lab.ruleset().contains("chain sb_"), "{}", lab.ruleset());
    // `nsenter` execs the supervisor, so the child's pid is tartarus itself.
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();

    let out = lab.command(bin(), &["gc"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("/run/netns/tartarus-"), "{}", stdout(&out));
    let ruleset = lab.ruleset();
    assert!(
        !ruleset.contains("chain sb_") && !ruleset.contains("id="),
        "{ruleset}"
    );
}

#[test]
fn the_rate_limit_slows_a_download() {
    let lab = Lab::standard();
    // Prints the seconds a 256 KiB download from the public host took.
    let download = r#"
import socket, time
start = time.monotonic()
s = socket.create_connection(("203.0.113.10", 81), timeout=20)
got = 0
while True:
    data = s.recv(65536)
    if not data:
        break
    got += len(data)
assert got == 256 << 10, got
print("%.2f" % (time.monotonic() - start))
"#;
    let seconds = |flags: &[&str]| -> f64 {
        let mut all = vec!["--network", "egress"];
        all.extend_from_slice(flags);
        let out = lab.run(&all, &["/usr/bin/python3", "-c", download]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    };
    let unlimited = seconds(&[]);
    // 256 KiB at 64 KiB/s needs about 4 s (the limiter drops the excess and TCP backs off).
    let limited = seconds(&["--rate-limit", "64"]);
    assert!(unlimited < 1.0, "unlimited download took {unlimited} s");
    assert!(limited > 2.0, "rate-limited download took only {limited} s");
}

/// Moves this test's thread (and every process it starts from now on) into the lab's outer namespace.
/// Threads of other tests are unaffected: a network namespace is per thread.
fn enter(lab: &Lab) {
    let ns = std::fs::File::open(format!("/run/netns/{}", lab.outer)).unwrap();
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&ns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

#[test]
fn the_server_enforces_the_policy_on_a_sandbox_that_breaks_its_contract() {
    use common::server::{call, create, exec, wait_for, DataDir, Server};
    use serde_json::json;
    let lab = Lab::standard();
    enter(&lab);
    let dir = DataDir::new();
    let server = Server::start_with(
        dir.path(),
        &[("TARTARUS_BRIDGE_CIDR", BRIDGE_CIDR)],
        &["--enforcement-interval", "200ms"],
    );
    let apply = |on_violation: &str| {
        let yaml = format!(
            "id: net\nnetwork: {{egress: true, allowed_egress_ports: [80]}}\n\
             enforcement: {{on_network_violation: {on_violation}}}\n"
        );
        let (status, reply) = call(
            "POST",
            &format!("{}/v1/policies", server.base),
            Some(&server.admin),
            Some(json!({"yaml": yaml})),
        );
        assert_eq!(status, 201, "{reply}");
    };
    let connect = |port: u16| {
        format!(
            "import socket\ntry:\n    socket.create_connection(('{PUBLIC}', {port}), timeout=1)\n    print('reached')\n\
             except OSError:\n    print('blocked')"
        )
    };
    let python = |id: &str, code: &str| {
        exec(
            &server,
            &server.admin,
            id,
            json!({"cmd": ["python3", "-c", code]}),
        )
        .1
    };
    // The violation happens in a background process: the sandbox is killed or frozen while it runs, so the
    // exec that starts it must already have answered.
    let violate = |id: &str| {
        let (status, reply) = exec(
            &server,
            &server.admin,
            id,
            json!({"cmd": ["sh", "-c", "python3 -c \"$0\" >/dev/null 2>&1 &", connect(8080)]}),
        );
        assert_eq!((status, reply["exit_code"].as_i64()), (200, Some(0)), "{reply}");
    };

    // kill: what the contract allows works; the first blocked connection ends the sandbox.
    apply("kill");
    let a = create(&server, &server.admin, json!({"network": "egress"}));
    let a = a["id"].as_str().unwrap().to_string();
    assert_eq!(python(&a, &connect(80))["stdout"], "reached\n");
    violate(&a);
    let ended = wait_for(&server, &a, |r| r["status"] == "killed");
    assert_eq!(ended["status"], "killed", "{ended}");

    // quarantine: the sandbox is frozen and cut off instead, and stays for inspection.
    apply("quarantine");
    let b = create(&server, &server.admin, json!({"network": "egress"}));
    let b = b["id"].as_str().unwrap().to_string();
    violate(&b);
    wait_for(&server, &b, |r| r["status"] == "paused");

    // An operator can quarantine any running sandbox.
    let c = create(&server, &server.admin, json!({"network": "egress"}));
    let c = c["id"].as_str().unwrap().to_string();
    let (status, reply) = call(
        "POST",
        &format!("{}/v1/sandboxes/{c}/quarantine", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{reply}");
    wait_for(&server, &c, |r| r["status"] == "paused");

    // Each enforcement is an event, recorded right after the action (so it may land a moment later).
    let wanted = [
        (a.clone(), "network.kill".to_string()),
        (b.clone(), "network.quarantine".to_string()),
        (c.clone(), "operator.quarantine".to_string()),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, events) = call(
            "GET",
            &format!("{}/v1/events?category=enforcement", server.base),
            Some(&server.admin),
            None,
        );
        let kinds: Vec<(String, String)> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["sandbox"].as_str().unwrap_or("").to_string(),
                    e["kind"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let missing: Vec<_> = wanted.iter().filter(|w| !kinds.contains(w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{missing:?} missing: {events}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    drop(dir);
    assert!(
        !lab.ruleset().contains("sb_"),
        "a sandbox chain was left: {}",
        lab.ruleset()
    );
}

/// The contract probe of `lane`: port 80 of a public test host reached, port 8080 and a private host
/// dropped and counted.
fn assert_lane_held_to_the_contract(lane: &str) {
    let lab = Lab::standard();
    let (p80, p8080, private) = (target(PUBLIC, 80), target(PUBLIC, 8080), target(PRIVATE, 80));
    let (results, record) = lab.probe(
        &["--runtime", lane, "--allow-port", "80"],
        &[&p80, &p8080, &private],
    );
    assert_reached(&results, &p80);
    assert_blocked(&results, &p8080);
    assert_blocked(&results, &private);
    assert!(record["blocked_packets"].as_u64().unwrap() > 0, "{record}");
}

#[test]
fn test_a_gvisor_sandbox_is_held_to_the_same_egress_contract() {
    // The same namespace, veth and rules as the process lane's; runsc only ever sees that namespace.
    assert_lane_held_to_the_contract("gvisor");
}

#[test]
fn test_a_microvm_sandbox_is_held_to_the_same_egress_contract() {
    // The same namespace, veth and rules; the guest's NIC is bridged to the namespace's eth0 through a
    // TAP, so its packets cross the same port and contract. QEMU itself only holds the TAP's descriptor.
    assert_lane_held_to_the_contract("microvm");
}
