#!/usr/bin/env python3
"""Writes the hand-made seed corpus of every fuzz target into fuzz/corpus/<target>/seed-*.

Seeds are valid (and deliberately hostile) inputs the fuzzer mutates from: tar layers with `..`, absolute
paths, symlink-then-write, hard links, whiteouts, forged xattrs and long names; the golden vectors of
conformance/v1; the policies and templates of the repository and its tests; request bodies; shim lines;
stored specs. The output is committed; rerun after changing this script (`python3 fuzz/seeds.py`). Seeds
are rewritten, nothing else in corpus/ is touched. Needs only python3 (and `zstd` for the zstd layers,
which are skipped without it).
"""

import base64
import glob
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
# The absolute directory the unpack target watches (fuzz_targets/unpack.rs, SHARED_VICTIM).
SHARED_VICTIM = "/tmp/tartarus-fuzz-victim"
# No padding of archives to 10 KiB records: the end-of-archive marker is enough, and seeds stay small.
tarfile.RECORDSIZE = tarfile.BLOCKSIZE


def write(target, name, data):
    directory = os.path.join(FUZZ, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(directory, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds():
    for path in glob.glob(os.path.join(FUZZ, "corpus", "*", "seed-*")):
        os.remove(path)


# --- unpack -------------------------------------------------------------------------------------------


class Layer:
    """A tar stream built entry by entry; names are written as given (tarfile does not sanitise on write)."""

    def __init__(self, fmt=tarfile.GNU_FORMAT):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def add(self, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", uid=0, gid=0, pax=None,
            devmajor=0, devminor=0):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = 1_600_000_000
        info.linkname = link
        info.devmajor, info.devminor = devmajor, devminor
        if pax:
            info.pax_headers = pax
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)
        return self

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


def zstd(data):
    if shutil.which("zstd") is None:
        return None
    return subprocess.run(["zstd", "-q", "-c", "-19"], input=data, stdout=subprocess.PIPE, check=True).stdout


def gnu_long_name_bomb(size, actual):
    """A GNU long-name header ('L') declaring `size` bytes of name, followed by `actual` zero bytes."""
    header = bytearray(512)
    name = b"././@LongLink"
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[156:157] = b"L"
    header[257:265] = b"ustar  \0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\0" * actual


def unpack_seeds():
    layers = {}
    layers["plain"] = (
        Layer()
        .add("etc", tarfile.DIRTYPE, mode=0o755)
        .add("etc/hostname", data=b"sandbox\n")
        .add("usr/bin/tool", data=b"#!/bin/sh\necho hi\n", mode=0o755)
        .add("usr/bin/alias", tarfile.SYMTYPE, link="tool")
        .add("usr/bin/hard", tarfile.LNKTYPE, link="usr/bin/tool")
        .add("run/fifo", tarfile.FIFOTYPE)
        .add("tmp", tarfile.DIRTYPE, mode=0o1777)
        .bytes()
    )
    layers["dotdot"] = Layer().add("../victim/canary", data=b"owned\n").bytes()
    layers["dotdot-nested"] = Layer().add("a/b/../../../victim/new", data=b"x").bytes()
    layers["absolute"] = Layer().add(SHARED_VICTIM + "/canary", data=b"owned\n").bytes()
    layers["symlink-then-file"] = (
        Layer().add("out", tarfile.SYMTYPE, link="../victim").add("out/canary", data=b"owned\n").bytes()
    )
    layers["symlink-abs-then-file"] = (
        Layer().add("etc", tarfile.SYMTYPE, link=SHARED_VICTIM).add("etc/canary", data=b"owned\n").bytes()
    )
    layers["symlink-then-dir"] = (
        Layer().add("d", tarfile.SYMTYPE, link="../victim/dir").add("d/sub", tarfile.DIRTYPE).bytes()
    )
    layers["symlink-replaced-by-file"] = (
        Layer().add("f", tarfile.SYMTYPE, link="../victim/canary").add("f", data=b"replaced\n").bytes()
    )
    layers["hardlink-escape"] = Layer().add("h", tarfile.LNKTYPE, link="../victim/canary").bytes()
    layers["hardlink-absolute"] = Layer().add("h", tarfile.LNKTYPE, link=SHARED_VICTIM + "/canary").bytes()
    layers["hardlink-to-symlink-then-write"] = (
        Layer()
        .add("s", tarfile.SYMTYPE, link=SHARED_VICTIM + "/canary")
        .add("h", tarfile.LNKTYPE, link="s")
        .add("h", data=b"owned\n")
        .bytes()
    )
    layers["hardlink-through-symlink-dir"] = (
        Layer().add("d", tarfile.SYMTYPE, link="../victim").add("h", tarfile.LNKTYPE, link="d/canary").bytes()
    )
    layers["whiteouts"] = (
        Layer()
        .add("dir", tarfile.DIRTYPE)
        .add("dir/.wh..wh..opq")
        .add("dir/.wh.gone")
        .add(".wh.old")
        .add(".wh..wh.plnk")
        .add("x/.wh.")
        .bytes()
    )
    layers["setuid-and-devices"] = (
        Layer()
        .add("bin/su", data=b"\x7fELF", mode=0o6755)
        .add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
        .add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        .add("sticky", tarfile.DIRTYPE, mode=0o1777)
        .bytes()
    )
    layers["pax-xattrs"] = (
        Layer(tarfile.PAX_FORMAT)
        .add("file", data=b"x", pax={"SCHILY.xattr.user.note": "hello", "mtime": "1600000000.5"})
        .add("forged", data=b"x", pax={"SCHILY.xattr.user.overlay.opaque": "y"})
        .add("cap", data=b"x", pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
        .add("trusted", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})
        .add("negative-time", data=b"x", pax={"mtime": "-1.25"})
        .bytes()
    )
    layers["pax-path-escape"] = (
        Layer(tarfile.PAX_FORMAT).add("innocent", data=b"owned\n", pax={"path": "../victim/canary"}).bytes()
    )
    layers["pax-linkpath-escape"] = (
        Layer(tarfile.PAX_FORMAT)
        .add("link", tarfile.LNKTYPE, pax={"linkpath": "../victim/canary"})
        .bytes()
    )
    layers["gnu-long-names"] = (
        Layer()
        .add("d/" + "n" * 150, data=b"long\n")
        .add("l/" + "m" * 120, tarfile.SYMTYPE, link="t" * 130)
        .bytes()
    )
    layers["replace-dir-with-file"] = (
        Layer()
        .add("d", tarfile.DIRTYPE, mode=0o555)
        .add("d/inner", data=b"x")
        .add("d", data=b"file now")
        .add("d2", tarfile.DIRTYPE, mode=0o000)
        .add("d2/child", data=b"y")
        .bytes()
    )
    layers["ids"] = (
        Layer().add("mine", data=b"x", uid=1000, gid=1000).add("far", data=b"x", uid=70000, gid=5).bytes()
    )
    layers["too-many-bytes"] = Layer().add("big", data=b"\0" * (2 << 20)).bytes()
    many = Layer()
    for i in range(300):
        many.add("f%d" % i)
    layers["too-many-entries"] = many.bytes()
    # An empty archive and a truncated one.
    layers["empty"] = b"\0" * 1024
    layers["truncated"] = layers["plain"][:700]

    for name, tar in layers.items():
        # Selector byte: bits 0-1 compression (0 none, 1 gzip, 2 zstd), bit 2 id shift.
        if len(tar) < 64 << 10:
            write("unpack", name + ".tar", b"\x00" + tar)
        write("unpack", name + ".tar.gz", b"\x01" + gzip.compress(tar, mtime=0))
    for name in ["plain", "ids", "symlink-then-file"]:
        write("unpack", name + "-shifted.tar", b"\x04" + layers[name])
    for name in ["plain", "too-many-bytes", "whiteouts"]:
        compressed = zstd(layers[name])
        if compressed is not None:
            write("unpack", name + ".tar.zst", b"\x02" + compressed)
    # A long name that declares 8 GiB and delivers 4 MiB of zeros (gzip makes it 4 KiB).
    bomb = gnu_long_name_bomb(8 << 30, 4 << 20)
    write("unpack", "long-name-bomb.tar.gz", b"\x01" + gzip.compress(bomb, mtime=0))


# --- dagcbor ------------------------------------------------------------------------------------------


def dagcbor_seeds():
    hex_keys = ["hex", "canonical_hex", "envelope_hex", "payload_hex", "signing_input_hex", "car_hex",
                "manifest_hex"]
    for path in sorted(glob.glob(os.path.join(ROOT, "conformance", "v1", "*", "*.json"))):
        vector = json.load(open(path))
        stem = os.path.basename(os.path.dirname(path)) + "-" + os.path.basename(path)[: -len(".json")]
        for key in hex_keys:
            value = vector.get(key)
            if isinstance(value, str) and value:
                try:
                    write("dagcbor", stem + "." + key, bytes.fromhex(value))
                except ValueError:
                    pass
        text = vector.get("text") or vector.get("cid") or vector.get("payload_cid")
        if isinstance(text, str) and text:
            write("dagcbor", stem + ".cid-text", text)
            if text.startswith("b"):
                body = text[1:].upper()
                try:
                    raw = base64.b32decode(body + "=" * (-len(body) % 8))
                    write("dagcbor", stem + ".cid-bytes", raw)
                except ValueError:
                    pass


# --- documents ----------------------------------------------------------------------------------------


def rust_strings(source):
    """The string literals of a Rust source file (plain with escapes and line continuations, and raw)."""
    out = []
    for m in re.finditer(r'r(#*)"(.*?)"\1', source, re.S):
        out.append(m.group(2))
    for m in re.finditer(r'(?<![r#\w])"((?:[^"\\]|\\.)*)"', source, re.S):
        text = re.sub(r"\\\n\s*", "", m.group(1))
        text = (text.replace("\\n", "\n").replace("\\t", "\t").replace('\\"', '"').replace("\\\\", "\\"))
        out.append(text)
    return out


def yaml_blocks(markdown):
    return re.findall(r"```ya?ml\n(.*?)```", markdown, re.S)


def documents_seeds():
    docs = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "templates", "*.yaml"))):
        docs["template-" + os.path.basename(path)] = open(path).read()
    for path in [os.path.join(ROOT, "docs", "policy.md"), os.path.join(ROOT, "templates", "README.md"),
                 os.path.join(ROOT, "docs", "images.md")]:
        for i, block in enumerate(yaml_blocks(open(path).read())):
            docs["%s-%d.yaml" % (os.path.basename(path)[:-3], i)] = block
    lib = open(os.path.join(ROOT, "crates", "tartarus-policy", "src", "lib.rs")).read()
    doc_yaml = re.search(r"//! ```yaml\n(.*?)//! ```", lib, re.S)
    if doc_yaml:
        docs["policy-crate-doc.yaml"] = re.sub(r"(?m)^//! ?", "", doc_yaml.group(1))
    sources = [
        ("policy-tests", os.path.join(ROOT, "crates", "tartarus-policy", "src", "tests.rs")),
        ("policy-effective", os.path.join(ROOT, "crates", "tartarus-policy", "src", "effective.rs")),
        ("template-tests", os.path.join(ROOT, "crates", "tartarus-image", "src", "template.rs")),
        ("document-tests", os.path.join(ROOT, "crates", "tartarus-document", "src", "lib.rs")),
    ]
    for prefix, path in sources:
        for i, text in enumerate(rust_strings(open(path).read())):
            if re.search(r"(?m)^\s*\"?id\"?\s*:", text) or text.lstrip().startswith("{"):
                docs["%s-%03d.yaml" % (prefix, i)] = text
    seen = set()
    for name, text in sorted(docs.items()):
        if text not in seen:
            seen.add(text)
            write("documents", name, text)


