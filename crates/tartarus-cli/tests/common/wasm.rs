//! Wasm programs for the Wasm lane's tests, written as WAT and compiled with the `wat` crate: WASI
//! preview 1 commands over a small kit of helpers (write, print a C string or a number), and preview 2
//! components that only return from `wasi:cli/run`.

use std::path::{Path, PathBuf};

/// Imports, one page of memory and the helpers every preview 1 program here uses. Memory layout: 0..16
/// the iovec and the count of the last call; 16 a newline; 100..121 the digits of `$print_num`; 200..1024
/// a program's data; 1024.. argument and environment vectors; 4096.. read buffers.
const KIT: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $fd_prestat_dir_name (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "\n")
  ;; Writes len bytes at ptr to fd; returns WASI's errno.
  (func $write_errno (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (drop (call $write_errno (local.get $fd) (local.get $ptr) (local.get $len))))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))
  ;; A NUL-terminated string, then a newline.
  (func $print_cstr (param $fd i32) (param $p i32)
    (call $write (local.get $fd) (local.get $p) (call $strlen (local.get $p)))
    (call $write (local.get $fd) (i32.const 16) (i32.const 1)))
  ;; An unsigned number in decimal, then a newline.
  (func $print_num (param $fd i32) (param $n i32) (local $p i32)
    (local.set $p (i32.const 120))
    (i32.store8 (local.get $p) (i32.const 10))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (call $write (local.get $fd) (local.get $p) (i32.sub (i32.const 121) (local.get $p))))
  ;; Opens path (ptr, len) under directory fd with oflags (to read when 0, with every right otherwise); the
  ;; new fd, or -1 after printing the errno.
  (func $open (param $dir i32) (param $ptr i32) (param $len i32) (param $oflags i32) (result i32)
    (local $errno i32) (local $rights i64)
    (local.set $rights (select (i64.const 0x1fffffff) (i64.const 2) (local.get $oflags)))
    (local.set $errno (call $path_open (local.get $dir) (i32.const 0) (local.get $ptr) (local.get $len)
      (local.get $oflags) (local.get $rights) (local.get $rights) (i32.const 0) (i32.const 96)))
    (if (result i32) (local.get $errno)
      (then (call $print_num (i32.const 1) (local.get $errno)) (i32.const -1))
      (else (i32.load (i32.const 96)))))
"#;

/// A preview 1 command: the kit plus `body` (which exports `_start`).
pub fn p1(body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {KIT} {body})")).expect("valid WAT")
}

/// Writes `bytes` to `dir/name`; its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Prints `out` on stdout and exits with `code`.
pub fn exit_with(code: i32) -> Vec<u8> {
    p1(&format!(
        r#"(data (i32.const 200) "out\n")
        (func (export "_start") (call $write (i32.const 1) (i32.const 200) (i32.const 4))
          (call $proc_exit (i32.const {code})))"#
    ))
}

