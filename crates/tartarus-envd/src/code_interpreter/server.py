#!/usr/bin/python3
"""Tartarus code-interpreter server: the in-sandbox half of ``Sandbox.run_code``.

What it is
==========
A small HTTP/1.1 server that speaks the protocol the unmodified
``e2b-code-interpreter`` Python SDK (checked against 2.9.1) uses on port 49999.
It runs inside a Tartarus sandbox as the sandbox user and is started as::

    /usr/bin/python3 server.py --port 49999 [--host 127.0.0.1] [--cwd DIR]

The Tartarus server proxies the SDK's requests to it unchanged.  It needs only
the Python 3.11 standard library plus Debian 12's ``python3-ipykernel`` and
``python3-jupyter-client`` (``python3-matplotlib``, ``-numpy`` and ``-pandas``
are used by user code when present).  It must run with the interpreter that has
those packages (``/usr/bin/python3``); kernels are started with the same
interpreter (``sys.executable``).

Every *context* is one backend, state kept between calls:

* ``python``: one Jupyter ``ipykernel`` per context, driven with
  ``jupyter_client`` (KernelManager + BlockingKernelClient over ZeroMQ on
  loopback).  Started with the inline matplotlib backend (``MPLBACKEND``), so
  a figure gives a ``png`` result; IPython colours off, history in memory.
  A ``e2b/data`` formatter makes a pandas DataFrame's last-expression result
  carry ``data`` (column -> list of values), and dict/list results carry
  ``json``, as E2B's server does.
* ``bash``: there is no Debian bash kernel, so a bash context is ONE
  persistent ``bash --noprofile --norc`` process (its own session/process
  group, stdin/stdout/stderr pipes).  Each execution writes the code to a
  private file and runs ``source FILE </dev/null`` in that shell, so ``cd``,
  variables, functions and ``export`` persist between calls; the end of an
  execution is signalled by a random marker written to a dedicated pipe
  (fd 61), with the exit status.  A non-zero status is reported as an
  ``error`` (name ``NonZeroExitCode``, value the status).  If the code ends
  the shell (``exit``), the shell is restarted (state lost) and an error
  ``ShellExited`` says so.  Output is streamed line by line.
* ``javascript``/``typescript`` (``js``/``ts``), ``r``, ``java`` and anything
  else: NOT supported.  ``POST /execute`` or ``POST /contexts`` with such a
  language answers HTTP 400 with ``{"code": 400, "message": "language 'js' is
  not supported ..."}`` (the SDK raises ``SandboxException`` with that text).
  Consequently there is no default javascript context (E2B creates one).

Protocol (HTTP/1.1, JSON)
=========================
``GET /health``
    200 ``"OK"`` once the start of the default python context has finished
    (E2B's server also creates it before serving); 503 while it is starting.
    If that start failed (e.g. the server runs with an interpreter without
    ipykernel) health is still 200, bash works, and python executions answer
    500 with the reason.
``POST /execute`` ``{code, context_id?, language?, env_vars?}``
    200, ``Transfer-Encoding: chunked``, ``application/x-ndjson``: one JSON
    object per line, in order:

    * ``{"type":"number_of_executions","execution_count":N}`` (python: the
      kernel's counter; a SyntaxError cell counts, as in Jupyter; bash: a
      per-context counter),
    * ``{"type":"stdout"|"stderr","text":...,"timestamp":NS}`` - ``timestamp``
      is an integer, Unix epoch in nanoseconds, as the SDK's ``OutputMessage``
      documents (E2B's own server sends an ISO-8601 string here; the SDK does
      not parse it either way).  One line per Jupyter stream message (python)
      or per output line (bash); text longer than 64 KiB is split.
    * ``{"type":"result", "text"?, "html"?, "markdown"?, "svg"?, "png"?,
      "jpeg"?, "pdf"?, "latex"?, "json"?, "javascript"?, "data"?,
      "is_main_result": bool, "extra"?}`` from ``display()`` /
      display_data (``is_main_result`` false) and the last expression
      (true).  MIME types map as in E2B's server; unknown MIME types go to
      ``extra``; a ``text/plain`` wrapped in quotes is unquoted (E2B does
      this, so ``os.getenv('X')`` gives ``bar`` not ``'bar'``).  ``chart``
      (E2B's matplotlib chart extraction, ``e2b_charts``) is NOT produced.
      ``update_display_data`` and ``clear_output`` are ignored (as E2B).
    * ``{"type":"error","name","value","traceback"}`` (traceback: the
      kernel's traceback lines joined with newlines, no ANSI colours).
      Besides the code's own exceptions the server reports:
      ``ContextRestarting`` (restart/delete while running), ``KernelDied``,
      ``ShellExited``, ``NonZeroExitCode`` (bash), ``KeyboardInterrupt``
      (bash cell interrupted), ``ContextRemoved`` (queued when deleted),
      ``ContextUnavailable`` (backend cannot start), ``InternalError``.  A
      backend found dead *between* executions is restarted and only a
      ``[tartarus] ... restarted`` stderr line says so,
    * ``{"type":"keepalive"}`` every 2 s while nothing else is sent (E2B
      sends these too; the SDK ignores unknown types) - it makes a vanished
      client visible,
    * ``{"type":"end_of_execution"}`` last.

    No ``context_id`` and no ``language`` (or ``python``): the default python
    context, created when the server starts.  ``language`` alone: that
    language's default context, created on first use.  Both: 400.  Unknown
    ``context_id``: 404.  ``env_vars`` ``{NAME: value}`` are set for that
    execution only and restored afterwards (to the previous value, or unset),
    as E2B does; the server's own environment (the sandbox's env vars) is
    inherited by every context.
``POST /contexts`` ``{language?, cwd?}``
    200 ``{"id","language","cwd"}``.  ``cwd`` defaults to ``--cwd`` (default
    ``$HOME``, else ``/home/user``).  If the directory cannot be used the
    context is still created (E2B does the same: its ``%cd`` just fails) but
    starts in the default directory; then ``cwd`` is the directory actually
    used and an extra field ``cwd_error`` says why (the SDK ignores extra
    fields).
``GET /contexts``
    200 list of contexts, oldest first (the default python context first).
``DELETE /contexts/{id}``
    200 ``null``; kills the kernel/shell; 404 if unknown.
``POST /contexts/{id}/restart``
    200 ``null``; a fresh kernel/shell with the same id, language and cwd;
    state and execution count are lost.  An execution running in it ends
    with error ``ContextRestarting``.

Errors are ``{"code": HTTP status, "message": text}``: 400 bad JSON / bad
fields / unsupported language, 404 unknown path or context, 405, 413 body
over 8 MiB (request bodies may use Content-Length or chunked encoding), 429
context limit, 503 server starting / too many queued executions or
connections, 500 kernel start failure.

Interrupts and disconnects
==========================
While an execution streams, the handler polls the client socket (EOF) every
0.25 s and writes a keepalive every 2 s.  When the client has gone (the SDK's
``timeout`` expired, or the caller went away) the execution is abandoned and
the kernel is interrupted (SIGINT to the kernel's process group via
``jupyter_client``; for bash SIGINT to the shell's process group - the shell
traps it and abandons the cell, keeping its state).  If the code is still
running 10 s later, the context is restarted (state lost) so the next
execution is not blocked.  Executions in one context run one at a time, in
order; a kernel that dies mid-execution gives error ``KernelDied`` and is
restarted.

Limits
======
At most 16 contexts (including the default one; beyond: 429); at most 8
executions queued per context (503); at most 64 concurrent connections (503);
request bodies at most 8 MiB (413); stdout/stderr events at most 64 KiB of
text each (longer output is split, not dropped); a result line over 16 MiB is
replaced by a text-only result saying it was too large; event queues between
kernel and client hold at most 64 events (the kernel side waits: back
pressure, no unbounded buffering).  Bad JSON never crashes the server.

Unsupported / different from E2B
================================
No javascript/typescript/r/java kernels; no ``chart`` extraction; no PIL
``Image.save`` auto-display; ``stdin`` input is not supported (``input()``
raises, bash code reads /dev/null); ``timestamp`` is integer nanoseconds;
tracebacks are newline-joined; a bash context is a plain shell, not a Jupyter
kernel (no rich results; ``number_of_executions`` counts its cells).  There is
no authentication: the server listens on loopback and trusts the Tartarus
proxy in front of it.  ``env_vars`` names must be shell identifiers
(``[A-Za-z_][A-Za-z0-9_]*``), values strings (numbers are stringified).

Known caveats
=============
* Disconnect detection reads EOF on the client socket: a client (or proxy)
  that half-closes its sending side right after the request would be taken
  for gone.  HTTP/1.1 clients, the SDK and ordinary proxies do not do that.
  When a proxy keeps its upstream connection open after its own client left,
  nothing can be noticed until the proxy closes it.
* bash: ``set -e`` in a cell applies to the shell, so a later failing
  command ends the shell (reported as ``ShellExited``, shell restarted);
  SIGINT only aborts the innermost ``source``/function level; output after
  the code closes fd 61 is lost (context restarted); a process that ignores
  SIGINT is killed with the shell after the grace period.
* If the server itself is SIGKILLed, ipykernel's parent poller ends the
  kernels; a bash shell ends at EOF on its stdin once its current command
  ends.  SIGTERM/SIGINT shut every context down cleanly.

Tests
=====
``crates/tartarus-envd/code_interpreter_tests/`` (pytest).  They start this
server on a free loopback port with ``HOME`` set to a temporary directory and
test it over real HTTP; the streamed lines are also parsed with the SDK's
``e2b_code_interpreter.models.parse_output``, and ``test_sdk.py`` drives the
SDK's own ``Sandbox`` object (constructed directly, ``sandbox_url`` pointing
at the server) through the peer acceptance tests::

    /opt/e2b/venv/bin/python -m pytest crates/tartarus-envd/code_interpreter_tests -v

(``/usr/bin/python3 -m pytest ...`` runs the raw-HTTP tests only; set
``CI_SERVER_URL`` / ``CI_SERVER_HOME`` to test an already running server.)
"""

