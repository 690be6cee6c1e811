"""Tool environments that ship: `env.cls: "rlhf_ray.tool_envs:<name>"` (rlhf_ray/env.py says how episodes run).

Both read the model's turn the same way: a turn that ends with the call's closing text (its last token is the
turn-stop token, env.turn_stop) is a tool call; its argument is what follows the last opening marker. The tool's
answer is appended as the observation and the model goes on. A turn without a call is the final answer: it is
rewarded against the row's `answer` field (data.reward_keys: [answer]) and the episode ends.

    Calculator   `<call>37*12=` -> " 444"; arithmetic on integers and decimals (+ - * / // % ** and parentheses),
                 parsed with `ast`: nothing else is evaluated
    CalculatorOff  the same with the tool switched off: every call answers " unavailable" (a baseline)
    PythonTool   `<python>print(37*12)` then the stop token -> the printed output; run in the sandbox
                 (rlhf_ray/sandbox.py): CPU, memory, file-size limits, a wall timeout, no writes outside its
                 scratch directory, no network. A call the sandbox stops answers with its reason

Per-episode counts logged as env/<name>_mean: tool_calls, invalid_calls (a call the tool could not run).
"""
from __future__ import annotations

import ast
import operator

from rlhf_ray.env import Environment, EnvStep
from rlhf_ray.sandbox import SandboxLimits, run_python

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(expr: str) -> int | float:
    """The value of an arithmetic expression; ValueError for anything else (names, calls, huge powers)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {type(node).__name__}")
    try:
        return ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as e:
        raise ValueError(str(e)) from None


def number_text(x: int | float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


class ToolEnv(Environment):
    """A tool called as `<open>argument<close>` at the end of a turn; the final answer is rewarded 1 when it
    contains the row's answer, else 0. Subclasses set the markers and `call(argument) -> (answer, valid)`."""
    open_marker, close_marker = "<call>", "="

    def reset(self, row):
        self.answer = str(row.get("answer", "")).strip()
        return None

    def call(self, argument: str) -> tuple[str, bool]:
        raise NotImplementedError

    def step(self, text, token_ids):
        body = text.rstrip()
        if body.endswith(self.close_marker) and self.open_marker in body:
            argument = body[body.rindex(self.open_marker) + len(self.open_marker):-len(self.close_marker)]
            answer, valid = self.call(argument)
            return EnvStep(observation=answer, metrics={"tool_calls": 1, "invalid_calls": float(not valid)})
        right = bool(self.answer) and self.answer in text
        return EnvStep(reward=float(right), done=True, metrics={"correct": float(right)})


class Calculator(ToolEnv):
    def call(self, argument):
        try:
            return " " + number_text(arithmetic(argument)), True
        except ValueError:
            return " error", False


class PythonTool(ToolEnv):
    open_marker, close_marker = "<python>", "</python>"
    limits = SandboxLimits(cpu_s=2, wall_s=5.0, memory_mb=512, file_mb=1.0, output_chars=512)

    def call(self, argument):
        r = run_python(argument, self.limits)
        if r.ok:
            return r.stdout, True
        return f"{r.reason}: {r.detail}"[:200], False


class CalculatorOff(Calculator):
    """The calculator task with the tool switched off: every call is answered " unavailable" (a baseline: what
    the policy does without the tool)."""

    def call(self, argument):
        return " unavailable", False
