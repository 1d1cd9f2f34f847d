"""A one-node Slurm cluster on this machine, for the Slurm sweep test: Debian's ``slurm-wlm`` and ``munge``
(``apt-get install slurm-wlm munge``, as ``.ci/run`` does), everything under one directory (munge key and socket,
``slurm.conf`` with free ports, state, spool, logs), daemons started as the current user, no cgroups, no accounting.

    python tests/slurm_cluster.py DIR     # start one and print the SLURM_CONF to export; `kill` the pids to stop it
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol") if shutil.which(d) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, cpus: int = 2) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under ``root``; returns the environment to submit with (SLURM_CONF). The node
    declares ``cpus`` CPUs whatever the machine has (``config_overrides``), so that a test can tell a sweep's own limit
    on cells at once from the node's."""
    if missing():
        raise RuntimeError(
            f"Slurm is not installed here ({', '.join(missing())} missing): apt-get install slurm-wlm munge, as "
            ".ci/run does"
        )
    root = Path(root)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    host, user = socket.gethostname().split(".")[0], getpass.getuser()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=zoo
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = [
        "munged",
        f"--socket={sock}",
        f"--key-file={key}",
        f"--pid-file={root / 'munge' / 'munged.pid'}",
        f"--log-file={root / 'munge' / 'munged.log'}",
        f"--seed-file={root / 'munge' / 'seed'}",
        "--force",
    ]
    subprocess.run(munge, check=True, env=env)
    subprocess.run(["slurmctld"], check=True, env=env)
    subprocess.run(["slurmd"], check=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return {"SLURM_CONF": str(conf)}
        time.sleep(1)
    stop(root)
    raise RuntimeError(f"the one-node Slurm did not come up (node state {state!r}; logs in {root / 'log'})")


def stop(root: Path) -> None:
    """Stop the daemons started by :func:`start` (by their pid files)."""
    for pidfile in (root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text().strip()), 15)


if __name__ == "__main__":
    print(f"export SLURM_CONF={start(Path(sys.argv[1]))['SLURM_CONF']}")