import argparse
import codecs
import collections
import datetime
import json
import logging
import os
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("code-interpreter")

MAX_CONTEXTS = 16
MAX_QUEUED_PER_CONTEXT = 8
MAX_CONNECTIONS = 64
MAX_BODY = 8 * 1024 * 1024
MAX_TEXT = 64 * 1024
MAX_RESULT_LINE = 16 * 1024 * 1024
EVENT_QUEUE = 64
KEEPALIVE_INTERVAL = 2.0
DISCONNECT_POLL = 0.25
INTERRUPT_GRACE = 10.0
START_TIMEOUT = 60.0
CONTROL_TIMEOUT = 90.0
MARKER_FD = 61

SUPPORTED_LANGUAGES = ("python", "bash")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def normalize_language(language):
    """E2B's normalisation (js -> javascript, ts -> typescript), then refuse
    what this server cannot run."""
    if language is None or (isinstance(language, str) and not language.strip()):
        return "python"
    if not isinstance(language, str):
        raise ApiError(400, "'language' must be a string")
    lang = language.strip().lower()
    lang = {"js": "javascript", "ts": "typescript"}.get(lang, lang)
    if lang not in SUPPORTED_LANGUAGES:
        raise ApiError(
            400,
            "language '%s' is not supported by this code interpreter "
            "(supported: %s)" % (language, ", ".join(SUPPORTED_LANGUAGES)),
        )
    return lang


