"""A real two-node SLURM cluster on this machine (DESIGN.md §8), for the tests in this folder.

slurmctld runs in the root network namespace on a bridge (10.77.0.1/24); each node is a network namespace joined to
the bridge by a veth pair, with its own UTS namespace (hostname) and its own slurmd. munged runs with a key made
here, on a socket of its own. /etc/hosts names the nodes while the cluster is up and is restored afterwards.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "dsuslurm0"
BRIDGE_ADDRESS = "10.77.0.1"
NODES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
NEEDED_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "munged", "ip", "nsenter",
                   "unshare", "getent")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# dsunlearn test cluster"
# The bridge, namespaces and node names are fixed: a second test session on this machine waits for the first.
LOCK_FILE = Path("/run/lock/dsunlearn-slurm-cluster.lock")


class ClusterError(RuntimeError):
    """The cluster could not start, or a job did not behave."""


def missing_requirements() -> str | None:
    """Why this machine cannot host the cluster, or None."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (network namespaces, a bridge, /etc/hosts)"
    missing = [name for name in NEEDED_PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"the SLURM test cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge iproute2)"
    return None


@dataclass
class Job:
    """What ``scontrol show job`` says about a job."""

    job_id: str
    state: str
    exit_code: int
    restarts: int
    nodes: str

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()`` (idempotent: it undoes whatever ``start()`` got to)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        # munged wants every folder above its socket open to all: pytest's temporary folders are not.
        self._munge_run = Path(tempfile.mkdtemp(prefix="dsunlearn-munge-"))
        self._munge_run.chmod(0o755)
        self.munge_socket = self._munge_run / "munge.socket"
        self.nodes = list(NODES)
        self._hosts_before: str | None = None
        self._daemon_pid_files: list[Path] = []
        self._lock = None

    # ---- clients ----
    def env(self, **extra) -> dict:
        """The environment for SLURM's clients (sbatch passes it on to the job)."""
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def command(self, *args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=kwargs.pop("env", None) or self.env(), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, args))} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def sbatch(self, *args, cwd: Path, env: dict | None = None) -> str:
        """Submit a job; return its id."""
        return self.command("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        fields = dict(re.findall(r"(\w+)=(\S*)", self.command("scontrol", "show", "job", "-o", job_id).stdout))
        return Job(job_id, fields["JobState"], int(fields["ExitCode"].split(":")[0]), int(fields.get("Restarts", 0)),
                   fields.get("NodeList", ""))

    def wait(self, job_id: str, timeout: float = 300, *, restarts: int = 0) -> Job:
        """Block until the job (after ``restarts`` requeues) has finished; a hang ends at ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.finished and job.restarts >= restarts:
                return job
            time.sleep(0.5)
        self.command("scancel", job_id, check=False)
        raise ClusterError(f"job {job_id} still {self.job(job_id).state} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ---- start and stop ----
    def start(self, timeout: float = 60) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = LOCK_FILE.open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._remove_network()  # left by a session that was killed before its clean-up
        self._start_munge()
        self._make_network()
        self._name_nodes()
        self._write_conf()
        self._daemon("slurmctld", "-f", self.conf)
        self._daemon_pid_files.append(self.root / "slurmctld.pid")
        for node in self.nodes:
            # `ip netns exec` would remount /sys, and slurmd's cgroup set-up then fails: enter the namespace directly.
            self._daemon("nsenter", f"--net=/var/run/netns/{node}", "unshare", "--uts", "sh", "-c",
                         f'hostname {node} && exec slurmd -f "$SLURM_CONF" -N {node}')
            self._daemon_pid_files.append(self.root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            if sum(line.split()[-1:] == ["idle"] for line in states) == len(self.nodes):
                return
            time.sleep(0.5)
        raise ClusterError(f"the nodes did not come up within {timeout} s: {states}\n{self.logs()}")

    def stop(self) -> None:
        if self.conf.exists():
            self.command("scancel", "--full", "--signal=KILL", "-u", "root", check=False, timeout=20)
            self.command("scancel", "-u", "root", check=False, timeout=20)
        for pid_file in [*reversed(self._daemon_pid_files), self.root / "munge" / "munged.pid"]:
            _kill_from_pid_file(pid_file)
        self._daemon_pid_files.clear()
        self._remove_network()
        shutil.rmtree(self._munge_run, ignore_errors=True)
        if self._hosts_before is not None:
            HOSTS_FILE.write_text(self._hosts_before)
            self._hosts_before = None
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        self.command("munged", f"--key-file={key}", f"--socket={self.munge_socket}", f"--pid-file={munge}/munged.pid",
                     f"--log-file={self.root}/munged.log", f"--seed-file={munge}/seed", env=os.environ)

    def _make_network(self) -> None:
        ip = ["ip"]
        self.command(*ip, "link", "add", BRIDGE, "type", "bridge")
        self.command(*ip, "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        self.command(*ip, "link", "set", BRIDGE, "up")
        for node, address in NODES.items():
            self.command(*ip, "netns", "add", node)
            self.command(*ip, "link", "add", f"veth-{node}", "type", "veth", "peer", "name", "eth0", "netns", node)
            self.command(*ip, "link", "set", f"veth-{node}", "master", BRIDGE, "up")
            self.command(*ip, "-n", node, "addr", "add", f"{address}/24", "dev", "eth0")
            self.command(*ip, "-n", node, "link", "set", "eth0", "up")
            self.command(*ip, "-n", node, "link", "set", "lo", "up")

    def _remove_network(self) -> None:
        for node in NODES:
            self.command("ip", "link", "del", f"veth-{node}", check=False)
            self.command("ip", "netns", "del", node, check=False)
        self.command("ip", "link", "del", BRIDGE, check=False)

    def _name_nodes(self) -> None:
        before = HOSTS_FILE.read_text()
        kept = "".join(line + "\n" for line in before.splitlines() if HOSTS_MARK not in line)
        self._hosts_before = kept
        HOSTS_FILE.write_text(kept + "".join(f"{address} {node}  {HOSTS_MARK}\n" for node, address in NODES.items()))

    def _write_conf(self) -> None:
        (self.root / "state").mkdir(exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        nodes = "".join(f"NodeName={node} NodeAddr={address} CPUs=1 State=UNKNOWN\n" for node, address in NODES.items())
        self.conf.write_text(f"""\
ClusterName=dsunlearn-test
SlurmctldHost={socket.gethostname()}({BRIDGE_ADDRESS})
SlurmctldPort={_free_port()}
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=60
{nodes}PartitionName=main Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, *args) -> None:
        """Start a daemon that forks into the background; its start-up errors go to its log."""
        done = subprocess.run([str(a) for a in args], env=self.env(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, args))} exited {done.returncode}: {done.stderr}\n{self.logs()}")


def _kill_from_pid_file(pid_file: Path, timeout: float = 10) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
