"""The watchdog of launch/reaper.py on real processes (no Ray): a driver that started a local cluster is SIGKILLed,
and the cluster's processes die with it, also one whose environment no longer shows the tag (as happens to Ray's
agents when their process title overwrites the start of the environment block), while the driver's own child lives
on."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import reaper

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import subprocess, time
from launch.reaper import TAG, watch_local_cluster
with watch_local_cluster():                                   # as around ray.init
    # tagged, like the raylet; its child without the tag, like the agents
    cluster = subprocess.Popen(["sh", "-c", f"env -u {TAG} sleep 300 & wait"])
user = subprocess.Popen(["sleep", "300"])                     # the user's own, started after ray.init
print(watch_local_cluster.tag, cluster.pid, user.pid, flush=True)
time.sleep(300)
"""


def gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = [p for p in pids if reaper.start_time(p) is not None]
        if not left:
            return []
        time.sleep(0.2)
    return left


def test_a_killed_driver_takes_its_cluster_with_it_tag_or_no_tag_and_spares_its_own_processes():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    tag, cluster, user = driver.stdout.readline().split()
    cluster, user = int(cluster), int(user)
    time.sleep(1.5)                                        # the watchdog has seen the cluster's processes
    family = reaper.descendants(driver.pid)
    try:
        assert reaper.tagged(tag) == [cluster]             # the tag is on the cluster's root only
        assert set(reaper.cluster(tag)) == set(reaper.descendants(cluster)) | {cluster}
        assert len(reaper.cluster(tag)) == 2 and user in family and user not in reaper.cluster(tag)
        assert len(family) == 4                            # the two, the user's child, the watchdog
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert gone_within([p for p in family if p != user], 10) == []     # the watchdog too, its work done
        assert reaper.alive({user: family[user]}) == [user]
    finally:
        for pid in reaper.alive(family):
            os.kill(pid, signal.SIGKILL)


def test_descendants_and_alive_tell_a_process_from_a_reused_pid():
    child = subprocess.Popen(["sleep", "30"])
    family = reaper.descendants(os.getpid())
    assert child.pid in family and reaper.alive({child.pid: family[child.pid]}) == [child.pid]
    assert reaper.alive({child.pid: "1"}) == []            # same pid, another start time: another process
    child.kill()
    child.wait()
    assert child.pid not in reaper.alive(family)


def test_a_zombie_counts_as_gone():
    """A killed process its parent has not collected yet (a zombie) holds nothing but its pid: alive() and
    descendants() leave it out, or the reaper kept finding it and outlived its driver (seen once in the fault test,
    where an init that reaps slowly left one)."""
    child = subprocess.Popen(["sleep", "30"])
    started = reaper.descendants(os.getpid())[child.pid]
    child.kill()                                            # not waited for: a zombie until wait()
    deadline = time.time() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert reaper.alive({child.pid: started}) == [] and child.pid not in reaper.descendants(os.getpid())
    finally:
        child.wait()