def wait_readable(fds, timeout):
    """The fds of ``fds`` that are readable (or at EOF/error) within
    ``timeout`` seconds; poll(), so any fd number works."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


def now_ns():
    return time.time_ns()


def to_ns(date):
    if isinstance(date, datetime.datetime):
        if date.tzinfo is None:
            date = date.replace(tzinfo=datetime.timezone.utc)
        return round(date.timestamp() * 1_000_000) * 1000
    if isinstance(date, str):
        try:
            return to_ns(datetime.datetime.fromisoformat(date.replace("Z", "+00:00")))
        except ValueError:
            pass
    return now_ns()


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, default=str)


def text_events(kind, text, timestamp):
    """stdout/stderr events, text split into pieces of at most MAX_TEXT."""
    out = []
    for i in range(0, max(len(text), 1), MAX_TEXT):
        piece = text[i:i + MAX_TEXT]
        if piece or not text:
            out.append(dumps({"type": kind, "text": piece, "timestamp": timestamp}))
    return out


def error_event(name, value, traceback=""):
    return dumps({"type": "error", "name": name, "value": value, "traceback": traceback})


MIME_FIELDS = (
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    ("e2b/data", "data"),
    ("e2b/chart", "chart"),
)


def result_event(bundle, is_main):
    """A Jupyter MIME bundle as the SDK's Result (same mapping as E2B)."""
    data = dict(bundle or {})
    out = {"type": "result"}
    text = data.pop("text/plain", None)
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if text is not None:
        out["text"] = text
    for mime, field in MIME_FIELDS:
        value = data.pop(mime, None)
        if value is not None:
            out[field] = value
    out["is_main_result"] = bool(is_main)
    if data:
        out["extra"] = data
    line = dumps(out)
    if len(line) > MAX_RESULT_LINE:
        line = dumps({
            "type": "result",
            "text": "[result omitted: %d bytes is over the %d byte limit]" % (len(line), MAX_RESULT_LINE),
            "is_main_result": bool(is_main),
        })
    return line


class ExecJob:
    """One /execute request. The worker thread emits JSON lines into a
    bounded queue; the HTTP handler thread drains it to the client."""

    END = None

    def __init__(self, code, env_vars):
        self.code = code
        self.env_vars = env_vars or {}
        self.events = queue.Queue(maxsize=EVENT_QUEUE)
        self.abandoned = threading.Event()
        self.abandoned_at = None
        self.started = False

    def emit(self, line):
        while not self.abandoned.is_set():
            try:
                self.events.put(line, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self):
        self.emit(self.END)

    def abandon(self):
        if not self.abandoned.is_set():
            self.abandoned_at = time.monotonic()
            self.abandoned.set()


class ControlRequest:
    def __init__(self, kind):
        self.kind = kind
        self.done = threading.Event()
        self.error = None


# --------------------------------------------------------------------------
# python: ipykernel through jupyter_client
# --------------------------------------------------------------------------

# Run once (silently) in every new python kernel.  Adds the "e2b/data"
# formatter for pandas DataFrames and a JSON formatter for plain dict/list
# results, keeping the user's namespace clean.
PYTHON_SETUP = r'''
def __tartarus_setup():
    import json, sys
    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    class DataFrameData(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)

        def __call__(self, obj):
            pd = sys.modules.get("pandas")
            if pd is not None and isinstance(obj, pd.DataFrame):
                try:
                    columns = obj.to_dict(orient="list")
                    return {
                        str(name): [v.isoformat() if isinstance(v, pd.Timestamp) else v for v in values]
                        for name, values in columns.items()
                    }
                except Exception:
                    return None
            return super().__call__(obj)

    def plain(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError("not JSON serialisable")

    class PlainJSON(JSONFormatter):
        def __call__(self, obj):
            if isinstance(obj, (list, dict)):
                try:
                    return json.loads(json.dumps(obj, default=plain, allow_nan=False))
                except (TypeError, ValueError, RecursionError):
                    pass
            return super().__call__(obj)

    ip = get_ipython()
    df = ip.display_formatter
    df.formatters["e2b/data"] = DataFrameData(parent=df)
    df.formatters["application/json"] = PlainJSON(parent=df)
    if df.active_types and "e2b/data" not in df.active_types:
        df.active_types = list(df.active_types) + ["e2b/data"]

__tartarus_setup()
del __tartarus_setup
'''

