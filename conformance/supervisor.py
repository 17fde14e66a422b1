"""Supervision of the port: the target runs in a worker process that the harness watches.

A port under test is hostile by default: native code may abort or segfault, hang with its signals
blocked, call exit, print megabytes, or eat the machine's memory. None of that may take the run
down or put the blame on an innocent stage. So the adapter (a Python port, or the file-exchange
reader) is built and called in a child process, and the harness holds a `SupervisedAdapter`: a
proxy with the adapter protocol's methods, each forwarded to the child as one message.

For every call the parent waits with the call's deadline and watches the child:
  the child answers       -> the value, or the port's exception re-raised here (NotCovered stays
                             NotCovered; any other becomes PortFailed with its type, text, location)
  the child dies          -> PortCrashed("port crashed: signal 6 (SIGABRT) in fn.window_partition")
  the deadline passes     -> the child is killed (SIGKILL: nothing it does with signals helps) and
                             PortCrashed("port timed out after 5 s in ...")
  its memory passes the   -> killed, PortCrashed("port exceeded the memory limit ...")
  limit
The next call starts a fresh child and replays the session (begin_case, prepare) first, so the run
goes on with the next stage. The child's stdout and stderr go to a pipe the parent drains into a
bounded tail, quoted in crash reports, so a port's printing never reaches the report.

pytest-xdist's crash handling is the model: the controller owns the workers, a worker's death is
reported on the test it was running, and a replacement is started.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from .adapters.base import NotCovered
from .threads import warm_threads

# protocol methods forwarded to the worker; prepare and begin_case are replayed after a restart
FORWARDED = (
    "describe",
    "prepare",
    "begin_case",
    "run_items",
    "build_inputs",
    "run",
    "run_stage",
    "generate",
    "generate_chunked",
)
TAIL_BYTES = 16 * 1024  # how much of the port's own output is kept for crash reports
START_TIMEOUT = 120.0  # a fresh worker imports torch and builds the adapter


class PortFailed(Exception):
    """The port raised an exception in the worker; the text names its type, message and location."""


class PortCrashed(Exception):
    """The worker died, hung past the deadline or passed the memory limit while running the port."""


class BadTarget(ValueError):
    """The target cannot be built at all (import error, unknown class, constructor refused its arguments)."""


def describe_exception(e: BaseException) -> str:
    """'port raised ValueError: text at file.py:12' (the innermost frame is the port's own code)."""
    if getattr(e, "said_in_full", False):  # the file exchange's reader: the file, the key and what is wrong
        return str(e)[:2000]
    tb = traceback.extract_tb(e.__traceback__)
    at = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"port raised {type(e).__name__}: {str(e)[:2000]}{at}"


def default_memory_limit() -> int | None:
    """80% of the machine's memory in bytes (Linux /proc/meminfo), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return None
    return int(kb * 1024 * 0.8)


# the processes of each worker's group, found again at most every GROUP_SCAN seconds (a scan of /proc costs ~1 ms)
GROUP_SCAN = 1.0
_groups: dict[int, tuple[float, list[int]]] = {}


def _group_members(pgid: int) -> list[int]:
    """The other processes of process group pgid (Linux /proc), rescanned at most every GROUP_SCAN seconds."""
    at, members = _groups.get(pgid, (-GROUP_SCAN, []))
    if time.monotonic() - at < GROUP_SCAN:
        return members
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    _groups[pgid] = (time.monotonic(), members)
    return members


def _rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and of the rest of its process group (Linux: the worker leads its own
    session, so the helper processes a port starts count against its limit too), None without /proc."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            total = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    for member in _group_members(pid):
        try:
            with open(f"/proc/{member}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE")


def _signal_name(code: int) -> str:
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


# ------------------------------------------------------------------------- in process
# For a debugger (--in-process) the port is called in the harness's own process: a timeout can only
# interrupt Python code, and a crash ends the run.


class StageTimeout(BaseException):
    """A port call ran past the per-stage timeout (BaseException so a port's `except Exception` cannot eat it)."""


def call_with_timeout(fn, timeout: float | None):
    """fn() with a wall-clock limit. In the main thread SIGALRM interrupts Python code; elsewhere the
    call runs in a daemon thread that is abandoned when it overruns."""
    if not timeout or timeout <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):

        def on_alarm(signum, frame):
            raise StageTimeout(f"timed out after {timeout:g} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller below
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise StageTimeout(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def describe_failure(e: BaseException) -> str:
    """What a port call that failed did, in one line (crash, hang and timeout texts already say where)."""
    if isinstance(e, (StageTimeout, PortCrashed, PortFailed)):
        return str(e)
    return describe_exception(e)


# ------------------------------------------------------------------------- the parent's side


class SupervisedAdapter:
    """The adapter protocol, each call run in a supervised worker process (see the module docstring).

    target, dtype, device: as for runner.make_adapter, evaluated in the worker. timeout: seconds per
    call (None: no limit). memory_limit: bytes of resident memory (None: no limit)."""

    def __init__(
        self,
        target: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        timeout: float | None = 120.0,
        memory_limit: int | None = None,
        threads: int | None = None,
    ):
        self.target, self.dtype_arg, self.device_arg = target, dtype, device
        self.timeout, self.memory_limit, self.threads = timeout, memory_limit, threads
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_lock = threading.Lock()
        self._session: dict[str, tuple] = {}  # method -> (args, kwargs) replayed on a fresh worker
        self._description: dict | None = None
        self._started = False
        self.restarts = 0  # workers started after the first, i.e. crashes and hangs survived

    # the adapter protocol's attributes the runner reads
    @property
    def device(self) -> str:
        return str(self.describe().get("device", "cpu"))

    def describe(self) -> dict:
        if self._description is None:
            got = self._call("describe", (), {}, what="describe")
            if not isinstance(got, dict):  # the report still needs a name, a dtype and a device
                got = {
                    "name": self.target,
                    "dtype": self.dtype_arg or "float32",
                    "device": self.device_arg or "cpu",
                    "error": f"describe() returned {type(got).__name__}, not a dict; the target's name stands in",
                }
            self._description = got
        return self._description

    def prepare(self, checkpoint, *, dtype, device):
        self._session.pop("prepare", None)
        out = self._call("prepare", (checkpoint,), {"dtype": dtype, "device": device}, what="prepare")
        self._session["prepare"] = ((checkpoint,), {"dtype": dtype, "device": device})
        return out

    def begin_case(self, case):
        case = dataclasses.replace(case, _cache={})  # the case's loaded tensors stay here
        self._session["begin_case"] = ((case,), {})
        return self._call("begin_case", (case,), {}, what=f"begin_case {case.name}")

    def run_items(self, stage, items, *, tokenizer_dir=None):
        return self._call("run_items", (stage, items), {"tokenizer_dir": tokenizer_dir}, what=stage)

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        kw = {"tokenizer_dir": tokenizer_dir, "options": options}
        return self._call("build_inputs", (conversations, images, videos), kw, what="build_inputs (preprocess.*)")

    def run(self, inputs, *, capture):
        return self._call("run", (inputs,), {"capture": capture}, what="run (the model stages)")

    def run_stage(self, stage, feeds):
        return self._call("run_stage", (stage, feeds), {}, what=f"run_stage {stage}")

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        kw = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id}
        return self._call("generate", (inputs,), kw, what="generate (generate.tokens)")

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        kw = {"prefill_chunk": prefill_chunk, "max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id}
        return self._call("generate_chunked", (inputs,), kw, what=f"generate_chunked {prefill_chunk} (state.chunked)")

    def close(self) -> None:
        self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass

    # ---- the worker's life

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        code = f"from qwen25vl.conformance.supervisor import worker_main; worker_main({child_sock.fileno()})"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[child_sock.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a port that signals its process group cannot reach the harness
        )
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        with self._tail_lock:
            self._tail.clear()
        threading.Thread(target=self._drain, args=(self._proc,), daemon=True).start()
        setup = {
            "sys_path": list(sys.path),
            "cwd": os.getcwd(),
            "target": self.target,
            "dtype": self.dtype_arg,
            "device": self.device_arg,
            "threads": self.threads,
        }
        _send(self._conn, setup)
        status, payload = self._wait(
            "starting the port", START_TIMEOUT if self.timeout is None else max(START_TIMEOUT, self.timeout)
        )
        if status == "bad_target":
            self._kill()
            raise BadTarget(payload)
        if status != "ok":
            self._kill()
            raise PortCrashed(f"{payload} (while building the adapter)")
        for method in ("begin_case", "prepare"):  # the session, as the crashed worker had it
            if method in self._session:
                args, kwargs = self._session[method]
                _send(self._conn, (method, args, kwargs))
                status, payload = self._wait(f"{method} (replayed on a fresh worker)", self.timeout)
                if status != "ok":
                    self._kill()
                    msg = payload if isinstance(payload, str) else str(payload)
                    raise PortCrashed(f"{msg} (replaying {method} on a fresh worker)")

    def _drain(self, proc: subprocess.Popen) -> None:
        """Keep the last TAIL_BYTES of the port's output; a port may print without end."""
        size = 0
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            with self._tail_lock:
                if proc is not self._proc:
                    continue
                self._tail.append(chunk)
                size += len(chunk)
                while size > TAIL_BYTES and len(self._tail) > 1:
                    size -= len(self._tail.popleft())

    def output_tail(self, n: int = 1200) -> str:
        with self._tail_lock:
            text = b"".join(self._tail)[-n:].decode("utf-8", "replace")
        return text.strip()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()

    def _wait(self, what: str, timeout: float | None) -> tuple[str, object]:
        """The worker's answer to the message just sent: ('ok', value), ('raised', ...), ...; a death,
        a hang or a memory blow-up becomes ('crashed', text) after the worker is killed."""
        proc, conn = self._proc, self._conn
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.05 if self.memory_limit else 0.5
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            try:
                ready = conn.poll(step)
            except (OSError, EOFError):
                ready = True
            if ready:
                try:
                    return _recv(conn)
                except (EOFError, OSError):  # the worker is gone
                    code = proc.wait()
                    return "crashed", self._death(code, what)
                except Exception as e:  # an answer that cannot be unpickled here
                    return "raised", f"the port's answer cannot be read back: {type(e).__name__}: {e}"
            if proc.poll() is not None:
                return "crashed", self._death(proc.returncode, what)
            if self.memory_limit:
                rss = _rss_bytes(proc.pid)
                if rss is not None and rss > self.memory_limit:
                    self._kill()
                    return "crashed", (
                        f"port exceeded the memory limit ({rss / 2**30:.2f} GiB resident > "
                        f"{self.memory_limit / 2**30:.2f} GiB) in {what}; the worker was killed"
                    )
            if deadline is not None and time.monotonic() >= deadline:
                self._kill()
                return "crashed", f"port timed out after {timeout:g} s in {what}; the worker was killed"

    def _death(self, code: int, what: str) -> str:
        time.sleep(0.05)  # let the drain thread take the last output
        how = _signal_name(code) if code < 0 else f"exit code {code}"
        tail = self.output_tail()
        self._kill()
        return f"port crashed: {how} in {what}" + (f"; its last output: {tail[-600:]}" if tail else "")

    def _call(self, method: str, args: tuple, kwargs: dict, *, what: str):
        if self._proc is None:
            self.restarts += self._started
            self._started = True
            self._start()
        try:
            _send(self._conn, (method, args, kwargs))
        except (OSError, ValueError) as e:  # the worker died between calls, or the value cannot be sent
            if self._proc is not None and self._proc.poll() is not None:
                raise PortCrashed(self._death(self._proc.returncode, what)) from None
            raise PortFailed(f"cannot send the call to the worker: {e}") from None
        status, payload = self._wait(what, self.timeout)
        if status == "ok":
            return payload
        if status == "not_covered":
            raise NotCovered(payload)
        if status == "raised":
            raise PortFailed(payload)
        raise PortCrashed(payload)


# ------------------------------------------------------------------------- the worker's side


def _send(conn: Connection, obj) -> None:
    # plain pickle, not multiprocessing's: torch registers shared-memory reductions there that need
    # a multiprocessing-managed peer; plain pickle copies tensors by value
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def worker_main(fd: int) -> None:
    """The worker: build the adapter, then answer calls until the parent closes the connection."""
    conn = Connection(fd)
    setup = _recv(conn)
    sys.path[:] = setup["sys_path"]
    os.chdir(setup["cwd"])
    try:
        if setup["threads"]:
            import torch

            torch.set_num_threads(setup["threads"])
        from .runner import make_adapter

        adapter = make_adapter(setup["target"], dtype=setup["dtype"], device=setup["device"])
    except ValueError as e:
        _send(conn, ("bad_target", str(e)))
        return
    except BaseException as e:
        _send(conn, ("raised", describe_exception(e)))
        return
    _send(conn, ("ok", None))
    while True:
        try:
            method, args, kwargs = _recv(conn)
        except (EOFError, OSError):
            return
        if method not in FORWARDED:
            _send(conn, ("raised", f"unknown adapter method {method!r}"))
            continue
        try:
            warm_threads()  # the port may have changed torch's thread count (threads.py says why)
            answer = ("ok", getattr(adapter, method)(*args, **kwargs))
        except NotCovered as e:
            answer = ("not_covered", str(e))
        except SystemExit as e:
            answer = ("raised", f"port called sys.exit({e.code!r})")
        except BaseException as e:
            answer = ("raised", describe_exception(e))
        try:
            _send(conn, answer)
        except Exception as e:  # a value pickle cannot carry (a generator, a lock, ...)
            kind = type(answer[1]).__name__
            _send(conn, ("raised", f"port returned a {kind} that cannot be sent back to the harness: {e}"))
