"""Warm starts of the Python processes the tests launch (trainer ranks, evaluation ranks, test workers).

A process of the trainer spends about 6 s of CPU importing torch, DeepSpeed and transformers before it reads its
first flag, and the suite starts a few hundred of them on two cores. A warm starter is one server per pytest process
that has imported those modules once; each start is a fork of it that sets the process's environment, working
directory, argv and output file, then runs the script, module or code as ``python`` would (``__main__``), and ends
with its exit code.

It is used only where the fork is indistinguishable from a fresh interpreter for what the test checks:
- the environment must equal the server's except for the variables a launcher sets per process (``PER_PROCESS``)
  and those the server's imports set themselves (Intel OpenMP's KMP_*: the pytest process has them once it has
  imported the same modules, a fresh process sets them at import, and so does a fork, from the server's values):
  modules read some variables once, at import (HF_HOME, DS_ACCELERATOR, the thread counts);
- the server runs no thread but jemalloc's, which is fork-safe, when it forks (checked), and holds one-thread
  settings (OMP_NUM_THREADS=1, so no OpenMP pool exists to be lost in the child);
- output goes to a file (a fresh process's stdout is block-buffered there too).

What it does not reproduce, and which tests therefore start real interpreters: the start-up itself (launch.sh, the
deepspeed launcher, srun on the test cluster, the README's commands), thread pools a user's environment starts before
the entry point (the signal tests' ``one_thread=False`` ranks) and distinct hash seeds per process (the cluster tests
and the deepspeed-launcher runs cover both). ``DSUNLEARN_TEST_COLD_START=1`` turns warm starts off for a whole run.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Variables a launcher sets per process, read by the trainer at run time (never at import): they may differ from the
# server's environment.
PER_PROCESS = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST"}
)
# Set in the server before it imports anything, as every warm-started process has them.
SERVER_SETTINGS = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# What the server imports before it serves: everything the trainer, the evaluation and the test workers import at
# start, and what they import later, on first use: the model classes of the tests' tiny models, and DeepSpeed's Muon
# optimizer, which deepspeed.initialize imports to check the optimizer (it wraps a function in torch.compile at
# import: torch._dynamo and torch._inductor, 37% of a warm rank's time in a 6-step demo run before it was here).
PRELOAD = (
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "datasets",
    "dsunlearn.objective",
    "dsunlearn.settings.config",
    "dsunlearn.data.step_data",
    "dsunlearn.eval.eval_during",
    "dsunlearn.eval.evaluation",
    "dsunlearn.runtime.checkpoints",
    "dsunlearn.runtime.engines",
    "dsunlearn.runtime.export",
    "dsunlearn.runtime.reference_cache",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.opt.modeling_opt",
    "deepspeed.runtime.zero.muon.muon_optimizer",
)


class WarmProcess:
    """The part of ``subprocess.Popen`` the tests use, for a process forked by the server: ``pid``, ``returncode``,
    ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``. Its exit code comes from the server (the process is
    the server's child); a negative code is the signal that ended it, as with Popen."""

    def __init__(self, connection: socket.socket, pid: int, args, captured: Path | None = None):
        self._connection = connection
        self.pid = pid
        self.args = args
        self.returncode = None
        self._captured = captured  # the output file that stands in for stdout=PIPE (popen_python)

    def _read_code(self):
        line = self._connection.makefile("r").readline()
        self._connection.close()
        # No line: the server died before it could report; the process died with it (SIGKILL from the server).
        self.returncode = json.loads(line)["code"] if line else -signal.SIGKILL

    def poll(self):
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_code()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_code()
        return self.returncode

    def communicate(self, timeout=None):
        """Popen's ``communicate`` for a process started by ``popen_python``: waits, returns (output, None)."""
        self.wait(timeout)
        output = self._captured.read_text(errors="replace")
        self._captured.unlink()
        return output, None

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class WarmStarter:
    """The test side of one server: started on first use, started again if it has ended (a stray SIGKILL), stopped
    when the pytest process exits."""

    def __init__(self):
        self._server = None
        self._run_dir = None
        self._env = None
        self._import_env = {}  # what the server's imports added to its environment
        self._broken = os.environ.get("DSUNLEARN_TEST_COLD_START") == "1"
        atexit.register(self.stop)

    def _start_server(self):
        self._env = dict(os.environ, **SERVER_SETTINGS)
        self._run_dir = Path(tempfile.mkdtemp(prefix="dsunlearn-warm-"))
        with open(self._run_dir / "server.log", "w") as log:
            self._server = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(self._run_dir / "server.sock")], cwd=REPO,
                env=self._env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        ready = self._run_dir / "ready"
        deadline = time.monotonic() + 300
        while not ready.exists():
            if self._server.poll() is not None or time.monotonic() > deadline:
                output = (self._run_dir / "server.log").read_text()
                self.stop()
                raise RuntimeError(f"the warm-start server did not start: {output}")
            time.sleep(0.05)
        status = json.loads(ready.read_text())
        if "reason" in status:
            self.stop()
            raise RuntimeError(f"the warm-start server cannot fork safely: {status['reason']}")
        self._import_env = status["import_env"]

    def stop(self):
        if self._server is not None:
            if self._server.poll() is None:
                self._server.kill()
            self._server.wait()
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._server = None

    def accepts(self, env: dict) -> bool:
        """Whether a process with environment ``env`` may be a fork of the server (module docstring); starts the
        server if it has not started."""
        if self._broken:
            return False
        if self._server is None:
            self._start_server()
        names = (set(env) | set(self._env)) - PER_PROCESS
        return all(
            env.get(name) == self._env.get(name)
            or (name in self._import_env and env.get(name) in (None, self._import_env[name]))
            for name in names
        )

    def start(self, python_args: list[str], env: dict, cwd, log_path) -> WarmProcess:
        """``python PYTHON_ARGS`` (a script path, ``-m MODULE`` or ``-c CODE``, then its arguments) with ``env`` in
        ``cwd``, its stdout and stderr written to ``log_path``."""
        Path(log_path).write_text("")  # there when start returns, as a Popen's output file is
        request = {"python_args": [str(a) for a in python_args], "env": env, "cwd": str(cwd), "log": str(log_path)}
        for attempt in range(2):
            if self._server is not None and self._server.poll() is not None:
                # It ignores SIGTERM; only a SIGKILL from outside the test ends it early. Say so, start another.
                warnings.warn(f"the warm-start server ended with {self._server.returncode}; starting a new one")
                self.stop()
            if self._server is None:
                self._start_server()
            try:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.connect(str(self._run_dir / "server.sock"))
                connection.sendall((json.dumps(request) + "\n").encode())
                line = connection.makefile("r").readline()
            except OSError:
                line = ""
            if line:
                return WarmProcess(connection, json.loads(line)["pid"], [sys.executable, *python_args])
            connection.close()
            self._server.wait(timeout=10)  # it is ending: the next attempt starts another
        raise RuntimeError("the warm-start server ended twice while starting a process")