/// Returns from `_start` without `proc_exit`: exit code 0.
pub fn returns() -> Vec<u8> {
    p1(r#"(func (export "_start"))"#)
}

/// Copies stdin to stdout after `out:`, writes `err` on stderr, exits 3.
pub fn stdio() -> Vec<u8> {
    p1(r#"(data (i32.const 200) "out:") (data (i32.const 208) "err\n")
      (func (export "_start") (local $n i32)
        (call $write (i32.const 1) (i32.const 200) (i32.const 4))
        (block $eof (loop $more
          (i32.store (i32.const 0) (i32.const 4096))
          (i32.store (i32.const 4) (i32.const 4096))
          (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $n (i32.load (i32.const 8)))
          (br_if $eof (i32.eqz (local.get $n)))
          (call $write (i32.const 1) (i32.const 4096) (local.get $n))
          (br $more)))
        (call $write (i32.const 2) (i32.const 208) (i32.const 4))
        (call $proc_exit (i32.const 3)))"#)
}

/// Prints each argument on a line, `--`, then each environment variable.
pub fn args_and_env() -> Vec<u8> {
    p1(r#"(data (i32.const 200) "--")
      (func $print_vector (param $count i32) (param $vector i32) (local $i i32)
        (block $done (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
          (call $print_cstr (i32.const 1)
            (i32.load (i32.add (local.get $vector) (i32.shl (local.get $i) (i32.const 2)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next))))
      (func (export "_start")
        (drop (call $args_sizes_get (i32.const 300) (i32.const 304)))
        (drop (call $args_get (i32.const 1024) (i32.const 2048)))
        (call $print_vector (i32.load (i32.const 300)) (i32.const 1024))
        (call $print_cstr (i32.const 1) (i32.const 200))
        (drop (call $environ_sizes_get (i32.const 300) (i32.const 304)))
        (drop (call $environ_get (i32.const 16384) (i32.const 20480)))
        (call $print_vector (i32.load (i32.const 300)) (i32.const 16384)))"#)
}

/// Spins forever (the epoch check at the loop's head is the only way out).
pub fn spin() -> Vec<u8> {
    p1(r#"(func (export "_start") (loop $forever (br $forever)))"#)
}

/// Grows its memory by 1 MiB until refused, then reports it and traps (as a failed allocation does).
pub fn grow_until_refused_then_trap() -> Vec<u8> {
    p1(r#"(data (i32.const 200) "growth refused\n")
      (func (export "_start")
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        (call $write (i32.const 2) (i32.const 200) (i32.const 15))
        unreachable)"#)
}

/// Grows by `mib` MiB once, prints whether it worked (`grown` or `refused`), exits 0 either way.
pub fn grow_once(mib: u32) -> Vec<u8> {
    let pages = mib * 16;
    p1(&format!(
        r#"(data (i32.const 200) "grown\n") (data (i32.const 210) "refused\n")
        (func (export "_start")
          (if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1))
            (then (call $write (i32.const 1) (i32.const 210) (i32.const 8)))
            (else (call $write (i32.const 1) (i32.const 200) (i32.const 6)))))"#
    ))
}

/// Writes `hello` to `hello.txt` in the first preopen (fd 3), reads it back to stdout, then prints the
/// preopen's name.
pub fn scratch_round_trip() -> Vec<u8> {
    p1(
        r#"(data (i32.const 200) "hello.txt") (data (i32.const 220) "hello\n")
      (func (export "_start") (local $fd i32)
        (local.set $fd (call $open (i32.const 3) (i32.const 200) (i32.const 9) (i32.const 9)))
        (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 10))))
        (call $write (local.get $fd) (i32.const 220) (i32.const 6))
        (drop (call $fd_close (local.get $fd)))
        (local.set $fd (call $open (i32.const 3) (i32.const 200) (i32.const 9) (i32.const 0)))
        (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 11))))
        (i32.store (i32.const 0) (i32.const 4096))
        (i32.store (i32.const 4) (i32.const 100))
        (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 8)))
        (drop (call $fd_prestat_dir_name (i32.const 3) (i32.const 500) (i32.const 4)))
        (call $write (i32.const 1) (i32.const 500) (i32.const 4))
        (call $write (i32.const 1) (i32.const 16) (i32.const 1)))"#,
    )
}

/// Writes 64 KiB blocks to `fill` in the scratch area until a write fails; prints the errno and the
/// number of blocks written.
pub fn fill_scratch() -> Vec<u8> {
    p1(r#"(data (i32.const 200) "fill")
      (func (export "_start") (local $fd i32) (local $blocks i32) (local $errno i32)
        (local.set $fd (call $open (i32.const 3) (i32.const 200) (i32.const 4) (i32.const 9)))
        (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 10))))
        (block $full (loop $more
          (local.set $errno (call $write_errno (local.get $fd) (i32.const 0) (i32.const 65536)))
          (br_if $full (local.get $errno))
          (br_if $full (i32.lt_u (i32.load (i32.const 8)) (i32.const 65536)))
          (local.set $blocks (i32.add (local.get $blocks) (i32.const 1)))
          (br_if $full (i32.gt_u (local.get $blocks) (i32.const 16384)))
          (br $more)))
        (call $print_num (i32.const 1) (local.get $errno))
        (call $print_num (i32.const 1) (local.get $blocks)))"#)
}

