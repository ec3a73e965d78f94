"""The process group (NCCL on GPUs, gloo on CPU ranks, a world of one without a launcher) and the watchdog that ends
every rank within seconds when one of them fails, goes silent, or is asked to stop.

How a run ends, on every rank (README: "Exit codes"):

* a usage error found before anything is written (model folder, tokenizer, data, rank count, output folder): the
  ranks gather it (``Watchdog.agree_on_inputs``), rank 0 prints it once, every rank tears the process group down and
  exits ``EXIT_USAGE``;
* an exception on one rank: that rank prints the message once, posts it to the c10d store and exits; the other
  ranks' watchdogs read the post within a second and exit with the same code, each with one short line;
* a rank that stops answering (SIGSTOP, a frozen node): its neighbour sees no heartbeat for
  ``train.collective_timeout_s`` and ends the run, naming the rank, its host and pid;
* SIGTERM (SLURM pre-emption, ``scancel``), or the death of the ``deepspeed`` launcher above the rank (its runner does
  not forward SIGTERM): during training the current step is finished and saved, then every rank exits
  ``EXIT_PREEMPTED``; before training and after the final checkpoint (export, evaluation) the rank exits at once.

Every exit that is not clean goes through ``os._exit`` after flushing: interpreter shutdown and process-group teardown
can block forever while a peer is gone, and ``os._exit`` runs no C++ destructor that could abort ("terminate called
without an active exception"). The clean ends (``Watchdog.close``, also after an agreed usage error) tear the process
group down on every rank together.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch

# Exit codes of every dsunlearn process, the same on every rank and through launch.sh (README: "Exit codes").
EXIT_OK = 0  # finished (also when objective.stop_forget_ce ended the run early)
EXIT_FAILED = 1  # an error on some rank: its message names the rank and the cause
EXIT_USAGE = 2  # bad settings or input (data, model folder, rank count): one message, nothing started
EXIT_DIVERGED = 3  # non-finite or collapsed training: stopped, the last good checkpoint kept, nothing exported
EXIT_PREEMPTED = 75  # SIGTERM (SLURM pre-emption, scancel, time limit): the current step saved; resume with --resume

_KEY = "dsunlearn/"  # prefix of the watchdog's keys in the c10d store, apart from torch's own
_LAUNCHER_MARKS = ("deepspeed.launcher.launch", "deepspeed/launcher/launch.py", "deepspeed/launcher/runner.py")


class UsageError(Exception):
    """Bad input found after the settings were parsed (data files, rank count, model folder): exit ``EXIT_USAGE``."""

    def __init__(self, message: str, on_every_rank: bool = False):
        super().__init__(message)
        # Raised by every rank at once (Watchdog.agree_on_inputs): they end together and rank 0 says why.
        self.on_every_rank = on_every_rank


class RendezvousError(RuntimeError):
    """MASTER_ADDR:MASTER_PORT cannot be reached or served: exit ``EXIT_FAILED`` with the address, no traceback."""


class Preempted(Exception):
    """The run stopped on request (SIGTERM, the launcher gone) after saving a checkpoint: exit ``EXIT_PREEMPTED``."""


class RunDiverged(Exception):
    """Training went wrong (non-finite values, collapse): stop with the last good checkpoint, exit ``EXIT_DIVERGED``.

    Raised identically on every rank: the guards read values that were all-reduced."""


def init_distributed(timeout_s: float = 600) -> tuple[int, int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPU ranks) and return (rank, world_size, local_rank).

    ``timeout_s`` bounds every collective and the connection to MASTER_ADDR:MASTER_PORT. A plain
    ``python -m dsunlearn train`` has no launcher variables: it becomes a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks at start-up (minutes on a small machine, and
        # again whenever the environment changes). Only tensor-parallel inference uses it; ZeRO uses the process group.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        _reach_the_store(timeout_s)
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(), timeout=timedelta(seconds=timeout_s)
        )
    share_the_cores()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def share_the_cores() -> None:
    """Without OMP_NUM_THREADS, give each rank its share of this machine's cores (the cores it may run on, divided
    by the ranks on this host, found by gathering host names: launch.sh, srun and the deepspeed launcher do not all
    say how many ranks share a node). torch otherwise starts one thread per core in every rank, and N ranks on a node
    then run N x cores threads that wait on each other; torchrun sets OMP_NUM_THREADS=1 for the same reason."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    hosts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    local_ranks = hosts.count(socket.gethostname())
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        if torch.distributed.get_rank() == 0:
            logging.getLogger(__name__).info(
                "%d ranks share this host's cores: %d torch thread(s) per rank (OMP_NUM_THREADS chooses)",
                local_ranks, threads)


