"""The watchdog of launch/reaper.py on real processes (no Ray): a driver that started a local cluster is SIGKILLed,
and every process below it dies with it, also one whose environment no longer shows the tag (as happens to Ray's
agents when their process title overwrites the start of the environment block)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import reaper

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import os, subprocess, sys, time
from launch.reaper import TAG, watch_local_cluster
watch_local_cluster()
tagged = subprocess.Popen(["sleep", "300"])                                   # inherits the tag, like raylet
untagged = subprocess.Popen(["sleep", "300"], env={k: v for k, v in os.environ.items() if k != TAG})
grandchild = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])              # below a child, like the agents
print(tagged.pid, untagged.pid, grandchild.pid, flush=True)
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


def test_a_killed_driver_takes_its_processes_with_it_tag_or_no_tag():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in driver.stdout.readline().split()]
    time.sleep(1.5)                                        # the watchdog has seen the driver's processes
    family = reaper.descendants(driver.pid)
    assert set(pids) <= set(family)
    assert len(family) == 5                                # the three, the grandchild's sleep, the watchdog
    try:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert gone_within(list(family), 10) == []
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