/// Tries the host's `/etc/passwd` through the scratch preopen (`../../etc/passwd` and `/etc/passwd`) and
/// asks for a preopen at fd 4 and 5: prints each errno (0 would mean it worked).
pub fn reach_for_the_host() -> Vec<u8> {
    p1(
        r#"(data (i32.const 200) "../../etc/passwd") (data (i32.const 220) "/etc/passwd")
      (func (export "_start")
        (drop (call $open (i32.const 3) (i32.const 200) (i32.const 16) (i32.const 0)))
        (drop (call $open (i32.const 3) (i32.const 220) (i32.const 11) (i32.const 0)))
        (call $print_num (i32.const 1) (call $fd_prestat_dir_name (i32.const 4) (i32.const 500) (i32.const 8)))
        (call $print_num (i32.const 1) (call $fd_prestat_dir_name (i32.const 5) (i32.const 500) (i32.const 8))))"#,
    )
}

/// Reads `file` from the preopen at fd 4 (a read-only mount) to stdout, then tries to create `new` there
/// and prints that errno.
pub fn read_mount_then_write() -> Vec<u8> {
    p1(r#"(data (i32.const 200) "file") (data (i32.const 210) "new")
      (func (export "_start") (local $fd i32)
        (local.set $fd (call $open (i32.const 4) (i32.const 200) (i32.const 4) (i32.const 0)))
        (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 10))))
        (i32.store (i32.const 0) (i32.const 4096))
        (i32.store (i32.const 4) (i32.const 100))
        (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 8)))
        (drop (call $open (i32.const 4) (i32.const 210) (i32.const 3) (i32.const 9))))"#)
}

/// A preview 2 component whose `wasi:cli/run` returns ok (`fails` false) or err, or spins forever.
pub fn component(behaviour: &str) -> Vec<u8> {
    let body = match behaviour {
        "ok" => "i32.const 0",
        "err" => "i32.const 1",
        "spin" => "(loop $forever (br $forever)) i32.const 0",
        other => panic!("no component behaviour {other}"),
    };
    wat::parse_str(format!(
        r#"(component
          (core module $m (func (export "run") (result i32) {body}))
          (core instance $i (instantiate $m))
          (func $run (result (result)) (canon lift (core func $i "run")))
          (instance $run_instance (export "run" (func $run)))
          (export "wasi:cli/run@0.2.0" (instance $run_instance)))"#
    ))
    .expect("valid component WAT")
}

/// A preview 2 component that writes `hello from p2` to `wasi:cli/stdout` and returns ok.
pub fn component_hello() -> Vec<u8> {
    wat::parse_str(
        r#"(component
          (import "wasi:io/error@0.2.0" (instance $io_error (export "error" (type (sub resource)))))
          (alias export $io_error "error" (type $error))
          (import "wasi:io/streams@0.2.0" (instance $streams
            (alias outer 1 $error (type $error))
            (export "error" (type $error_export (eq $error)))
            (export "output-stream" (type $stream (sub resource)))
            (type $own_error (own $error_export))
            (type $stream_error (variant (case "last-operation-failed" $own_error) (case "closed")))
            (export "stream-error" (type $stream_error_export (eq $stream_error)))
            (type $borrow_stream (borrow $stream))
            (type $bytes (list u8))
            (type $write_result (result (error $stream_error_export)))
            (export "[method]output-stream.blocking-write-and-flush"
              (func (param "self" $borrow_stream) (param "contents" $bytes) (result $write_result)))))
          (alias export $streams "output-stream" (type $output_stream))
          (import "wasi:cli/stdout@0.2.0" (instance $stdout
            (alias outer 1 $output_stream (type $output_stream))
            (export "output-stream" (type $stream (eq $output_stream)))
            (type $own_stream (own $stream))
            (export "get-stdout" (func (result $own_stream)))))
          (core module $memory_module (memory (export "memory") 1))
          (core instance $memory_instance (instantiate $memory_module))
          (alias core export $memory_instance "memory" (core memory $memory))
          (alias export $stdout "get-stdout" (func $get_stdout))
          (alias export $streams "[method]output-stream.blocking-write-and-flush" (func $write))
          (core func $get_stdout_lowered (canon lower (func $get_stdout)))
          (core func $write_lowered (canon lower (func $write) (memory $memory)))
          (core instance $host
            (export "get-stdout" (func $get_stdout_lowered))
            (export "write" (func $write_lowered)))
          (core instance $env (export "memory" (memory $memory)))
          (core module $main
            (import "env" "memory" (memory 1))
            (import "host" "get-stdout" (func $get_stdout (result i32)))
            (import "host" "write" (func $write (param i32 i32 i32 i32)))
            (data (i32.const 16) "hello from p2\n")
            (func (export "run") (result i32)
              (call $write (call $get_stdout) (i32.const 16) (i32.const 14) (i32.const 64))
              (i32.load8_u (i32.const 64))))
          (core instance $main_instance (instantiate $main
            (with "env" (instance $env)) (with "host" (instance $host))))
          (func $run (result (result)) (canon lift (core func $main_instance "run")))
          (instance $run_instance (export "run" (func $run)))
          (export "wasi:cli/run@0.2.0" (instance $run_instance)))"#,
    )
    .expect("valid component WAT")
}