PY_ENV_SET = (
    "(lambda os, sys, new: (setattr(sys, '_tartarus_saved_env', "
    "{k: os.environ.get(k) for k in new}), os.environ.update(new)))"
    "(__import__('os'), __import__('sys'), %r)"
)
PY_ENV_RESTORE = (
    "(lambda os, sys: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) "
    "for k, v in sys.__dict__.pop('_tartarus_saved_env', {}).items()])"
    "(__import__('os'), __import__('sys'))"
)


class PythonBackend:
    language = "python"

    def __init__(self, ctx):
        self.ctx = ctx
        self.km = None
        self.kc = None

    def start(self):
        try:
            import ipykernel  # noqa: F401  (the kernel runs with this interpreter)
            from jupyter_client import KernelManager
            from jupyter_client.kernelspec import KernelSpec
        except ImportError as e:
            raise RuntimeError("%s cannot import jupyter_client/ipykernel (%s); run the server with "
                               "the interpreter that has python3-ipykernel (/usr/bin/python3)"
                               % (sys.executable, e))

        conn = os.path.join(self.ctx.runtime_dir, "kernel-%s.json" % uuid.uuid4().hex)
        km = KernelManager(connection_file=conn)
        km._kernel_spec = KernelSpec(
            argv=[
                sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                "--InteractiveShell.colors=NoColor",
                "--HistoryManager.hist_file=:memory:",
            ],
            display_name="Python 3 (tartarus)",
            language="python",
            interrupt_mode="signal",
            env={},
        )
        env = dict(os.environ)
        env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        env.pop("JPY_PARENT_PID", None)
        km.start_kernel(cwd=self.ctx.cwd, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=START_TIMEOUT)
        except Exception:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        self.km, self.kc = km, kc
        reply = self._silent(PYTHON_SETUP)
        if reply is None or reply["content"].get("status") != "ok":
            log.warning("context %s: python setup failed: %s", self.ctx.id,
                        reply and reply["content"].get("evalue"))

    def stop(self):
        kc, km = self.kc, self.km
        self.kc = self.km = None
        if kc is not None:
            try:
                kc.stop_channels()
            except Exception:
                log.exception("stop_channels")
        if km is not None:
            try:
                km.shutdown_kernel(now=True)
            except Exception:
                log.exception("shutdown_kernel")
            try:
                km.cleanup_resources()
            except Exception:
                pass

    def alive(self):
        try:
            return self.km is not None and self.km.is_alive()
        except Exception:
            return False

    def interrupt(self):
        try:
            if self.km is not None:
                self.km.interrupt_kernel()
        except Exception:
            log.exception("interrupt")

    def _drain(self):
        for get in (self.kc.get_iopub_msg, self.kc.get_shell_msg):
            while True:
                try:
                    get(timeout=0)
                except queue.Empty:
                    break

    def _silent(self, code, timeout=30.0):
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_shell_msg(timeout=0.5)
            except queue.Empty:
                if not self.alive():
                    return None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        return None

    def execute(self, job):
        """Runs job.code; returns normally when done (the worker then sends
        end_of_execution)."""
        kc = self.kc
        self._drain()
        env_vars = job.env_vars
        if env_vars:
            self._silent(PY_ENV_SET % (env_vars,))
        msg_id = kc.execute(job.code, silent=False, store_history=True,
                            allow_stdin=False, stop_on_error=True)
        errored = False
        reply = None
        reply_at = None
        interrupted = False
        last_alive_check = time.monotonic()
        while True:
            if self.ctx.control_pending():
                job.emit(error_event("ContextRestarting", "Context was restarted or removed"))
                return
            if job.abandoned.is_set():
                if not interrupted:
                    log.info("context %s: client went away, interrupting the kernel", self.ctx.id)
                    self.interrupt()
                    interrupted = True
                elif time.monotonic() - job.abandoned_at > INTERRUPT_GRACE:
                    log.warning("context %s: kernel ignored the interrupt, restarting it", self.ctx.id)
                    self.ctx.restart_backend()
                    return
            try:
                msg = kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                mtype = msg["msg_type"]
                content = msg["content"]
                if mtype == "stream":
                    name = content.get("name")
                    if name in ("stdout", "stderr"):
                        for line in text_events(name, content.get("text", ""), to_ns(msg["header"].get("date"))):
                            job.emit(line)
                elif mtype == "display_data":
                    job.emit(result_event(content.get("data"), False))
                elif mtype == "execute_result":
                    job.emit(result_event(content.get("data"), True))
                elif mtype == "error":
                    if not errored:
                        errored = True
                        job.emit(error_event(content.get("ename", ""), content.get("evalue", ""),
                                             "\n".join(content.get("traceback") or [])))
                elif mtype == "execute_input":
                    job.emit(dumps({"type": "number_of_executions",
                                    "execution_count": content.get("execution_count")}))
                elif mtype == "status" and content.get("execution_state") == "idle":
                    break
                continue
            if reply is None:
                try:
                    smsg = kc.get_shell_msg(timeout=0)
                    if smsg["parent_header"].get("msg_id") == msg_id:
                        reply, reply_at = smsg, time.monotonic()
                except queue.Empty:
                    pass
            elif msg is None and time.monotonic() - reply_at > 2.0:
                # The reply came but the idle status never did (iopub drops
                # messages past its high-water mark): do not wait forever.
                break
            if time.monotonic() - last_alive_check > 1.0:
                last_alive_check = time.monotonic()
                if not self.alive():
                    job.emit(error_event("KernelDied",
                                         "The kernel died; the context was restarted and its state is lost"))
                    self.ctx.restart_backend()
                    return
        if reply is None:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    smsg = kc.get_shell_msg(timeout=0.2)
                except queue.Empty:
                    continue
                if smsg["parent_header"].get("msg_id") == msg_id:
                    reply = smsg
                    break
        if reply is not None:
            content = reply["content"]
            status = content.get("status")
            if status == "error" and not errored:
                job.emit(error_event(content.get("ename", ""), content.get("evalue", ""),
                                     "\n".join(content.get("traceback") or [])))
            elif status == "aborted" or status == "abort":
                job.emit(error_event("ExecutionAborted", "Execution was aborted"))
        if env_vars:
            self._silent(PY_ENV_RESTORE)


