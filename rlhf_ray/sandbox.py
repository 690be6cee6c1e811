"""Running a tool's untrusted code: a fresh Python subprocess, fenced in.

    result = run_python("print(37 * 12)", SandboxLimits(cpu_s=2, wall_s=5))
    result.reason, result.stdout      # ("ok", "444\n"); otherwise "error", "timeout", "cpu_limit", "memory_limit",
                                      # "file_limit", "write_denied", "network_denied" or "crashed", with `detail`

What the sandbox does, in the child before the code runs (each layer reported in `result.isolation`):
- rlimits: CPU seconds (SIGXCPU, then SIGKILL a second later), address space (allocations past it raise
  MemoryError), file size (a write past it fails with EFBIG), no core files.
- a wall timeout: the child runs in its own session and its whole process group is SIGKILLed.
- a scratch directory, fresh per call and removed after, as the working directory; stdout and stderr go to files
  there, so the file-size limit bounds them too.
- writes outside the scratch directory are refused by the kernel with Landlock (Linux >= 5.13; the rules also
  refuse TCP bind and connect on ABI >= 4), read access is left alone (the interpreter and its libraries must load).
- no network: a new user and network namespace (only a loopback that is down), where the kernel allows
  unprivileged user namespaces or we are root.
- Python audit hooks refuse the same writes and every socket connect/bind/send first, so the reason comes back
  named; they are a courtesy, not the fence (ctypes can step past them; the kernel layers cannot be stepped past).

What it does not stop: reading any file the user running the trainer can read (secrets in files readable to it:
run the trainer as a user who cannot read them); a fork bomb when running as root (RLIMIT_NPROC does not bind
root; the wall timeout kills the process group, not children that start their own session); CPU and memory spent
by grandchildren beyond their own rlimits (inherited per process, not summed); anything the kernel layers do not
cover where `isolation` reports them off. It is not a container: for hostile code at scale use gVisor, Firecracker
or a remote sandbox behind an HTTP tool.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 2                     # CPU seconds (RLIMIT_CPU)
    wall_s: float = 5.0                # wall-clock seconds before the process group is killed
    memory_mb: int = 512               # address space (RLIMIT_AS): the interpreter itself takes ~30 MB of it
    file_mb: float = 1.0               # largest file it may write, stdout and stderr included (RLIMIT_FSIZE)
    output_chars: int = 4096           # stdout and stderr returned, each cut to this


@dataclass
class SandboxResult:
    reason: str                        # ok | error | timeout | cpu_limit | memory_limit | file_limit |
                                       # write_denied | network_denied | crashed
    stdout: str = ""
    stderr: str = ""
    detail: str = ""                   # one line: the exception, signal or limit
    seconds: float = 0.0
    isolation: dict = field(default_factory=dict)   # which layers were on: landlock, netns, audit

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


# The child's first code: fence itself in, then run the tool's code. Reads its settings from argv and reports on fd 3.
_BOOT = r'''
import ctypes, errno, json, os, resource, sys
scratch, cpu, mem, fsize, status_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
status = os.fdopen(status_fd, "w")
isolation = {}
libc = ctypes.CDLL(None, use_errno=True)

def netns():
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWNET) == 0

def landlock():
    nr_create, nr_add, nr_restrict = 444, 445, 446
    abi = libc.syscall(nr_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False
    writes = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))   # write, remove, make *
    writes |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)          # refer, truncate
    net = 0b11 if abi >= 4 else 0                                                 # TCP bind, connect
    attr = (ctypes.c_uint64 * 2)(writes, net)
    ruleset = libc.syscall(nr_create, ctypes.byref(attr), ctypes.c_size_t(16 if abi >= 4 else 8), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    rule = Beneath(writes, fd)
    if libc.syscall(nr_add, ruleset, 1, ctypes.byref(rule), 0) != 0:
        return False
    if libc.prctl(38, 1, 0, 0, 0) != 0:                                          # PR_SET_NO_NEW_PRIVS
        return False
    return libc.syscall(nr_restrict, ruleset, 0) == 0

isolation["netns"] = netns()
isolation["landlock"] = landlock()
os.chdir(scratch)
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

class Denied(PermissionError):
    pass

root = os.path.realpath(scratch)
def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)
    except Exception:
        return False

def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and not inside(args[0]):
            raise Denied(f"write outside the scratch directory: {args[0]}")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "shutil.rmtree") and not inside(args[0]):
        raise Denied(f"write outside the scratch directory: {args[0]}")
    elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        raise Denied(f"network: {event}")
sys.addaudithook(hook)
isolation["audit"] = True
status.write(json.dumps({"isolation": isolation}) + "\n"); status.flush()

def report(reason, e):
    text = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    status.write(json.dumps({"reason": reason, "detail": text}) + "\n"); status.flush()

try:
    code = open("main.py").read()
    exec(compile(code, "main.py", "exec"), {"__name__": "__main__"})
except MemoryError as e:
    report("memory_limit", e); sys.exit(3)
except Denied as e:
    report("network_denied" if str(e).startswith("network") else "write_denied", e); sys.exit(3)
except OSError as e:
    reason = {errno.EFBIG: "file_limit", errno.ENETUNREACH: "network_denied", errno.ENETDOWN: "network_denied",
              errno.EACCES: "write_denied", errno.EPERM: "write_denied", errno.EROFS: "write_denied"}.get(e.errno, "error")
    if reason == "write_denied" and "ocket" in type(e).__name__ + str(e):
        reason = "network_denied"
    report(reason, e); sys.exit(3)
except BaseException as e:
    if isinstance(e, SystemExit) and e.code in (None, 0):
        raise
    report("error", e); sys.exit(3)
'''


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), scratch_root: str | None = None) -> SandboxResult:
    """Run `code` as a script in a fenced-in Python subprocess (see the module's docstring); never raises for
    anything the code does."""
    scratch = tempfile.mkdtemp(prefix="rlhf-sandbox-", dir=scratch_root)
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    try:
        with open(os.path.join(scratch, "main.py"), "w") as f:
            f.write(code)
        out, err = (open(os.path.join(scratch, name), "wb") for name in (".stdout", ".stderr"))
        args = [sys.executable, "-I", "-B", "-c", _BOOT, scratch, str(limits.cpu_s), str(limits.memory_mb << 20),
                str(int(limits.file_mb * (1 << 20))), str(write_fd)]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,),
                                start_new_session=True, cwd=scratch, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(write_fd)
        write_fd = -1
        out.close()
        err.close()
        try:
            proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with os.fdopen(read_fd, "r") as status:
            read_fd = -1
            reports = [json.loads(line) for line in status.read().splitlines() if line.startswith("{")]
        stdout, stderr = (open(os.path.join(scratch, n), errors="replace").read(limits.output_chars)
                          for n in (".stdout", ".stderr"))
        isolation = next((r["isolation"] for r in reports if "isolation" in r), {})
        said = next((r for r in reversed(reports) if "reason" in r), None)
        rc = proc.returncode
        if timed_out:
            reason, detail = "timeout", f"still running after {limits.wall_s:g} s: killed"
        elif said is not None:
            reason, detail = said["reason"], said["detail"]
        elif rc in (-signal.SIGXCPU, -signal.SIGKILL):
            reason, detail = "cpu_limit", f"{limits.cpu_s} CPU seconds used: killed ({signal.Signals(-rc).name})"
        elif rc < 0:
            reason, detail = "crashed", f"killed by {signal.Signals(-rc).name}"
        elif rc != 0:
            reason, detail = "error", f"exit status {rc}"
        else:
            reason, detail = "ok", ""
        return SandboxResult(reason, stdout, stderr, detail, time.perf_counter() - t0, isolation)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
