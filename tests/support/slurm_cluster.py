"""A private Slurm cluster on this machine for the end-to-end tests: munged, slurmctld, a slurmd per node
(two by default; ``SlurmCluster(nodes=node_names(3))`` for three).

Everything lives in one temporary folder (config, munge key and socket, state, spool, logs, pid
files) and the daemons listen on free ports, so the cluster never touches a system-wide Slurm and
two pytest-xdist workers can each run one. ``stop()`` stops exactly the daemons ``start()`` began,
by the process ids they wrote, plus any ``slurmstepd`` whose working folder is inside ours.

Needs root (slurmd runs jobs as root here) and Debian's ``slurmctld slurmd slurm-client munge``
(``.ci/run`` installs them); :func:`unavailable_reason` says why a machine cannot run it, and
:func:`require_slurm` skips a test there (fails it under ``ANNDIST_REQUIRE_SLURM=1``, as CI sets).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

def node_names(count: int) -> tuple[str, ...]:
    """``anndist-node1`` ... ``anndist-node<count>``: the fake nodes of a cluster of ``count``."""
    return tuple(f"anndist-node{i}" for i in range(1, count + 1))


NODES = node_names(2)
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
INSTALL_HINT = ("apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge "
                "(.ci/run does this)")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
_HOSTS_MARK = "# anndist Slurm tests"


def which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def require_slurm() -> None:
    """Skip the calling test (fail it under ``ANNDIST_REQUIRE_SLURM=1``, as CI sets) when the cluster cannot start."""
    import pytest
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("ANNDIST_REQUIRE_SLURM") == "1":
            pytest.fail(f"ANNDIST_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def unavailable_reason() -> str | None:
    """Why this machine cannot start the cluster, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm tests start slurmctld/slurmd/munged and need root (CI runs them as root)"
    missing = [name for name in BINARIES if which(name) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"the munge user does not exist: {INSTALL_HINT}"
    return None


def worker_first_job_id(offset: int = 1) -> int:
    """A first job id for this pytest-xdist worker's cluster: ``1000 * (worker + 1) + offset``.

    Job ids pick rendezvous ports (15000 + id % 20000), so clusters running side by side on one
    machine need ids apart: each worker has its own thousand, and two clusters of one worker (two
    and three nodes) different offsets in it.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest-xdist
    return 1000 * (int(worker[2:]) + 1 if worker.startswith("gw") else 0) + offset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_hosts(names: tuple[str, ...]) -> None:
    """Make the node names resolve to 127.0.0.1 (gloo and torchrun resolve them) via /etc/hosts."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(missing)}  {_HOSTS_MARK}\n")


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, configured in ``root``; see the module docstring."""

    def __init__(self, root: str | Path | None = None, nodes: tuple[str, ...] = NODES, first_job_id: int = 1) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="anndist-slurm-"))
        # Job ids pick rendezvous ports (15000 + id % 20000): clusters running side by side on one
        # machine (pytest-xdist workers) need different ids, which real clusters on separate nodes don't.
        self.first_job_id = first_job_id
        self.root.chmod(0o755)  # munged runs as the munge user and must reach its folder
        self.nodes = nodes
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, int] = {}  # daemon name -> pid, filled as each one starts

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        try:
            ensure_hosts(self.nodes)
            self._start_munged()
            self._write_config()
            self._daemon("slurmctld", [which("slurmctld"), "-c", "-i"], self.root / "run" / "slurmctld.pid")
            for node in self.nodes:
                self._daemon(f"slurmd:{node}", [which("slurmd"), "-N", node], self.root / "run" / f"slurmd-{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o755)
        munge = pwd.getpwnam("munge")
        key = folder / "munge.key"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        folder.chmod(0o755)  # munged refuses a socket folder without execute permission for all
        pid_file = folder / "munged.pid"
        cmd = ["runuser", "-u", "munge", "--", which("munged"), f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={pid_file}", f"--log-file={folder / 'munged.log'}",
               f"--seed-file={folder / 'munged.seed'}"]
        self._daemon("munged", cmd, pid_file)

    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        host = socket.gethostname().split(".")[0]
        topology = _topology()
        r = self.root
        lines = [
            "ClusterName=anndist", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire=10: a requeued job becomes eligible again ~11 s later (default: minutes). Shorter
            # risks "credential expired" step launches on a loaded machine.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/slurmd-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            # No systemd or cgroups here: track processes by parentage, no task containment.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            # MinJobAge <= 5 makes `sbatch --wait` poll every 2 s instead of backing off to 32 s.
            # KillWait: Slurm's default, the time the ranks have to exit after a requeue ends the job
            # (they take seconds on a loaded machine; 10 s could SIGKILL them mid-exit).
            "MinJobAge=5", "KillWait=30", f"FirstJobId={self.first_job_id}",
        ]
        lines += [f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} {topology} RealMemory=2048 State=UNKNOWN"
                  for node in self.nodes]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, cmd: list, pid_file: Path, timeout: float = 10.0) -> None:
        """Start a self-daemonizing program and record the pid it writes."""
        proc = subprocess.run([str(c) for c in cmd], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {pid_file}\n{self.logs()}")
            time.sleep(0.05)
        self.pids[name] = int(pid_file.read_text().split()[0])

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default: os.environ) pointed at this cluster: SLURM_CONF and the Slurm binaries."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _SEARCH_PATH if base is None else os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def submit(self, script: str | Path, *args: str, output: Path, options: tuple[str, ...] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> "Job":
        """``sbatch --wait`` in the background; returns once Slurm has given the job its id."""
        return Job(self, [which("sbatch"), "--parsable", "--wait", f"--output={output}", *options, str(script), *args],
                   output, self.env(env), cwd)

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("log/*.log")) + sorted(self.root.glob("munge/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 20.0) -> None:
        """Cancel our jobs, then stop our daemons by pid (slurmd, slurmctld, munged) and remove the folder."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--user=root", check=False)
            self._wait_queue_empty(timeout)
        for name in sorted(self.pids, key=lambda n: ("slurmd" not in n, n != "slurmctld")):
            _terminate(self.pids.pop(name), timeout)
        for pid in self._our_stepds():
            _terminate(pid, timeout)
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait_queue_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run("squeue", "-h", "-o", "%i", check=False)
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.2)

    def _our_stepds(self) -> list[int]:
        """slurmstepd processes working inside our folder (they can outlive slurmd)."""
        found = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                if (proc_dir / "comm").read_text().strip() != "slurmstepd":
                    continue
                if Path(os.readlink(proc_dir / "cwd")).is_relative_to(self.root):
                    found.append(int(proc_dir.name))
            except OSError:
                continue
        return found