# --------------------------------------------------------------------------
# bash: one persistent shell per context
# --------------------------------------------------------------------------

class StreamReader:
    """Decodes one pipe and cuts it into line events."""

    def __init__(self, kind):
        self.kind = kind
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""
        self.since = None
        self.eof = False

    def feed(self, data):
        if data:
            self.buf += self.decoder.decode(data)
        else:
            self.buf += self.decoder.decode(b"", final=True)
            self.eof = True
        if self.buf and self.since is None:
            self.since = time.monotonic()

    def lines(self, flush=False):
        out = []
        while True:
            i = self.buf.find("\n")
            if i < 0 or i >= MAX_TEXT:
                break
            out.append(self.buf[:i + 1])
            self.buf = self.buf[i + 1:]
        while len(self.buf) >= MAX_TEXT:
            out.append(self.buf[:MAX_TEXT])
            self.buf = self.buf[MAX_TEXT:]
        if self.buf and (flush or (self.since is not None and time.monotonic() - self.since > 0.2)):
            out.append(self.buf)
            self.buf = ""
        self.since = time.monotonic() if self.buf else None
        ts = now_ns()
        return [dumps({"type": self.kind, "text": t, "timestamp": ts}) for t in out]


class BashBackend:
    language = "bash"

    def __init__(self, ctx):
        self.ctx = ctx
        self.proc = None
        self.marker_r = None
        self.count = 0

    def start(self):
        bash = shutil.which("bash") or "/bin/bash"
        r, w = os.pipe()
        try:
            env = dict(os.environ)
            env.setdefault("TERM", "dumb")
            self.proc = subprocess.Popen(
                [bash, "--noprofile", "--norc"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.ctx.cwd, env=env, start_new_session=True, pass_fds=(w,),
            )
        finally:
            os.close(w)
        self.marker_r = r
        for fd in (self.proc.stdout.fileno(), self.proc.stderr.fileno(), r):
            os.set_blocking(fd, False)
        self.count = 0
        # The marker pipe moves to a high fd user code is unlikely to touch.
        # A SIGINT aborts the cell being sourced; the shell itself survives.
        if w != MARKER_FD:
            self._send("exec %d>&%d %d>&-\n" % (MARKER_FD, w, w))
        self._send("trap 'return 130 2>/dev/null' INT\n")
        marker = "__tartarus_ready_%s__" % uuid.uuid4().hex
        self._send("printf '%%s:0\\n' %s >&%d\n" % (marker, MARKER_FD))
        deadline = time.monotonic() + START_TIMEOUT
        buf = ""
        while time.monotonic() < deadline:
            if wait_readable([r], 0.5):
                data = os.read(r, 4096)
                if not data:
                    break
                buf += data.decode("utf-8", "replace")
                if marker in buf:
                    return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("bash did not start")

    def _send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except Exception:
                pass
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except Exception:
                    pass
        if self.marker_r is not None:
            try:
                os.close(self.marker_r)
            except OSError:
                pass
            self.marker_r = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def interrupt(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except OSError:
                pass

    def _discard_stale(self):
        for fd in (self.proc.stdout.fileno(), self.proc.stderr.fileno(), self.marker_r):
            try:
                while os.read(fd, 65536):
                    pass
            except (BlockingIOError, OSError):
                pass

    def execute(self, job):
        self._discard_stale()
        self.count += 1
        job.emit(dumps({"type": "number_of_executions", "execution_count": self.count}))
        cell = os.path.join(self.ctx.runtime_dir, "cell-%s.sh" % uuid.uuid4().hex)
        with open(cell, "w", encoding="utf-8") as f:
            f.write(job.code)
            if not job.code.endswith("\n"):
                f.write("\n")
        marker = "__tartarus_end_%s__" % uuid.uuid4().hex
        pre, post = [], []
        for name, value in job.env_vars.items():
            pre.append('if [ "${%s+set}" = set ]; then __t_had_%s=1; __t_old_%s=$%s; else __t_had_%s=0; fi; export %s=%s'
                       % (name, name, name, name, name, name, shlex.quote(value)))
            post.append('if [ "$__t_had_%s" = 1 ]; then export %s="$__t_old_%s"; else unset %s; fi; unset __t_had_%s __t_old_%s'
                        % (name, name, name, name, name, name))
        script = "\n".join(pre + [
            "source %s </dev/null" % shlex.quote(cell),
            "__t_rc=$?",
        ] + post + [
            "printf '%%s:%%s\\n' %s \"$__t_rc\" >&%d" % (marker, MARKER_FD),
            "unset __t_rc",
        ]) + "\n"
        try:
            self._send(script)
            self._collect(job, marker)
        except (BrokenPipeError, OSError) as e:
            if self.proc is not None and self.alive():
                raise
            log.info("context %s: bash gone (%s)", self.ctx.id, e)
            self._shell_exited(job)
        finally:
            try:
                os.unlink(cell)
            except OSError:
                pass

    def _shell_exited(self, job):
        rc = self.proc.poll() if self.proc is not None else None
        job.emit(error_event("ShellExited",
                             "bash exited (status %s); the context was restarted and its "
                             "state (variables, cwd) is lost" % rc))
        self.ctx.restart_backend()

    def _collect(self, job, marker):
        out, err = StreamReader("stdout"), StreamReader("stderr")
        fds = {self.proc.stdout.fileno(): out, self.proc.stderr.fileno(): err}
        mbuf = ""
        rc = None
        interrupted = False
        while rc is None:
            if self.ctx.control_pending():
                job.emit(error_event("ContextRestarting", "Context was restarted or removed"))
                return
            if job.abandoned.is_set():
                if not interrupted:
                    self.interrupt()
                    interrupted = True
                elif time.monotonic() - job.abandoned_at > INTERRUPT_GRACE:
                    self.ctx.restart_backend()
                    return
            watch = [fd for fd, s in fds.items() if not s.eof] + [self.marker_r]
            for fd in wait_readable(watch, 0.1):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if fd == self.marker_r:
                    if not data:
                        # The code closed fd 61: the end of this execution
                        # can no longer be seen.  Start a fresh shell.
                        self._drain_into(job, fds)
                        job.emit(error_event("ShellExited",
                                             "the shell's control pipe (fd %d) was closed; the context was "
                                             "restarted and its state is lost" % MARKER_FD))
                        self.ctx.restart_backend()
                        return
                    mbuf += data.decode("utf-8", "replace")
                    m = re.search(re.escape(marker) + r":(\d+)\n", mbuf)
                    if m:
                        rc = int(m.group(1))
                else:
                    fds[fd].feed(data)
            for s in (out, err):
                for line in s.lines():
                    job.emit(line)
            if rc is None and not self.alive():
                self._drain_into(job, fds)
                self._shell_exited(job)
                return
        self._drain_into(job, fds)
        if rc != 0:
            if rc == 130 and interrupted:
                job.emit(error_event("KeyboardInterrupt", "Execution interrupted"))
            else:
                job.emit(error_event("NonZeroExitCode", str(rc), "exit status %d" % rc))

    def _drain_into(self, job, fds):
        for fd, s in fds.items():
            try:
                while not s.eof:
                    data = os.read(fd, 65536)
                    s.feed(data)
                    if not data:
                        break
            except (BlockingIOError, OSError):
                pass
            for line in s.lines(flush=True):
                job.emit(line)


# --------------------------------------------------------------------------
# contexts
# --------------------------------------------------------------------------

class Context:
    def __init__(self, language, cwd, default_cwd, runtime_root):
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd_error = None
        if not (os.path.isdir(cwd) and os.access(cwd, os.X_OK)):
            reason = "does not exist" if not os.path.exists(cwd) else "is not an accessible directory"
            self.cwd_error = "cwd %r %s; the context runs in %r" % (cwd, reason, default_cwd)
            cwd = default_cwd
        self.cwd = cwd
        self.runtime_dir = tempfile.mkdtemp(prefix="ctx-", dir=runtime_root)
        self.backend = PythonBackend(self) if language == "python" else BashBackend(self)
        self.cond = threading.Condition()
        self.jobs = collections.deque()
        self.controls = collections.deque()
        self.ready = threading.Event()
        self.start_error = None
        self.running = False
        self.thread = threading.Thread(target=self._run, name="ctx-" + self.id[:8], daemon=True)

    def to_json(self):
        d = {"id": self.id, "language": self.language, "cwd": self.cwd}
        if self.cwd_error:
            d["cwd_error"] = self.cwd_error
        return d

    def start(self):
        self.thread.start()
        if not self.ready.wait(START_TIMEOUT + 10):
            self.start_error = self.start_error or RuntimeError("timed out starting the %s context" % self.language)
        if self.start_error is not None:
            self.control("shutdown", wait=False)
            raise self.start_error

    def control_pending(self):
        return bool(self.controls)

    def submit(self, job):
        with self.cond:
            if not self.running:
                raise ApiError(404, "Context %s not found" % self.id)
            if len(self.jobs) >= MAX_QUEUED_PER_CONTEXT:
                raise ApiError(503, "too many executions queued in context %s (max %d)"
                               % (self.id, MAX_QUEUED_PER_CONTEXT))
            self.jobs.append(job)
            self.cond.notify()

    def control(self, kind, wait=True):
        req = ControlRequest(kind)
        with self.cond:
            self.controls.append(req)
            self.cond.notify()
        if wait and not req.done.wait(CONTROL_TIMEOUT):
            raise ApiError(500, "timed out: %s of context %s" % (kind, self.id))
        if req.error is not None:
            raise ApiError(500, "%s of context %s failed: %s" % (kind, self.id, req.error))

    def restart_backend(self):
        """Worker thread only."""
        self.backend.stop()
        try:
            self.backend.start()
        except Exception as e:
            log.exception("context %s: restart failed", self.id)
            return e
        return None

    def _run(self):
        try:
            self.backend.start()
            self.running = True
        except Exception as e:
            log.exception("context %s: start failed", self.id)
            self.start_error = ApiError(500, "failed to start the %s context: %s" % (self.language, e))
        self.ready.set()
        while True:
            with self.cond:
                while not self.jobs and not self.controls:
                    self.cond.wait()
                ctl = self.controls.popleft() if self.controls else None
                job = None if ctl else self.jobs.popleft()
            if ctl is not None:
                if ctl.kind == "restart":
                    ctl.error = self.restart_backend()
                    ctl.done.set()
                    continue
                # shutdown
                with self.cond:
                    self.running = False
                    pending = list(self.jobs)
                    self.jobs.clear()
                self.backend.stop()
                for j in pending:
                    j.emit(error_event("ContextRemoved", "Context %s was removed" % self.id))
                    j.finish()
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
                ctl.done.set()
                for extra in list(self.controls):
                    extra.done.set()
                return
            if job.abandoned.is_set():
                continue
            job.started = True
            try:
                if not self.backend.alive():
                    err = self.restart_backend()
                    if err is not None:
                        job.emit(error_event("ContextUnavailable", "the %s backend could not be started: %s"
                                             % (self.language, err)))
                        continue
                    # A notice, not an error: the code itself still runs.
                    for line in text_events("stderr", "[tartarus] the %s %s had exited and was restarted; "
                                            "earlier state is lost\n"
                                            % (self.language, "kernel" if self.language == "python" else "shell"),
                                            now_ns()):
                        job.emit(line)
                self.backend.execute(job)
            except Exception as e:
                log.exception("context %s: execution failed", self.id)
                job.emit(error_event("InternalError", "%s: %s" % (type(e).__name__, e)))
            finally:
                job.finish()


class Registry:
    def __init__(self, default_cwd, runtime_root):
        self.default_cwd = default_cwd
        self.runtime_root = runtime_root
        self.lock = threading.Lock()
        self.contexts = collections.OrderedDict()
        self.reserved = 0
        self.defaults = {}
        self.default_locks = {lang: threading.Lock() for lang in SUPPORTED_LANGUAGES}

    def create(self, language, cwd=None):
        with self.lock:
            if len(self.contexts) + self.reserved >= MAX_CONTEXTS:
                raise ApiError(429, "too many contexts (max %d); remove one first" % MAX_CONTEXTS)
            self.reserved += 1
        try:
            ctx = Context(language, cwd or self.default_cwd, self.default_cwd, self.runtime_root)
            ctx.start()
            with self.lock:
                self.contexts[ctx.id] = ctx
            log.info("context %s (%s) created in %s", ctx.id, language, ctx.cwd)
            return ctx
        finally:
            with self.lock:
                self.reserved -= 1

    def get(self, context_id):
        with self.lock:
            ctx = self.contexts.get(context_id)
        if ctx is None:
            raise ApiError(404, "Context %s not found" % context_id)
        return ctx

    def default(self, language):
        with self.default_locks[language]:
            with self.lock:
                ctx = self.contexts.get(self.defaults.get(language))
            if ctx is None:
                ctx = self.create(language)
                self.defaults[language] = ctx.id
            return ctx

    def list(self):
        with self.lock:
            return [c.to_json() for c in self.contexts.values()]

    def remove(self, context_id):
        with self.lock:
            ctx = self.contexts.pop(context_id, None)
        if ctx is None:
            raise ApiError(404, "Context %s not found" % context_id)
        ctx.control("shutdown")

    def shutdown_all(self):
        with self.lock:
            ctxs = list(self.contexts.values())
            self.contexts.clear()
        for ctx in ctxs:
            try:
                ctx.control("shutdown")
            except Exception:
                pass


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tartarus-code-interpreter/1"
    timeout = 300  # idle keep-alive connections

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- helpers --
    def _send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status, message):
        log.info("%s %s -> %d %s", self.command, self.path, status, message)
        self._send_json(status, {"code": status, "message": message})

    def _read_chunked(self):
        parts, total = [], 0
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "bad chunked request body")
            if size < 0:
                self.close_connection = True
                raise ApiError(400, "bad chunked request body")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "request body over %d bytes" % MAX_BODY)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _read_json(self):
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if te and te != "identity":
            if te != "chunked":
                self.close_connection = True
                raise ApiError(400, "unsupported Transfer-Encoding %r" % te)
            raw = self._read_chunked()
        else:
            length = self.headers.get("Content-Length")
            try:
                length = int(length) if length is not None else 0
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "bad Content-Length")
            if length < 0:
                self.close_connection = True
                raise ApiError(400, "bad Content-Length")
            if length > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "request body over %d bytes" % MAX_BODY)
            raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid JSON body: %s" % e)
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    def _client_gone(self):
        try:
            poller = select.poll()  # not select(): fds may exceed FD_SETSIZE
            poller.register(self.connection, select.POLLIN | select.POLLPRI)
            if poller.poll(0):
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return True
                self._peek_ok = False  # pipelined bytes: rely on write errors
            return False
        except (OSError, ValueError):
            return True

    def _chunk(self, line):
        data = (line + "\n").encode("utf-8")
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    # -- dispatch --
    def _dispatch(self, method):
        path = urlsplit(self.path).path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        try:
            if parts == ["health"]:
                if method != "GET":
                    raise ApiError(405, "method not allowed")
                if not self.server.warm.is_set():
                    return self._send_json(503, {"code": 503, "message":
                                                 "starting: the default python context is not ready yet"})
                return self._send_json(200, "OK")
            if parts == ["execute"]:
                if method != "POST":
                    raise ApiError(405, "method not allowed")
                return self._execute(self._read_json())
            if parts == ["contexts"]:
                if method == "GET":
                    return self._send_json(200, self.server.registry.list())
                if method == "POST":
                    body = self._read_json()
                    language = normalize_language(body.get("language"))
                    cwd = body.get("cwd")
                    if cwd is not None and (not isinstance(cwd, str) or "\0" in cwd):
                        raise ApiError(400, "'cwd' must be a string")
                    if cwd is not None and not cwd.strip():
                        cwd = None
                    ctx = self.server.registry.create(language, cwd)
                    return self._send_json(200, ctx.to_json())
                raise ApiError(405, "method not allowed")
            if len(parts) == 2 and parts[0] == "contexts":
                if method != "DELETE":
                    raise ApiError(405, "method not allowed")
                self.server.registry.remove(parts[1])
                return self._send_json(200, None)
            if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
                if method != "POST":
                    raise ApiError(405, "method not allowed")
                self._read_json()
                self.server.registry.get(parts[1]).control("restart")
                return self._send_json(200, None)
            raise ApiError(404, "no such endpoint: %s %s" % (method, path))
        except ApiError as e:
            self._send_error(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            log.exception("internal error")
            try:
                self._send_error(500, "internal error: %s: %s" % (type(e).__name__, e))
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _execute(self, body):
        code = body.get("code")
        if not isinstance(code, str):
            raise ApiError(400, "'code' (string) is required")
        context_id = body.get("context_id")
        language = body.get("language")
        if context_id is not None and not isinstance(context_id, str):
            raise ApiError(400, "'context_id' must be a string")
        if context_id and language:
            raise ApiError(400, "Only one of context_id or language can be provided")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict):
            raise ApiError(400, "'env_vars' must be an object")
        clean_env = {}
        for k, v in env_vars.items():
            if not ENV_NAME.match(k):
                raise ApiError(400, "invalid environment variable name %r" % k)
            if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                raise ApiError(400, "environment variable %s must be a string" % k)
            v = str(v)
            if "\0" in v:
                raise ApiError(400, "environment variable %s contains a NUL byte" % k)
            clean_env[k] = v
        try:
            code.encode("utf-8")
            for k, v in clean_env.items():
                v.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request contains text that is not valid Unicode (a lone surrogate)")
        registry = self.server.registry
        if context_id:
            ctx = registry.get(context_id)
        else:
            ctx = registry.default(normalize_language(language))
        job = ExecJob(code, clean_env)
        ctx.submit(job)

        # HTTP/1.1: chunked.  An HTTP/1.0 client gets the raw lines and the
        # end of the body is the end of the connection.
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._peek_ok = True
        last_write = time.monotonic()
        try:
            while True:
                try:
                    line = job.events.get(timeout=DISCONNECT_POLL)
                except queue.Empty:
                    if self._peek_ok and self._client_gone():
                        raise ClientGone()
                    if time.monotonic() - last_write >= KEEPALIVE_INTERVAL:
                        self._chunk('{"type": "keepalive"}')
                        last_write = time.monotonic()
                    continue
                if line is ExecJob.END:
                    self._chunk('{"type": "end_of_execution"}')
                    if self._chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    return
                self._chunk(line)
                last_write = time.monotonic()
        except (ClientGone, OSError) as e:
            log.info("context %s: client disconnected during execution (%s)", ctx.id, type(e).__name__)
            job.abandon()
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, registry):
        super().__init__(addr, Handler)
        self.registry = registry
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.warm = threading.Event()  # set once the default context is up (or failed)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                body = b'{"code": 503, "message": "too many connections"}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main(argv=None):
    p = argparse.ArgumentParser(description="Tartarus code-interpreter server (E2B protocol)")
    p.add_argument("--port", type=int, default=49999)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--cwd", default=os.environ.get("HOME") or "/home/user",
                   help="default working directory of contexts (default: $HOME, else /home/user)")
    p.add_argument("--log-level", default=os.environ.get("CODE_INTERPRETER_LOG", "INFO"))
    p.add_argument("--no-default-context", action="store_true",
                   help="do not start the default python context at startup")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    runtime_root = tempfile.mkdtemp(prefix="tartarus-ci-")
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime_root
    registry = Registry(args.cwd, runtime_root)
    server = Server((args.host, args.port), registry)
    log.info("listening on %s:%d (default cwd %s)", args.host, server.server_address[1], args.cwd)

    def stop(signum, frame):
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.no_default_context:
        server.warm.set()
    else:
        def warm():
            try:
                registry.default("python")
            except Exception:
                log.exception("default python context failed to start")
            finally:
                server.warm.set()
        threading.Thread(target=warm, name="default-context", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        registry.shutdown_all()
        shutil.rmtree(runtime_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
