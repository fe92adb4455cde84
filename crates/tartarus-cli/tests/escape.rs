//! The escape suite: each test is a real attempt to break out of a default sandbox, and asserts that it
//! fails. Where the attack could "fail" for an unrelated reason, the test also checks the specific wall
//! (errno, or a positive control showing the probe works when the wall is absent).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::*;

/// Runs Python that prints the errno of a raw syscall (0 on success).
fn syscall_errno(nr_and_args: &str) -> String {
    let script = format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.syscall({nr_and_args})\n\
         print(0 if r >= 0 else ctypes.get_errno())"
    );
    ok(py(&[], &script)).trim().to_string()
}

const EPERM: &str = "1";

#[test]
fn host_secrets_are_not_visible() {
    // A secret in root's home, and the host's shadow file.
    let secret = std::env::temp_dir().join(format!("tartarus-secret-{}", std::process::id()));
    std::fs::write(&secret, "TOP-SECRET").unwrap();
    let script = format!(
        "cat /etc/shadow; cat {}; ls /root /home; cat /proc/1/root/etc/shadow; cat /proc/self/root/../../etc/shadow; echo done",
        secret.display()
    );
    let out = sh(&script);
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("TOP-SECRET"), "{all}");
    assert!(!all.contains("root:"), "shadow-like content leaked: {all}");
    assert!(stdout(&out).contains("done"));
    // The sandbox /etc is generated: only our three users.
    let passwd = ok(sh("cat /etc/passwd"));
    assert_eq!(passwd.lines().count(), 3, "{passwd}");
    std::fs::remove_file(secret).unwrap();
}

#[test]
fn nothing_outside_the_scratch_areas_is_writable() {
    let marker = format!("escape-{}", std::process::id());
    let script = format!(
        "for d in / /usr /usr/bin /etc /dev /proc /home; do echo x > $d/{marker} 2>/dev/null && echo WROTE-$d; done; \
         mkdir /{marker} 2>/dev/null && echo MKDIR; echo x > /tmp/ok && echo x > ~/ok && echo scratch-ok"
    );
    let out = ok(sh(&script));
    assert!(!out.contains("WROTE") && !out.contains("MKDIR"), "{out}");
    assert!(out.contains("scratch-ok"));
    for dir in ["/", "/usr", "/usr/bin", "/etc", "/home"] {
        assert!(
            !std::path::Path::new(dir).join(&marker).exists(),
            "wrote into host {dir}"
        );
    }
}

#[test]
fn host_processes_are_invisible_and_unsignalable() {
    let mut victim = Command::new("sleep").arg("300").spawn().unwrap();
    let pid = victim.id();
    let script = format!("ls /proc | grep -c '^[0-9]'; kill -0 {pid} 2>&1 || echo cannot-signal");
    let out = ok(sh(&script));
    let visible: u32 = out.lines().next().unwrap().trim().parse().unwrap();
    assert!(visible <= 4, "sandbox sees {visible} processes:\n{out}");
    assert!(out.contains("cannot-signal"), "{out}");
    assert!(victim.try_wait().unwrap().is_none(), "host process was killed");
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn host_loopback_listener_is_unreachable_by_default() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n\
         except OSError as e:\n    print('refused', e.errno)"
    );
    let out = ok(py(&[], &probe));
    assert!(out.starts_with("refused"), "{out}");
    // Positive control: the same probe does reach it when the sandbox shares the host network.
    let out = ok(py(&["--network", "host-loopback"], &probe));
    assert!(out.contains("CONNECTED"), "probe is broken: {out}");
}

#[test]
fn kernel_modules_cannot_be_loaded() {
    // init_module(NULL, 0, "") and finit_module(-1, "", 0)
    assert_eq!(syscall_errno("175, None, 0, b''"), EPERM);
    assert_eq!(syscall_errno("313, -1, b'', 0"), EPERM);
}

#[test]
fn ptrace_is_denied() {
    // ptrace(PTRACE_TRACEME) and ptrace(PTRACE_ATTACH, 1)
    assert_eq!(syscall_errno("101, 0, 0, 0, 0"), EPERM);
    assert_eq!(syscall_errno("101, 16, 1, 0, 0"), EPERM);
}

#[test]
fn mounting_is_denied() {
    // mount("none", "/tmp", "tmpfs", 0, NULL)
    assert_eq!(syscall_errno("165, b'none', b'/tmp', b'tmpfs', 0, None"), EPERM);
    let out = sh("mount -t tmpfs none /tmp 2>&1; umount /proc 2>&1; echo done");
    assert!(stdout(&out).contains("done"));
    assert!(ok(sh("grep -c ' /tmp ' /proc/self/mountinfo")).trim() == "1");
}

