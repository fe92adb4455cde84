# Sourced by the benchmarks that drive a release server: `start_server WORK` starts
# `tartarus-control server` on a free loopback port over WORK/data (WORK made traversable for the
# sandbox user) and sets `server` (its pid) and `addr`; on exit the server is stopped, every sandbox it
# left is killed through its shim (shims outlive servers by design) and WORK is removed.
# Needs `bin`, the release binaries' directory.

start_server() {
    work="$1"
    chmod 711 "$work"
    trap stop_server EXIT
    mkdir -p "$work/data"
    "$bin/tartarus-control" server --listen 127.0.0.1:0 --data-dir "$work/data" \
        >"$work/server.out" 2>"$work/server.log" &
    server=$!
    until grep -q "listening on" "$work/server.out" 2>/dev/null; do sleep 0.05; done
    addr=$(awk '{print $3}' "$work/server.out")
}

stop_server() {
    kill "${server:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    for sock in "$work"/data/sandboxes/*/shim.sock; do
        [ -S "$sock" ] && python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"{\"v\":1,\"op\":\"kill\"}\n"); s.recv(100)' "$sock" 2>/dev/null || true
    done
    rm -rf "$work"
}
