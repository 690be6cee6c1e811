"""The code-running tools' sandbox (rlhf_ray/sandbox.py), for real: a subprocess per call. Code that allocates
without bound, spins, sleeps, writes outside its scratch directory, fills a file or opens a socket is stopped,
each with its reason; what it did not do is checked from outside. And the shipped tool environments
(rlhf_ray/tool_envs.py) on their own: calls answered, final answers rewarded, a sandboxed call stopped."""
import socket
import threading

import pytest

from rlhf_ray.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(cpu_s=1, wall_s=3.0, memory_mb=256, file_mb=0.1)


def test_code_runs_and_its_output_comes_back():
    r = run_python("import math\nprint(37 * 12, math.sqrt(16))\nopen('scratch.txt', 'w').write('x' * 10)", FAST)
    assert (r.reason, r.stdout) == ("ok", "444 4.0\n") and r.ok
    assert r.isolation.get("audit") is True


def test_an_exception_is_an_error_with_its_line():
    r = run_python("raise ValueError('bad input')", FAST)
    assert r.reason == "error" and r.detail == "ValueError: bad input" and not r.ok


def test_unbounded_allocation_is_stopped_by_the_memory_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10 << 20))", FAST)
    assert r.reason == "memory_limit", r


def test_spinning_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass", SandboxLimits(cpu_s=1, wall_s=30.0))     # wall: room for a busy box
    assert r.reason == "cpu_limit" and r.seconds < 29, r


def test_sleeping_forever_is_stopped_by_the_wall_timeout():
    r = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_s=1.0))
    assert r.reason == "timeout" and r.seconds < 5, r


def test_a_file_past_the_size_limit_is_refused():
    r = run_python("open('big', 'wb').write(b'x' * (1 << 20))", FAST)
    assert r.reason == "file_limit", r


def test_writes_outside_the_scratch_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('out')", FAST)
    assert r.reason == "write_denied" and str(target) in r.detail, r
    assert not target.exists()


def test_the_kernel_refuses_writes_that_step_past_the_audit_hook(tmp_path):
    """libc's open() through ctypes never meets Python's audit hook: Landlock refuses it."""
    target = tmp_path / "escaped.txt"
    code = (f"import ctypes, os\nfd = ctypes.CDLL(None).open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)"
            "\nprint(fd)")
    r = run_python(code, FAST)
    if not r.isolation.get("landlock"):
        pytest.skip("no Landlock in this kernel: only the audit hook guards writes here")
    assert r.reason == "ok" and r.stdout.strip() == "-1", r
    assert not target.exists()


def test_a_socket_reaches_nothing():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3.0)
    port, reached = server.getsockname()[1], []

    def accept():
        try:
            reached.append(server.accept())
        except OSError:
            pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
    assert r.reason == "network_denied", r
    # past the audit hook too: a raw connect through libc goes nowhere (no network, or Landlock refuses TCP)
    code = (f"import ctypes, socket, struct\nlibc = ctypes.CDLL(None)\ns = socket.socket()\n"
            f"addr = struct.pack('!HH4s8x', socket.AF_INET, {port}, socket.inet_aton('127.0.0.1'))\n"
            "addr = struct.pack('=H', socket.AF_INET) + addr[2:]\n"
            "print(libc.connect(s.fileno(), addr, len(addr)))")
    r = run_python(code, FAST)
    if not (r.isolation.get("netns") or r.isolation.get("landlock")):
        pytest.skip("neither a network namespace nor Landlock here: only the audit hook guards sockets")
    assert r.reason == "ok" and r.stdout.strip() == "-1", r
    t.join()
    server.close()
    assert not reached


def test_the_shipped_tools_answer_calls_and_reward_final_answers():
    from rlhf_ray.tool_envs import Calculator, PythonTool, arithmetic
    assert arithmetic("37*12") == 444 and arithmetic("(1+2)**3 - 7/2") == 23.5
    for bad in ("__import__('os')", "2**1000", "1/0", "x + 1", "1;2"):
        with pytest.raises(ValueError):
            arithmetic(bad)
    calc = Calculator()
    calc.reset({"prompt": "What is 37 times 12?", "answer": "444"})
    call = calc.step("I will compute <call>37*12=", [1, 2])
    assert (call.observation, call.done, call.metrics) == (" 444", False, {"tool_calls": 1, "invalid_calls": 0.0})
    assert calc.step("<call>open('x')=", [1]).metrics["invalid_calls"] == 1.0
    final = calc.step(" The answer is 444.", [3])
    assert (final.reward, final.done) == (1.0, True)
    assert calc.step(" It is 440.", [3]).reward == 0.0
    py = PythonTool()
    py.reset({"answer": "444"})
    assert py.step("<python>print(37 * 12)</python>", [1]).observation == "444\n"
    stopped = py.step("<python>while True: pass</python>", [1])
    assert stopped.observation.split(":")[0] in ("cpu_limit", "timeout")      # (a loaded box may reach the wall first)
    assert stopped.metrics["invalid_calls"] == 1.0