#[test]
fn new_user_namespaces_and_setns_are_denied() {
    // unshare(CLONE_NEWUSER), setns(0, 0)
    assert_eq!(syscall_errno("272, 0x10000000"), EPERM);
    assert_eq!(syscall_errno("308, 0, 0"), EPERM);
    let out = sh("unshare -U true 2>&1 || echo blocked");
    assert!(stdout(&out).contains("blocked"), "{}", stdout(&out));
}

#[test]
fn dangerous_kernel_interfaces_are_denied() {
    // bpf, perf_event_open, keyctl, add_key, userfaultfd, io_uring_setup, open_by_handle_at, kexec_load,
    // reboot, swapon
    for call in [
        "321, 0, None, 0",
        "298, None, 0, -1, -1, 0",
        "250, 0, 0, 0, 0, 0",
        "248, b'user', b'k', b'v', 1, -1",
        "323, 0",
        "425, 8, None",
        "304, -1, None, 0",
        "246, 0, 0, None, 0",
        "169, 0xfee1dead, 672274793, 0x1234567, None",
        "167, b'/tmp/x', 0",
    ] {
        assert_eq!(syscall_errno(call), EPERM, "syscall({call}) was not denied");
    }
}

/// M6: only AF_UNIX, AF_INET, AF_INET6 and route netlink sockets can be created. AF_VSOCK is scoped by no
/// namespace (it reaches the hypervisor, CID 2, from any network mode), so its socket must not even be
/// created: nothing here connects anywhere.
#[test]
fn test_sockets_of_families_other_than_unix_inet_inet6_and_route_netlink_are_refused() {
    let script = r#"
import errno, socket
def probe(name, family, kind, protocol=0):
    try:
        socket.socket(family, kind, protocol).close()
        print(name, "created")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
probe("vsock", socket.AF_VSOCK, socket.SOCK_STREAM)
probe("vsock-dgram", socket.AF_VSOCK, socket.SOCK_DGRAM)
probe("packet", socket.AF_PACKET, socket.SOCK_RAW)
probe("netlink-audit", socket.AF_NETLINK, socket.SOCK_RAW, 9)
probe("unix", socket.AF_UNIX, socket.SOCK_STREAM)
probe("inet", socket.AF_INET, socket.SOCK_STREAM)
probe("inet6", socket.AF_INET6, socket.SOCK_DGRAM)
probe("netlink-route", socket.AF_NETLINK, socket.SOCK_RAW, 0)
try:
    socket.socketpair(socket.AF_VSOCK)
    print("vsock-pair created")
except OSError as e:
    print("vsock-pair", errno.errorcode[e.errno])
a, b = socket.socketpair(socket.AF_UNIX)
a.sendall(b"x")
print("unix-pair", "works" if b.recv(1) == b"x" else "broken")
"#;
    let out = ok(py(&[], script));
    let results: std::collections::HashMap<&str, &str> =
        out.lines().filter_map(|l| l.split_once(' ')).collect();
    for refused in ["vsock", "vsock-dgram", "packet", "netlink-audit", "vsock-pair"] {
        assert_eq!(results.get(refused), Some(&"EAFNOSUPPORT"), "{refused}: {out}");
    }
    for created in ["unix", "inet", "inet6", "netlink-route"] {
        assert_eq!(results.get(created), Some(&"created"), "{created}: {out}");
    }
    assert_eq!(results.get("unix-pair"), Some(&"works"), "{out}");
    // `ip` speaks route netlink, which stays allowed.
    let links = ok(sh("ip -br link"));
    assert!(links.starts_with("lo "), "{links}");
}

/// L4: init is a clone of the supervisor, whose arguments name host paths (the binary, and for a shim
/// the data directory and the sandbox's spec): its cmdline shows a title instead.
#[test]
fn test_the_init_cmdline_shows_no_host_path() {
    let out = ok(sh("tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/comm"));
    let mut lines = out.lines();
    let cmdline = lines.next().unwrap().trim_end();
    assert_eq!(cmdline, "tartarus-init", "{out}");
    assert!(!out.contains(bin()), "{out}");
    // The comm is the binary's name only, never a path.
    assert!(!lines.next().unwrap().contains('/'), "{out}");
}

