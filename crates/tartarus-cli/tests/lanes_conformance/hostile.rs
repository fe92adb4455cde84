//! Escape and hostile-tenant checks: what a sandboxed command must not reach, in every lane.

use std::net::TcpListener;

use crate::common::{code, stderr, stdout};
use crate::harness::{host_secret, Fixture};

fn ok(out: std::process::Output) -> String {
    assert_eq!(
        code(&out),
        0,
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

pub fn the_network_has_only_loopback(f: &Fixture) {
    let names = ok(f.py("import socket; print(sorted(n for _, n in socket.if_nameindex()))"));
    assert_eq!(names.trim(), "['lo']", "interfaces other than lo: {names}");
}

pub fn a_host_loopback_listener_is_unreachable(f: &Fixture) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n    \
         print('CONNECTED')\nexcept OSError as e:\n    print('refused', e.errno)"
    );
    let out = ok(f.py(&probe));
    assert!(out.starts_with("refused"), "{out}");
    assert!(
        listener.accept().is_err(),
        "the host listener accepted a connection from the sandbox"
    );
}

/// AF_VSOCK reaches the hypervisor from any network namespace: the socket must not even be created (nothing
/// here connects anywhere).
pub fn vsock_sockets_cannot_be_created(f: &Fixture) {
    let script = r#"
import errno, socket
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    try:
        socket.socket(socket.AF_VSOCK, kind).close()
        print("created")
    except OSError as e:
        print(errno.errorcode[e.errno])
socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
print("unix created")
"#;
    let out = ok(f.py(script));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for line in &lines[..2] {
        assert!(
            ["EAFNOSUPPORT", "EPERM", "EACCES", "EINVAL"].contains(line),
            "a vsock socket was created or failed oddly: {out}"
        );
    }
    assert_eq!(lines[2], "unix created", "the probe is broken: {out}");
}

pub fn no_capabilities_and_mounting_fails(f: &Fixture) {
    let status = ok(f.sh(&[], "grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status"));
    // gVisor shows no CapAmb line.
    assert!(
        status.lines().count() >= 3 && status.contains("CapEff:"),
        "{status}"
    );
    for line in status.lines() {
        let (_, value) = line.split_once(':').unwrap();
        assert_eq!(value.trim(), "0000000000000000", "{line}");
    }
    // mount("none", "/tmp", "tmpfs", 0, NULL) and umount2("/proc", 0)
    let script = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
                  print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n\
                  print(libc.umount2(b'/proc', 0), ctypes.get_errno())";
    let out = ok(f.py(script));
    assert_eq!(
        out, "-1 1\n-1 1\n",
        "mount or umount did not fail with EPERM: {out}"
    );
}

pub fn host_files_are_invisible(f: &Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let secret = host_secret(dir.path());
    let script = format!(
        "cat /etc/shadow; cat {}; ls /root; cat /proc/1/root/etc/shadow; \
         cat /proc/self/root/../../etc/shadow; echo done",
        secret.display()
    );
    let out = f.sh(&[], &script);
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains("TOP-SECRET"), "{all}");
    assert!(!all.contains("root:"), "shadow-like content leaked: {all}");
    assert!(stdout(&out).ends_with("done\n"), "{all}");
}

pub fn host_processes_are_invisible(f: &Fixture) {
    let mut victim = std::process::Command::new("sleep").arg("300").spawn().unwrap();
    let pid = victim.id();
    let script = format!(
        "ls /proc | grep -c '^[0-9]'; cat /proc/{pid}/cmdline 2>/dev/null | tr '\\0' ' '; echo; \
         kill -9 {pid} 2>/dev/null || echo cannot-signal"
    );
    let out = ok(f.sh(&[], &script));
    let visible: u32 = out.lines().next().unwrap().trim().parse().unwrap();
    assert!(visible <= 4, "the sandbox sees {visible} processes:\n{out}");
    assert!(!out.contains("sleep 300"), "{out}");
    assert!(out.contains("cannot-signal"), "{out}");
    assert!(victim.try_wait().unwrap().is_none(), "a host process was killed");
    victim.kill().unwrap();
    victim.wait().unwrap();
}

pub fn only_the_scratch_areas_are_writable(f: &Fixture) {
    let script = "for p in /usr/x /etc/x /x /bin/x; do touch $p 2>/dev/null && echo wrote $p; done; \
                  touch /tmp/x /home/sandbox/x && echo scratch-ok";
    let out = ok(f.sh(&[], script));
    assert_eq!(out, "scratch-ok\n", "{out}");
}