/// A preview 2 component that asks `wasi:sockets` for a TCP socket: `run` returns ok only when the
/// request is refused with `access-denied`.
pub fn component_tcp_socket_is_denied() -> Vec<u8> {
    wat::parse_str(
        r#"(component
          (import "wasi:sockets/network@0.2.0" (instance $network
            (type $code (enum "unknown" "access-denied" "not-supported" "invalid-argument" "out-of-memory"
              "timeout" "concurrency-conflict" "not-in-progress" "would-block" "invalid-state"
              "new-socket-limit" "address-not-bindable" "address-in-use" "remote-unreachable"
              "connection-refused" "connection-reset" "connection-aborted" "datagram-too-large"
              "name-unresolvable" "temporary-resolver-failure" "permanent-resolver-failure"))
            (export "error-code" (type (eq $code)))
            (type $family (enum "ipv4" "ipv6"))
            (export "ip-address-family" (type (eq $family)))))
          (alias export $network "error-code" (type $error_code))
          (alias export $network "ip-address-family" (type $ip_family))
          (import "wasi:sockets/tcp@0.2.0" (instance $tcp (export "tcp-socket" (type (sub resource)))))
          (alias export $tcp "tcp-socket" (type $tcp_socket))
          (import "wasi:sockets/tcp-create-socket@0.2.0" (instance $create
            (alias outer 1 $error_code (type $code))
            (export "error-code" (type $code_export (eq $code)))
            (alias outer 1 $ip_family (type $family))
            (export "ip-address-family" (type $family_export (eq $family)))
            (alias outer 1 $tcp_socket (type $socket))
            (export "tcp-socket" (type $socket_export (eq $socket)))
            (type $own_socket (own $socket_export))
            (type $created (result $own_socket (error $code_export)))
            (export "create-tcp-socket" (func (param "address-family" $family_export) (result $created)))))
          (core module $memory_module (memory (export "memory") 1))
          (core instance $memory_instance (instantiate $memory_module))
          (alias core export $memory_instance "memory" (core memory $memory))
          (alias export $create "create-tcp-socket" (func $create_socket))
          (core func $create_lowered (canon lower (func $create_socket) (memory $memory)))
          (core instance $host (export "create-tcp-socket" (func $create_lowered)))
          (core instance $env (export "memory" (memory $memory)))
          (core module $main
            (import "env" "memory" (memory 1))
            (import "host" "create-tcp-socket" (func $create (param i32 i32)))
            (func (export "run") (result i32)
              (call $create (i32.const 0) (i32.const 64))
              ;; ok (0) only for err (1) with access-denied (1)
              (i32.eqz (i32.and (i32.eq (i32.load8_u (i32.const 64)) (i32.const 1))
                                (i32.eq (i32.load8_u (i32.const 68)) (i32.const 1))))))
          (core instance $main_instance (instantiate $main
            (with "env" (instance $env)) (with "host" (instance $host))))
          (func $run (result (result)) (canon lift (core func $main_instance "run")))
          (instance $run_instance (export "run" (func $run)))
          (export "wasi:cli/run@0.2.0" (instance $run_instance)))"#,
    )
    .expect("valid component WAT")
}