def _reach_the_store(timeout_s: float) -> None:
    """Connect to the c10d store at MASTER_ADDR:MASTER_PORT (rank 0: serve it) within ``timeout_s``, or raise
    ``RendezvousError`` naming the address. torch's own connect can wait forever on a port that another program holds
    (it connects, then waits for an answer that never comes), so it runs in a thread with a deadline."""
    address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    outcome: list = []

    def connect():
        try:
            # Rank 0 serves the store; a probe server would hold the port that torch is about to bind, so it binds a
            # socket just long enough to find the port free.
            if _rank_from_environment() == 0:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
            else:
                torch.distributed.TCPStore(
                    os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                ).check(["dsunlearn/probe"])
            outcome.append(None)
        except (RuntimeError, OSError) as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name="dsunlearn-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout_s + 5)
    if outcome and outcome[0] is None:
        return
    if outcome and "address already in use" in str(outcome[0]).lower():
        raise RendezvousError(f"MASTER_PORT: {address} is already in use by another program: pick a free port "
                              f"(deepspeed --master_port, or MASTER_PORT)")
    cause = str(outcome[0]).splitlines()[0] if outcome else "no answer (is MASTER_PORT used by another program?)"
    raise RendezvousError(f"could not join the process group at MASTER_ADDR:MASTER_PORT = {address} within "
                          f"{timeout_s:g} s (train.collective_timeout_s): {cause}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _rank_from_environment() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))


class Watchdog:
    """One per process, started first thing in ``main()``; see the module docstring for what it does.

    SIGTERM is blocked in every thread and taken by the watchdog's thread with ``sigtimedwait``: a Python signal
    handler runs only when the main thread returns to the interpreter, never while it waits in a collective.

    A thread inherits the mask of the thread that starts it, so the entry points (train.py, __main__.py) block SIGTERM
    before any import that starts threads (numpy's OpenBLAS pool starts at ``import torch``). As a safety net the
    watchdog checks that no other thread leaves SIGTERM unblocked (``_guard_stray_threads``): such a thread would take
    a process-directed SIGTERM and die of it with the whole process.
    """

    def __init__(self):
        self.rank = _rank_from_environment()
        self.identity = f"rank {self.rank} ({socket.gethostname()}, pid {os.getpid()})"
        self.stop_requested = False  # read by the training loop after each step
        self._defer_stop = False  # True inside the training loop: a stop request waits for the end of the step
        self._failing = False  # this process is reporting its own failure: ignore posts from others
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._store = None
        self._world_size = 1
        self._timeout_s = 600.0
        self._interval_s = 1.0
        self._launchers = _launcher_ancestors()
        # From connect() to agree_on_inputs(): a usage error on any rank is gathered, so all end with one message.
        self._checking_inputs = False
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        self._stray_sigterm = threading.Event()  # set by the handler of a SIGTERM that another thread took
        self._wakeup_read = None  # the pipe CPython's C-level handler writes a signal's number to, from any thread
        self._thread = threading.Thread(target=self._run, name="dsunlearn-watchdog", daemon=True)
        self._thread.start()
        self._guard_stray_threads()

    # ---- called by the training code ----

    def connect(self, world_size: int, timeout_s: float) -> None:
        """Start heartbeats once the process group exists: a TCPStore client of its own (the process group's store is
        not shared with another thread) to the store that rank 0 serves at MASTER_ADDR:MASTER_PORT."""
        self.rank = torch.distributed.get_rank()
        self.identity = f"rank {self.rank} ({socket.gethostname()}, pid {os.getpid()})"
        self._world_size = world_size
        self._timeout_s = timeout_s
        self._interval_s = min(1.0, timeout_s / 10)
        self._guard_stray_threads()  # threads started since (DeepSpeed, the process group's)
        if world_size == 1:
            return
        self._checking_inputs = True
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
        )
        store.set(f"{_KEY}identity/{self.rank}", self.identity)
        # Kept for the case where rank 0, which serves the store, is the rank that went silent.
        self._rank0_identity = store.get(f"{_KEY}identity/0").decode() if self.rank else self.identity
        self._store = store

    def agree_on_inputs(self) -> None:
        """The end of the input checks (model folder, tokenizer, data, rank count, output folder): every rank that
        passed them calls this; one that failed joins from ``fail``. If any rank failed, every rank raises the same
        ``UsageError`` here, so the run ends with one message, exit ``EXIT_USAGE``, before anything is written.

        Between ``connect`` and this call, the only collectives are ones that every rank runs before it can fail
        alone (``checkpoints.prepare_run_folder``), so a failing rank's gather meets the others' here."""
        if not self._checking_inputs:
            return
        message = self._gather_input_problems(None)
        if message is not None:
            raise UsageError(message, on_every_rank=True)

    def _gather_input_problems(self, problem: str | None) -> str | None:
        """Every rank's input problem (None: passed) -> one message for the run, or None if all passed."""
        self._checking_inputs = False
        problems: list = [None] * self._world_size
        torch.distributed.all_gather_object(problems, problem)
        failed = [(rank, text) for rank, text in enumerate(problems) if text is not None]
        if not failed:
            return None
        if len(failed) == self._world_size and len({text for _, text in failed}) == 1:
            return failed[0][1]
        identities = {rank: self._store.get(f"{_KEY}identity/{rank}").decode() for rank, _ in failed}
        return "\n".join(f"{identities[rank]}: {text}" for rank, text in failed)

    def defer_stop(self, deferred: bool) -> None:
        """While True (the training loop), SIGTERM sets ``stop_requested`` and the loop saves after the current step;
        otherwise SIGTERM ends the process at once with ``EXIT_PREEMPTED``."""
        if deferred:
            self._guard_stray_threads()  # the last threads started before the loop (engines, data, tqdm)
        with self._lock:
            self._defer_stop = deferred
            requested = self.stop_requested
        if requested and not deferred:
            self._preempt("SIGTERM")

    def close(self) -> None:
        """A clean end: stop the heartbeats (marked done, so no neighbour takes the silence for a hang), then tear the
        process group down after every rank got here. Without the teardown, exit can abort in C++ ("terminate called
        without an active exception")."""
        if self._store is not None:
            self._store.set(f"{_KEY}done/{self.rank}", "1")
        self._closing.set()
        self._thread.join()
        self._store = None
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def fail(self, error: BaseException) -> None:
        """Report ``error`` (the exception being handled) and end this process; never returns.

        The first rank to fail prints its message and posts it; a rank whose failure is a consequence (a collective
        that broke because a peer left) finds the post and prints one line pointing at it.
        """
        from dsunlearn.settings.config import ConfigError

        with self._lock:
            self._failing = True
        if isinstance(error, (ConfigError, UsageError)) and self._checking_inputs:
            try:
                error = UsageError(self._gather_input_problems(str(error)), on_every_rank=True)
            except (RuntimeError, OSError):  # a peer failed otherwise and left: its post tells the others
                pass
        if isinstance(error, UsageError) and error.on_every_rank:
            self._end_together(EXIT_USAGE, f"dsunlearn: {error}")
        if isinstance(error, (ConfigError, UsageError)):
            code, message = EXIT_USAGE, f"dsunlearn: {error}"
        elif isinstance(error, RunDiverged):
            code, message = EXIT_DIVERGED, f"dsunlearn: {error}"
        elif isinstance(error, Preempted):
            code, message = EXIT_PREEMPTED, f"dsunlearn: {error}"
        elif isinstance(error, RendezvousError):
            code, message = EXIT_FAILED, f"dsunlearn: {self.identity}: {error}"
        else:
            code = EXIT_FAILED
            message = f"{traceback.format_exc()}dsunlearn: {self.identity} failed: {type(error).__name__}: {error}"
            if self._store is not None and _is_collective_error(error):
                self._wait_for_root_cause()
        if self._store is None:
            # No store yet (settings, rendezvous): problems found here are the same on every rank, except for a
            # rank that cannot reach the others, which has no one to tell but itself.
            if self.rank == 0 or code == EXIT_FAILED:
                print(message, file=sys.stderr)
            _exit(code)
        self._post_and_print(code, message)
        _exit(code)

    def _end_together(self, code: int, message: str) -> None:
        """Every rank is here with the same ``message``: rank 0 prints it, all tear the process group down together
        (no failure is posted, so no rank prints a line of its own) and exit ``code``."""
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)
        self.close()
        _exit(code)

    def _guard_stray_threads(self) -> None:
        """The safety net (class docstring): if a thread other than the watchdog's leaves SIGTERM unblocked, say so
        once and install a handler, so that a SIGTERM it takes requests a stop, as one the watchdog takes does, instead
        of killing the process. Called from the main thread (only it may install handlers); Linux only."""
        if self._wakeup_read is not None or self._stray_sigterm.is_set():
            return  # installed already
        if threading.current_thread() is not threading.main_thread():
            return
        strays = _threads_taking_sigterm(exclude={self._thread.native_id})
        if not strays:
            return
        print(f"dsunlearn: {self.identity}: {len(strays)} thread(s) leave SIGTERM unblocked ({', '.join(strays)}): "
              f"started before the entry point blocked it (was torch or numpy imported first?); a SIGTERM one of "
              f"them takes now requests a stop through a handler instead of killing the process", file=sys.stderr,
              flush=True)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        if previous == -1:
            self._wakeup_read = read_end  # read by the watchdog's thread within a poll, whatever the main thread does
        else:  # somebody else's wakeup fd (an event loop): keep it; the handler below still runs in the main thread
            signal.set_wakeup_fd(previous)
            os.close(read_end)
            os.close(write_end)
        signal.signal(signal.SIGTERM, lambda signum, frame: self._stray_sigterm.set())

    def _stray_sigterm_taken(self) -> bool:
        """Whether a thread other than the watchdog's took a SIGTERM (the handler of ``_guard_stray_threads``)."""
        if self._wakeup_read is not None:
            try:
                if signal.SIGTERM in os.read(self._wakeup_read, 512):
                    return True
            except BlockingIOError:
                pass
        return self._stray_sigterm.is_set()

    # ---- the thread ----

    def _run(self) -> None:
        last_beat_seen, neighbour_beats = time.monotonic(), -1
        while not self._closing.is_set():
            received = signal.sigtimedwait({signal.SIGTERM}, self._interval_s)
            # A process stopped and continued (SIGSTOP/SIGCONT: `scontrol suspend`/`resume`, Ctrl-Z, a sampling
            # profiler such as py-spy, a frozen cgroup or VM) makes the wait fail with EINTR; when its time is up by
            # then, CPython (3.11 at least) returns a siginfo it never filled instead of None: garbage, often zeros,
            # read as "SIGTERM from pid 0" before this check. Only a filled one names SIGTERM.
            if received is not None and received.si_signo == signal.SIGTERM:
                self._stop_requested(f"SIGTERM from {_signal_sender(received)}")
            elif self._stray_sigterm_taken():
                self._stop_requested("SIGTERM (taken by another thread: sender unknown)")
            for pid, process in self._launchers:
                if not _alive(process):
                    self._stop_requested(f"the launcher (pid {pid}) exited")
            store = self._store
            if store is None or self._closing.is_set():
                continue
            try:
                store.add(f"{_KEY}beat/{self.rank}", 1)
                self._check_posts(store)
                neighbour = (self.rank + 1) % self._world_size
                beats = store.add(f"{_KEY}beat/{neighbour}", 0)
            except (RuntimeError, OSError) as err:  # the store (rank 0) does not answer within the timeout
                if self._closing.is_set():
                    return
                self._report_silent(f"{self._rank0_identity}, which serves the c10d store at "
                                    f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", err)
            now = time.monotonic()
            if beats != neighbour_beats:
                last_beat_seen, neighbour_beats = now, beats
            elif now - last_beat_seen > self._timeout_s and not store.check([f"{_KEY}done/{neighbour}"]):
                self._post_and_report_silent(store, neighbour, now - last_beat_seen)

    def _check_posts(self, store) -> None:
        if store.add(f"{_KEY}failed", 0) == 0:
            return
        with self._lock:
            if self._failing:
                return
        posted = json.loads(store.get(f"{_KEY}failure"))
        store.add(f"{_KEY}read", 1)  # rank 0 serves the store and waits for this before it exits
        print(f"dsunlearn: {self.identity} stopping: {posted['source']} ended the run (see its message)",
              file=sys.stderr)
        _exit(posted["code"])

    def _post_and_print(self, code: int, message: str) -> None:
        """Post this rank's failure and print ``message`` if it is the first (the others print one line pointing at
        it). Printed before rank 0 lingers for the others: another thread of this process may end it meanwhile."""
        try:
            first = self._store.add(f"{_KEY}failed", 1) == 1
            if first:
                self._store.set(f"{_KEY}failure", json.dumps({"source": self.identity, "code": code}))
            else:
                self._store.add(f"{_KEY}read", 1)
        except (RuntimeError, OSError):
            first = True
        if not first:
            return
        print(message, file=sys.stderr, flush=True)
        if self.rank == 0:
            self._wait_until_the_post_is_read()

    def _wait_until_the_post_is_read(self) -> None:
        """Rank 0 serves the store: if it exited at once, the others would find no post (only a broken collective)
        and each print a failure of its own. Give their watchdogs a few polls to read it."""
        deadline = time.monotonic() + 4 * self._interval_s + 3
        try:
            while self._store.add(f"{_KEY}read", 0) < self._world_size - 1 and time.monotonic() < deadline:
                time.sleep(self._interval_s / 4)
        except (RuntimeError, OSError):
            pass

    def _wait_for_root_cause(self) -> None:
        """A collective broke, often because a peer left or stopped: give the rank that broke it a moment to post
        (this process then ends with one line pointing at it), and name this rank's neighbour if it went silent, so
        the message is about the cause rather than the symptom."""
        neighbour = (self.rank + 1) % self._world_size
        with self._lock:
            self._failing = False
        try:
            beats = self._store.add(f"{_KEY}beat/{neighbour}", 0)
            time.sleep(3 * self._interval_s + 2)
            silent = self._store.add(f"{_KEY}beat/{neighbour}", 0) == beats and not self._store.check(
                [f"{_KEY}done/{neighbour}"]
            )
        except (RuntimeError, OSError):
            silent = False  # the store itself is gone: the thread reports rank 0
        with self._lock:
            self._failing = True
        if silent:
            self._post_and_report_silent(self._store, neighbour, 3 * self._interval_s + 2)

    def _post_and_report_silent(self, store, neighbour: int, silent_s: float) -> None:
        try:
            identity = store.get(f"{_KEY}identity/{neighbour}").decode()
        except (RuntimeError, OSError):
            identity = f"rank {neighbour}"
        self._report_silent(identity, f"no heartbeat for {silent_s:.0f} s", post=True)

    def _report_silent(self, identity: str, cause, post: bool = False) -> None:
        message = (f"dsunlearn: {identity} has not answered for {self._timeout_s:g} s (train.collective_timeout_s): "
                   f"stopped or frozen ({cause}); ending the run from {self.identity}")
        with self._lock:
            self._failing = True
        if post:
            self._post_and_print(EXIT_FAILED, message)
        else:
            print(message, file=sys.stderr)
        _exit(EXIT_FAILED)

    def _stop_requested(self, why: str) -> None:
        with self._lock:
            first = not self.stop_requested
            self.stop_requested = True
            deferred = self._defer_stop
        if not deferred:
            self._preempt(why)
        elif first:
            # Said on the rank that got it: the others stop because the flag is all-reduced after the step.
            print(f"dsunlearn: {self.identity}: {why}: stopping after the current step", file=sys.stderr, flush=True)

    def _preempt(self, why: str) -> None:
        message = (f"dsunlearn: {self.identity}: {why} outside a training step: stopped at once; the last "
                   f"checkpoint holds every finished step: continue with --resume true")
        with self._lock:
            self._failing = True
        if self._store is None:
            print(message, file=sys.stderr)
        else:
            self._post_and_print(EXIT_PREEMPTED, message)
        _exit(EXIT_PREEMPTED)


def _threads_taking_sigterm(exclude: set) -> list[str]:
    """``"tid (name)"`` of every thread of this process, except those in ``exclude`` (native ids), that leaves SIGTERM
    unblocked, read from ``/proc/self/task/*/status`` (``SigBlk``); [] where there is no /proc."""
    bit = 1 << (signal.SIGTERM - 1)
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    found = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for task in sorted(tasks, key=int):
        if int(task) in exclude:
            continue
        try:
            with open(f"/proc/self/task/{task}/status") as status:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
        except OSError:  # ended meanwhile
            continue
        if not int(fields.get("SigBlk", "0"), 16) & bit:
            found.append(f"{task} ({names.get(int(task), fields.get('Name', '?'))})")
    return found


def _signal_sender(info) -> str:
    """Who sent a signal (``info``: sigtimedwait's siginfo). A sender that this PID namespace cannot name (si_pid 0: the
    kernel, a timer, a process outside the namespace) is told apart by how the signal was sent."""
    if info.si_pid:
        return _process_name(info.si_pid)
    return f"pid 0 (si_code {info.si_code}, uid {info.si_uid})"


def _process_name(pid: int) -> str:
    """``pid 123 (scancel ...)``: who sent a signal, for the log."""
    import psutil

    try:
        return f"pid {pid} ({' '.join(psutil.Process(pid).cmdline())[:120]})"
    except psutil.Error:
        return f"pid {pid}"


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _is_collective_error(error: BaseException) -> bool:
    return isinstance(error, (torch.distributed.DistError, RuntimeError)) and any(
        word in str(error) for word in ("Gloo", "gloo", "NCCL", "Connection", "Timed out", "timed out", "peer")
    )


def _launcher_ancestors() -> list:
    """The DeepSpeed launcher processes above this one (runner, launch.py), as psutil handles (which also notice a
    reused pid). A rank whose launcher died acts as if it got SIGTERM: DeepSpeed's runner does not forward it."""
    import psutil

    found = []
    try:
        process = psutil.Process().parent()
        while process is not None and process.pid > 1:
            command = " ".join(process.cmdline())
            if any(mark in command for mark in _LAUNCHER_MARKS) or os.path.basename(
                (process.cmdline()[1:2] or [""])[0]
            ) == "deepspeed":
                found.append((process.pid, process))
            process = process.parent()
    except psutil.Error:
        pass
    return found


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
