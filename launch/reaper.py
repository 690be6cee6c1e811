"""No orphans: the local Ray cluster a driver starts dies with the driver, however the driver ends (SIGKILL too);
the driver's other processes do not.

Ray ties its head processes to the driver, but the per-node agents (DashboardAgent, RuntimeEnvAgent) only notice
their raylet is gone about a minute later. So `watch_local_cluster` starts this module as a watchdog in its own
session, once per driver process, and puts a tag in the driver's environment only while `ray.init` starts a local
cluster: the head processes (gcs_server, raylet, dashboard, monitors) are spawned inside `ray.init` and inherit it,
and so do the workers and agents the raylet spawns later; what the driver starts before or after (the user's own
processes) does not. The watchdog waits until the driver is gone: the pipe whose only writer is the driver closes,
or the watchdog finds itself re-parented (which holds even if some process inherited the pipe). Meanwhile, every
half second, it notes the cluster's processes: those that carry the tag, and every process below one of them. The
tag alone misses some, because a process that sets its title (setproctitle: "ray::DashboardAgent") may zero the
start of its environment block as /proc shows it, and whether the tag sits in that part varies from one cluster to
the next; such an agent is a child of the raylet, and below nothing tagged once the raylet has died with the
driver, hence the noting. Then it kills those it noted and those it still finds. Processes below the driver but
not below a tagged one are the user's: they are left alone.

    python -m launch.reaper <tag>       (started by watch_local_cluster, never by hand)
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

TAG = "RLHF_RAY_LOCAL_CLUSTER"


@contextmanager
def watch_local_cluster():
    """Around a local `ray.init`: start the watchdog (once per driver process: later local clusters of the same
    process, e.g. the pipeline's stages, carry the same tag), and tag the environment only while the block runs."""
    tag = getattr(watch_local_cluster, "tag", None)
    if tag is None:
        tag = uuid.uuid4().hex   # fresh even when inherited: a parent's watchdog waits for the parent, not us
        env = {k: v for k, v in os.environ.items() if k != TAG}
        proc = subprocess.Popen([sys.executable, "-m", "launch.reaper", tag], stdin=subprocess.PIPE, env=env,
                                cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        watch_local_cluster.pipe = proc.stdin    # held open for this process's life: its closing is the signal
        watch_local_cluster.tag = tag
    before = os.environ.get(TAG)                 # a driver running inside another local cluster keeps its tag
    os.environ[TAG] = tag
    try:
        yield
    finally:
        if before is None:
            del os.environ[TAG]
        else:
            os.environ[TAG] = before


def tagged(tag: str, var: str = TAG) -> list[int]:
    """Processes (other than this one) whose environment has var=tag: every process a driver started, at any
    depth, when the driver's environment had it."""
    needle = f"{var}={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:                          # gone already, or not ours
            continue
    return found


DEAD = ("Z", "X")     # /proc/<pid>/stat states of a process that has exited: a zombie keeps only its pid until its
                      # parent (or an init that reaps slowly) collects it; counting it alive kept the reaper looping


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it names one
    process, not a later one that reuses the pid. None once it is gone, zombies included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in DEAD else fields[19]
    except (OSError, IndexError):
        return None


def process_table() -> tuple[dict[int, list[int]], dict[int, str]]:
    """Every live process's children, and each one's start time."""
    children, started = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in DEAD:
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
        started[int(d.name)] = fields[19]
    return children, started


def subtrees(roots: list[int], table: tuple[dict[int, list[int]], dict[int, str]]) -> dict[int, str]:
    """The live processes of `roots` and every one below them, each with its start time."""
    children, started = table
    out, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        if pid in started and pid not in out:    # gone since tagged() found it, or reached already
            out[pid] = started[pid]
            todo += children.get(pid, [])
    return out


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (children, theirs, ...), each with its start time."""
    table = process_table()
    return subtrees(table[0].get(root, []), table)


def cluster(tag: str, var: str = TAG) -> dict[int, str]:
    """The live processes tagged var=tag and every process below one of them, each with its start time."""
    return subtrees(tagged(tag, var), process_table())


def alive(procs: dict[int, str]) -> list[int]:
    """Those of `procs` (pid -> start time) still running: the same process, not a reused pid."""
    return [pid for pid, started in procs.items() if start_time(pid) == started]


def cluster_processes(tag: str, known: dict[int, str], var: str = TAG) -> list[int]:
    """A cluster's live processes: those tagged var=tag, those below one of them, and those of `known` (pid -> start
    time) still running."""
    return sorted(set(cluster(tag, var)) | set(alive(known)))


def actor_processes(pids: list[int], cls: str) -> list[int]:
    """Those of `pids` that are Ray workers hosting an actor of class `cls` (titled ray::<cls>[.<method>])."""
    out = []
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title == f"ray::{cls}" or title.startswith(f"ray::{cls}."):
            out.append(pid)
    return sorted(out)


def reap(tag: str, known: dict[int, str], pause: float = 0.5, quiet_rounds: int = 6, max_rounds: int = 40) -> int:
    """Kill the cluster's processes (`cluster_processes`) round after round (a process being started as the driver
    died may appear a moment later), until `quiet_rounds` rounds in a row find none. Returns how many it killed."""
    killed, quiet = 0, 0
    for _ in range(max_rounds):
        pids = cluster_processes(tag, known)
        quiet = 0 if pids else quiet + 1
        if quiet == quiet_rounds:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(pause)
    return killed


def main(tag: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # a Ctrl-C meant for the driver must not stop the cleanup
    driver, known = os.getppid(), {}
    while os.getppid() == driver:                    # orphaned: the driver is gone, however it ended
        # the cluster as of half a second ago, the processes that have died since dropped: once the raylet is
        # gone, an agent that lost the tag is below nothing tagged
        known = cluster(tag) | {pid: known[pid] for pid in alive(known)}
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 1):
            break                                    # EOF: the driver, the pipe's only writer, is gone
    reap(tag, known)


if __name__ == "__main__":
    main(sys.argv[1])