WARM = WarmStarter()


def start_python(python_args, env: dict, cwd=REPO, log_path=None, prefix=()):
    """``[*prefix, python, *python_args]`` with ``env`` in ``cwd``, its output (stdout and stderr) in ``log_path``: a
    fork of the warm server where that is indistinguishable (module docstring), else a fresh interpreter. Returns a
    Popen or a WarmProcess."""
    if not prefix and WARM.accepts(env):
        return WARM.start(list(python_args), env, cwd, log_path)
    with open(log_path, "w") as log:
        return subprocess.Popen([*prefix, sys.executable, *python_args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def popen_python(python_args, env: dict, cwd=REPO):
    """``Popen([python, *python_args], env=env, cwd=cwd, stdout=PIPE, stderr=STDOUT, text=True)`` for callers that
    read the output with ``communicate``: warm where ``start_python`` would be, the output then going through a
    temporary file."""
    if not WARM.accepts(env):
        return subprocess.Popen([sys.executable, *python_args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    descriptor, captured = tempfile.mkstemp(prefix="dsunlearn-warm-", suffix=".log")
    os.close(descriptor)
    process = WARM.start(list(python_args), env, cwd, captured)
    process._captured = Path(captured)
    return process


# The server: ``python tests/warm_start.py SOCKET_PATH``.


# Threads that may exist when the server forks: jemalloc's (pyarrow's allocator, started by ``import datasets``)
# background thread, which jemalloc's own fork handlers take care of.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def _threads_not_fork_safe() -> list[str]:
    """The names of this process's threads, other than the main one, that a fork would lose unsafely."""
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")
             if int(task) != os.getpid()]
    return [name for name in names if name not in FORK_SAFE_THREADS]


def _serve(socket_path: Path):
    import importlib

    # A signal meant for the tests' ranks (a SIGTERM from outside the machine's PID namespace now and then reaches
    # processes of the test runs, launching.OUTSIDE_STOP) must not end the server: the forks restore the defaults.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Python put this file's folder (tests/) first; a fork puts there what its own command line would.
    del sys.path[0]
    environment_before = dict(os.environ)
    for module in PRELOAD:
        importlib.import_module(module)
    # The imports' objects never change again: out of the garbage collector's sight, a fork's gc.collect() (the
    # reference cache calls it four times a run) neither walks them nor writes to their pages, which would copy them.
    gc.freeze()
    unsafe = _threads_not_fork_safe()
    if unsafe:
        _announce(socket_path, {"reason": f"threads {unsafe} run after the imports"})
        return
    import_env = {name: value for name, value in os.environ.items() if environment_before.get(name) != value}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(64)
    _announce(socket_path, {"import_env": import_env})
    parent = os.getppid()
    clients = {}  # pid -> connection of the test that started it
    while os.getppid() == parent:
        readable, _, _ = select.select([listener, *clients.values()], [], [], 0.1)
        for source in readable:
            if source is listener:
                connection, _ = listener.accept()
                try:
                    request = json.loads(connection.makefile("r").readline())
                except ValueError:  # the test side went away before it sent its request
                    connection.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for client in clients.values():
                        client.close()
                    connection.close()
                    _run_child(request, import_env)  # never returns
                clients[pid] = connection
                try:
                    connection.sendall((json.dumps({"pid": pid}) + "\n").encode())
                except OSError:  # the test side is gone: its next select sees the closed connection
                    pass
            else:
                # The test that started the process is gone (or broke the protocol): so is the process.
                pid = next(pid for pid, client in clients.items() if client is source)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while clients:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = clients.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall((json.dumps({"code": _exit_code(status)}) + "\n").encode())
                except OSError:
                    pass
                connection.close()
    for pid in clients:
        os.kill(pid, signal.SIGKILL)


def _announce(socket_path: Path, status: dict):
    """Write the ``ready`` file the test side waits for, whole (renamed into place)."""
    partial = socket_path.with_name("ready.partial")
    partial.write_text(json.dumps(status))
    partial.rename(socket_path.with_name("ready"))


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run_child(request: dict, import_env: dict):
    """In the fork: become ``python PYTHON_ARGS`` and exit as it would (with what its imports would have added to its
    environment, ``import_env``)."""
    import atexit as child_atexit
    import runpy
    import traceback

    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(import_env)
        os.environ.update(request["env"])
        args = request["python_args"]
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            child_atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