def _topology() -> str:
    """CPUs/Boards/Sockets/Cores/Threads of this machine as ``slurmd -C`` reports them."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = out.splitlines()[0].split()
    keep = ("CPUs=", "Boards=", "SocketsPerBoard=", "CoresPerSocket=", "ThreadsPerCore=")
    return " ".join(f for f in fields if f.startswith(keep))


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Job:
    """A batch job submitted with ``sbatch --wait`` (which returns the batch script's exit status)."""

    def __init__(self, cluster: SlurmCluster, cmd: list, output: Path, env: dict[str, str],
                 cwd: str | Path | None) -> None:
        self.cluster, self.output = cluster, Path(output)
        self._proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.id = self._proc.stdout.readline().strip()  # --parsable: the id, printed at submission
        if not self.id.isdigit():
            self._proc.wait(10)
            raise RuntimeError(f"sbatch failed: {self.id} {self._proc.stderr.read()}")

    @property
    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 120.0) -> None:
        """Wait until the job's output holds ``text``; fail if the job ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self._proc.poll() is not None:
                raise AssertionError(f"job {self.id} ended before printing {text!r}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.id} printed no {text!r} in {timeout:.0f} s:\n{self.log}")
            time.sleep(0.1)

    def scancel(self, *options: str) -> None:
        self.cluster.run("scancel", *options, self.id)

    def wait(self, timeout: float = 240.0) -> int:
        """The batch script's exit status, once the job (and every requeued run of it) has ended."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run("scancel", self.id, check=False)
            self._proc.kill()
            raise AssertionError(f"job {self.id} still running after {timeout:.0f} s:\n{self.log}") from None
