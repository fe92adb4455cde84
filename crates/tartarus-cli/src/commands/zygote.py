# Tartarus Python zygote: runs a template's warm-up once, then forks a fresh interpreter for every
# `python3` started in the sandbox, so each starts with the warm-up's modules already imported.
#
# Started by `tartarus` (as /.tartarus/bin/python3 --tartarus-zygote-serve) with the image's real python.
# Protocol (SOCK_SEQPACKET at $TARTARUS_ZYGOTE_SOCKET): the client sends one JSON message
# {"argv": [...args after python3...], "env": {...}, "cwd": "..."} with its stdin, stdout and stderr
# attached (SCM_RIGHTS), or b"ping"; the zygote answers {"ready": true} to a ping and
# {"exit": N} or {"signal": N} when the program ends. If the client goes away first, the program is killed.
#
# Every program is forked from this pristine process, never from one that ran user code: the accept
# loop forks a handler per request and the handler forks the program, so nothing a program does reaches
# the next one's memory.
import os
import signal
import socket
import sys

SOCKET = os.environ.pop("TARTARUS_ZYGOTE_SOCKET")
WARMUP = os.environ.pop("TARTARUS_WARMUP", "")

if WARMUP:
    try:
        exec(compile(WARMUP, "<template warm-up>", "exec"), {"__name__": "__tartarus_warmup__"})
    except BaseException:
        # A broken warm-up must not take the sandbox down: programs then import what they need themselves.
        import traceback

        print("tartarus zygote: the template's warm-up failed; serving without it", file=sys.stderr)
        traceback.print_exc()

# Imported before forking, so programs do not pay for them.
import builtins  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import select  # noqa: E402
import traceback  # noqa: E402


def run_program(request, fds):
    """In the forked program: become `python3 ARGV...` and never return."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            if fd != target:
                os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request.get("cwd") or "/")
        os.environ.clear()
        os.environ.update(request.get("env", {}))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        argv = request["argv"]
        if argv[0] == "-c":
            sys.argv = ["-c"] + argv[2:]
            main = {"__name__": "__main__", "__builtins__": builtins, "__doc__": None, "__spec__": None}
            exec(compile(argv[1], "<string>", "exec"), main)
        elif argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


def handle(conn):
    """In the per-request handler: fork the program, report how it ended."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if message == b"ping":
        conn.send(b'{"ready": true}')
        return
    request = json.loads(message)
    program = os.fork()
    if program == 0:
        conn.close()
        run_program(request, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(program)
    ready, _, _ = select.select([pidfd, conn], [], [])
    if conn in ready and pidfd not in ready:
        # The client is gone (killed, timed out): so is its program.
        os.kill(program, signal.SIGKILL)
    _, status = os.waitpid(program, 0)
    if os.WIFSIGNALED(status):
        reply = {"signal": os.WTERMSIG(status)}
    else:
        reply = {"exit": os.WEXITSTATUS(status)}
    try:
        conn.send(json.dumps(reply).encode())
    except OSError:
        pass


def serve():
    os.makedirs(os.path.dirname(SOCKET), exist_ok=True)
    try:
        os.unlink(SOCKET)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(SOCKET + ".new")
    server.listen(128)
    # Handlers are reaped by the kernel; each handler waits for its own program.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Appearing under its final name means ready: the warm-up is done.
    os.rename(SOCKET + ".new", SOCKET)
    print("tartarus zygote ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                handle(conn)
            finally:
                os._exit(0)
        conn.close()


serve()