#[test]
fn host_hostname_cannot_be_changed() {
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = sh("hostname escaped 2>&1; echo escaped > /proc/sys/kernel/hostname 2>&1; hostname");
    assert_eq!(stdout(&out).lines().last().unwrap(), "sandbox");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
}

#[test]
fn proc_sys_is_not_writable() {
    let before = std::fs::read_to_string("/proc/sys/kernel/domainname").unwrap();
    let out = sh("echo owned > /proc/sys/kernel/domainname && echo WROTE; echo 1 > /proc/sys/vm/drop_caches && echo WROTE2; echo done");
    assert!(!stdout(&out).contains("WROTE"), "{}", stdout(&out));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/domainname").unwrap(),
        before
    );
}

#[test]
fn landlock_blocks_writes_that_file_permissions_would_allow() {
    // /proc/self/oom_score_adj belongs to the process itself, so DAC allows raising it; only Landlock
    // (writes allowed only in scratch areas) stops it.
    let out = sh("echo 500 > /proc/self/oom_score_adj && echo WROTE; echo done");
    assert!(!stdout(&out).contains("WROTE"), "{}", stdout(&out));
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
}

#[test]
fn no_capabilities_and_no_new_privileges() {
    let status = ok(sh(
        "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status",
    ));
    for line in status.lines() {
        match line.split_once(':').unwrap() {
            ("NoNewPrivs", v) => assert_eq!(v.trim(), "1"),
            ("Seccomp", v) => assert_eq!(v.trim(), "2"),
            (_, v) => assert_eq!(v.trim(), "0000000000000000", "{line}"),
        }
    }
    assert_eq!(ok(sh("id -u")).trim(), "1000");
}

#[test]
fn terminal_input_injection_is_denied() {
    // ioctl(0, TIOCSTI, "x") on whatever stdin is; EPERM from seccomp regardless of the descriptor.
    assert_eq!(syscall_errno("16, 0, 0x5412, b'x'"), EPERM);
}

#[test]
fn mount_target_with_dotdot_is_rejected_before_anything_runs() {
    let out = run(&["--mount", "/tmp:/data/../../etc"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("without '..'"), "{}", stderr(&out));
}

#[test]
fn fork_bomb_is_contained_by_pids() {
    let parent = cgroup_parent("forkbomb");
    let bomb = "bomb() { bomb | bomb & }; bomb; sleep 1; echo host-still-fine";
    let out = run_in_cgroup(
        &parent,
        &["--pids", "64", "--timeout", "20s", "--json"],
        &["/bin/sh", "-c", bomb],
    );
    let r = result_record(&out);
    assert_ne!(
        r["reason"],
        "timeout",
        "fork bomb was not contained: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("Cannot fork"), "{}", stderr(&out));
    assert!(leftover_cgroups(&parent).is_empty());
    remove_cgroup_parent(&parent);
}

#[test]
fn memory_bomb_is_killed_inside_the_sandbox_only() {
    let parent = cgroup_parent("membomb");
    let bomb = "x = []\nwhile True: x.append(bytearray(1 << 20))";
    let out = run_in_cgroup(
        &parent,
        &["--memory", "48M", "--json"],
        &["/usr/bin/python3", "-c", bomb],
    );
    assert_eq!(code(&out), 137);
    assert_eq!(result_record(&out)["reason"], "oom", "{}", stderr(&out));
    assert!(leftover_cgroups(&parent).is_empty());
    remove_cgroup_parent(&parent);
}

#[test]
fn filling_tmp_stops_at_the_scratch_cap() {
    let out = run(
        &["--scratch-size", "16M"],
        &[
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>&1; du -m /tmp/fill",
        ],
    );
    let text = stdout(&out);
    assert!(text.contains("No space left on device"), "{text}");
    let used: u64 = text
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(used <= 16, "wrote {used} MiB past a 16 MiB cap");
}

#[test]
fn file_descriptor_exhaustion_stops_at_the_rlimit() {
    let script = "import os\nfds = []\ntry:\n    while True: fds.append(os.open('/dev/null', os.O_RDONLY))\n\
                  except OSError as e:\n    print(len(fds), e.errno)";
    let out = ok(py(&[], script));
    let mut parts = out.split_whitespace();
    let opened: usize = parts.next().unwrap().parse().unwrap();
    assert!(opened < 1024, "opened {opened} descriptors");
    assert_eq!(parts.next().unwrap(), "24", "expected EMFILE");
}

#[test]
fn core_dumps_are_disabled() {
    assert_eq!(ok(sh("ulimit -c")).trim(), "0");
}