# --- api_body -----------------------------------------------------------------------------------------

# Selector bytes (fuzz_targets/api_body.rs): low 3 bits pick the route; for create, bits 3-4 the role
# (0 admin, 1 user, 2 viewer), bit 6 host network allowed, bit 7 host rootfs allowed; for the others
# (low bits 5-7), selector >> 3 picks evaluator, tool, node report, node sandbox, dataset query.
CREATE, EXEC, TEMPLATE, POLICY, OTHER = 0, 2, 3, 4, 5


def other(kind):
    return OTHER | (kind << 3)


def api_seeds():
    bodies = []
    admin_all = CREATE | 0x40 | 0x80
    user = CREATE | (1 << 3)
    bodies += [
        ("create-minimal", user, {}),
        ("create-cmd", user, {"cmd": ["/bin/sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/work",
                              "timeout_s": 60, "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64}}),
        ("create-egress", user, {"cmd": ["curl", "x"], "network": "egress", "class": "flame",
                                 "labels": {"app": "web"}}),
        ("create-template", user, {"template": "python-ds", "lane": "swift", "priority": 3}),
        ("create-image", user, {"image": "python:3.11-slim", "cmd": ["python3"]}),
        ("create-host-net-user", user, {"network": "host-loopback"}),
        ("create-host-net-admin", admin_all, {"network": "host-loopback", "rootfs": "/srv/root"}),
        ("create-cluster", user, {"node_selector": {"zone": "a"},
                                  "tolerations": [{"key": "gpu", "value": "true"}],
                                  "node_affinity": [{"key": "disk", "value": "ssd", "weight": 50}],
                                  "node_anti_affinity": [{"key": "x", "value": "y", "weight": 1}],
                                  "spread_by": "app"}),
        ("create-bad-bounds", user, {"cmd": ["x\u0000"], "resources": {"cpus": 1e-300, "memory_mb": 1},
                                     "timeout_s": 0}),
        ("exec", EXEC, {"cmd": ["ls", "-l"], "env": {"B": "2"}, "cwd": "/tmp", "stdin": "data",
                        "timeout_s": 1.5, "stream": True}),
        ("exec-bad", EXEC, {"cmd": [], "env": {"": "x", "A=B": "y"}, "cwd": "../x", "timeout_s": -1}),
    ]
    template = open(os.path.join(ROOT, "templates", "python-ds.yaml")).read()
    bodies += [
        ("template-yaml", TEMPLATE, {"yaml": template, "source": "python-ds.yaml"}),
        ("template-json", TEMPLATE, {"id": "t", "name": "T", "base_image": "busybox:latest",
                                     "resources": {"default_cpu": 1, "max_cpu": 2, "default_memory": 128,
                                                   "max_memory": 512},
                                     "env": {"A": "1"}, "workdir": "/w", "pool": {"size": 1},
                                     "timeout": "10m", "warmup_script": "import os"}),
        ("policy-yaml", POLICY, {"yaml": "id: p\ntenants: [a]\nresources: {max_cpu_cores: 2}\n"}),
        ("policy-json", POLICY, {"id": "j", "network": {"egress": True, "allowed_cidrs": ["10.0.0.0/8"],
                                                        "allowed_egress_ports": [443]},
                                 "templates": [{"id": "t", "max_instances": 2, "class": "ember"}]}),
        ("evaluator", other(0), {"name": "grader-1", "public_key": "d75a980182b10ab7d54bfed3c964073a"
                                                                   "0ee172f3daa62325af021a68f707511a"}),
        ("tool-http", other(1), {"name": "search", "kind": "http", "url": "https://example.invalid/s",
                                 "method": "POST", "headers": {"Authorization": "Bearer x"}, "timeout_s": 30,
                                 "tenants": ["a"]}),
        ("tool-command", other(1), {"name": "calc", "kind": "command", "command": ["/usr/bin/bc", "-l"]}),
        ("node-report", other(2), {"id": "node-1", "instance": "i1", "address": "127.0.0.1:7000",
                                   "labels": {"zone": "a"}, "taints": [{"key": "gpu", "value": "true"}],
                                   "capacity": {"cpus": 4.0, "memory_mb": 8192, "sandboxes": 10},
                                   "usage": {"cpus": 0.0, "memory_mb": 0, "sandboxes": 0},
                                   "api_key": "k", "pools": {}, "quarantine": False}),
        ("node-sandbox", other(3), {"tenant": "a", "spec": {"command": ["/bin/true"], "service": True},
                                    "labels": {}, "template": None}),
    ]
    for path in sorted(glob.glob(os.path.join(ROOT, "conformance", "v1", "dataset*", "*.json"))):
        vector = json.load(open(path))
        if "query" in vector:
            bodies.append(("dataset-" + os.path.basename(path)[:-5], other(4), vector["query"]))
    for name, selector, body in bodies:
        write("api_body", name + ".json", bytes([selector]) + json.dumps(body).encode())


# --- shim_protocol ------------------------------------------------------------------------------------


def shim_seeds():
    b64 = lambda data: base64.b64encode(data).decode()
    lines = {
        "exec": {"v": 1, "op": "exec", "command": ["echo", "hi"], "env": [["K", "V"]], "workdir": "/tmp",
                 "stdin": b64(b"\0\xffin"), "timeout_ms": 5000, "stream": True},
        "status": {"v": 1, "op": "status"},
        "pause": {"v": 1, "op": "pause"},
        "resume": {"v": 1, "op": "resume"},
        "isolate": {"v": 1, "op": "isolate"},
        "throttle": {"v": 1, "op": "throttle", "cpus": 0.25},
        "kill": {"v": 1, "op": "kill"},
        "kill-grace": {"v": 1, "op": "kill", "grace_ms": 2000},
        "read-file": {"v": 1, "op": "read_file", "path": "/etc/hostname"},
        "write-file": {"v": 1, "op": "write_file", "path": "/tmp/x", "data": b64(b"hello")},
        "list-dir": {"v": 1, "op": "list_dir", "path": "/"},
        "reply-done": {"v": 1, "ok": {}},
        "reply-error": {"v": 1, "error": {"code": "paused", "message": "resume it first"}},
        "reply-status": {"v": 1, "ok": {"id": "sb-1", "state": "running", "blocked_packets": 3,
                                        "limit_hits": {"oom_kills": 0, "pids_limit_hits": 1}}},
        "reply-isolated": {"v": 1, "ok": {"network_cut": True}},
        "reply-throttled": {"v": 1, "ok": {"throttled": False}},
        "reply-exec": {"v": 1, "ok": {"exit_code": 0, "signal": None, "wall_ms": 12.5, "timed_out": False,
                                      "stdout": "hi\n", "stderr": "", "truncated": False}},
        "reply-file": {"v": 1, "ok": {"data": b64(b"content")}},
        "reply-listing": {"v": 1, "ok": {"entries": [{"name": "a", "kind": "file", "size": 3},
                                                     {"name": "d", "kind": "dir", "size": 0}]}},
        "stream-started": {"v": 1, "event": "started"},
        "stream-output": {"v": 1, "event": "output", "stream": "stderr", "data": "\u00e9"},
        "stream-exit": {"v": 1, "event": "exit", "exit_code": 137, "signal": 9, "wall_ms": 1.5,
                        "timed_out": True},
        "handshake-ready": {"v": 1, "ready": {"id": "sb-1"}},
        "handshake-failed": {"v": 1, "failed": {"kind": "command_not_found", "exit_code": 127,
                                                "message": "command not found: nope"}},
        "result": {"v": 1, "id": "sb-1", "exit_code": 0, "signal": None, "reason": "exited", "wall_ms": 10.0,
                   "cpu_ms": 2.0, "peak_memory_bytes": 1048576},
        "newer-version": {"v": 2, "op": "status"},
    }
    for name, line in lines.items():
        write("shim_protocol", name, json.dumps(line, separators=(",", ":")) + "\n")


# --- sandbox_spec -------------------------------------------------------------------------------------


def spec_seeds():
    specs = {
        "first-stored-form": {
            "command": ["/bin/sh", "-c", "echo hi"], "env": [["PATH", "/usr/bin:/bin"]], "workdir": "/work",
            "root": "HostSystem", "mounts": [{"source": "/srv/data", "target": "/data", "writable": False}],
            "network": "none", "limits": {"memory_bytes": 268435456, "cpus": 0.5, "pids": 64},
            "process_limits": {"open_files": 1024, "file_size_bytes": 4294967296},
            "timeout": {"secs": 30, "nanos": 0}, "tty": False, "scratch_bytes": 268435456,
            "hostname": "sandbox", "service": True},
        "future-form": {
            "command": ["/bin/true"], "mounts": [{"source": "/s", "target": "/d", "writable": True,
                                                  "recursive_read_only": True}],
            "network": {"egress": {"allowed_ports": [443], "dns": True, "burst_kbps": 64}},
            "limits": {"memory_bytes": 268435456, "cpus": 2.0, "pids": 64, "io_weight": 10},
            "user": {"uid": 1000, "gid": 1000, "supplementary_gids": [27]},
            "denied_syscalls": ["ptrace"], "syscall_profile": {"deny": ["io_uring_setup"]}},
        "layers": {"command": ["/bin/sh"], "root": {"Layers": ["/var/lib/l1", "/var/lib/l2"]},
                   "user": {"uid": 0, "gid": 0}, "writable_paths": ["/tmp", "/home/sandbox"]},
        "directory-root": {"service": True, "root": {"Directory": "/srv/rootfs"}, "network": "host-loopback",
                           "unlimited": {"memory": True, "cpu": True, "pids": True}},
        "egress-full": {"command": ["x"], "network": {"egress": {
            "allowed_cidrs": ["203.0.113.0/24"], "denied_cidrs": ["10.0.0.0/8"], "deny_private": True,
            "deny_metadata": True, "allowed_ports": [80, 443], "dns": True, "rate_limit_kbps": 1000}}},
        "bad-bounds": {"command": ["x"], "limits": {"cpus": 1e-320, "memory_bytes": 1, "pids": 0},
                       "timeout": {"secs": 18446744073709551615, "nanos": 999999999},
                       "scratch_bytes": 0, "hostname": "", "workdir": "rel/../x"},
    }
    for name, spec in specs.items():
        write("sandbox_spec", name + ".json", json.dumps(spec))
    write("sandbox_spec", "empty.json", "{}")


def main():
    clear_seeds()
    unpack_seeds()
    dagcbor_seeds()
    documents_seeds()
    api_seeds()
    shim_seeds()
    spec_seeds()
    for target in sorted(os.listdir(os.path.join(FUZZ, "corpus"))):
        files = glob.glob(os.path.join(FUZZ, "corpus", target, "seed-*"))
        size = sum(os.path.getsize(f) for f in files)
        print("%-14s %3d seeds, %7d bytes" % (target, len(files), size))


if __name__ == "__main__":
    main()
