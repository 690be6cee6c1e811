"""What a run checks before it starts an actor or writes a file: every model directory loads and fits the
tokenizer and the engine's context, the prompts parse, every reward function imports, the output directory is
a writable directory. Each problem is one line naming the file, row or key, found in seconds rather than after
the actors have spent a minute starting."""
from __future__ import annotations

import os
from pathlib import Path

from rlhf_ray.config import Config, ConfigError
from rlhf_ray.data import load_prompts
from rlhf_ray.models import (check_model_dir, check_same_tokenizer, check_tokenizer_matches, load_tokenizer,
                             model_context_length)
from rlhf_ray.rewards import load_function


def ppo_inputs(cfg: Config) -> tuple[list, dict[str, tuple[str, dict]]]:
    """(prompt rows, {what: (model directory, its config.json)}) of a PPO run: every model directory whole, the
    policy's context long enough, every reward function importable, the prompts parsed. Reads headers and small
    files only (no transformers import): fast, so it runs before anything starts. The tokenizer comes after
    (`ppo_tokenizer`)."""
    m = cfg.models
    models = [("models.policy", m.policy), ("models.reference", m.reference), ("models.critic", m.critic),
              ("models.monitor", m.monitor), ("models.teacher", m.teacher)]
    models += [(f"reward.sources[{i}].path", s.path) for i, s in enumerate(cfg.reward_sources()) if s.kind == "model"]
    configs = {what: (path, check_model_dir(path, what)) for what, path in models if path}
    longest = model_context_length(configs["models.policy"][1])
    if longest is not None and cfg.engine.max_model_len > longest:
        raise ConfigError(f"config: engine.max_model_len {cfg.engine.max_model_len} exceeds the policy's context of "
                          f"{longest} tokens ({m.policy}/config.json)")
    if m.teacher:                        # it scores whole rollouts, as the reference does
        teacher = model_context_length(configs["models.teacher"][1])
        longest = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
        if teacher is not None and teacher < longest:
            raise ConfigError(f"config: models.teacher's context of {teacher} tokens ({m.teacher}/config.json) is "
                              f"shorter than a rollout (data.max_prompt_tokens + generation.max_new_tokens = "
                              f"{longest})")
    for s in cfg.reward_sources():
        if s.kind == "function":
            load_function(s.path)
    if cfg.needs_env():
        from rlhf_ray.env import load_env_class
        load_env_class(cfg.env.cls)
    if cfg.needs_agent():
        from rlhf_ray.agent import load_agent, load_tool_format
        load_agent(cfg.agent.cls)
        load_tool_format(cfg.agent.tool_format)
        if cfg.agent.chat_template and not Path(cfg.agent.chat_template).is_file():
            raise ConfigError(f"config: agent.chat_template {cfg.agent.chat_template}: no such file")
    if cfg.needs_judge():                 # its own tokenizer: not among the models checked against the policy's
        judge = model_context_length(check_model_dir(cfg.judge.model, "judge.model"))
        if judge is not None and cfg.judge.engine.max_model_len > judge:
            raise ConfigError(f"config: judge.engine.max_model_len {cfg.judge.engine.max_model_len} exceeds the "
                              f"judge's context of {judge} tokens ({cfg.judge.model}/config.json)")
    return load_prompts(cfg.data.prompts, cfg.data.prompt_key, cfg.data.reward_keys), configs


def ppo_tokenizer(cfg: Config, configs: dict[str, tuple[str, dict]]):
    """The run's tokenizer, checked against every model's embedding (`configs` from ppo_inputs)."""
    m = cfg.models
    tokenizer = load_tokenizer(m.tokenizer or m.policy, m.trust_remote_code)
    for what, (path, config) in configs.items():
        check_tokenizer_matches(tokenizer, path, what, config)
    if m.teacher:
        check_same_tokenizer(tokenizer, m.teacher, "models.teacher", m.trust_remote_code)
    if cfg.needs_judge():
        judge_tokenizer(cfg)
    if cfg.needs_env():
        from rlhf_ray.env import env_stop_ids
        env_stop_ids(tokenizer, cfg.env.turn_stop)
    if cfg.needs_agent():
        from rlhf_ray.agent import BadRequest, load_tool_format, one_token_stops
        try:
            one_token_stops(tokenizer, load_tool_format(cfg.agent.tool_format).stop, "agent.tool_format stop")
        except BadRequest as e:
            raise ConfigError(f"config: {e}") from None
    return tokenizer


def judge_tokenizer(cfg: Config):
    """The judge's tokenizer, its labels checked to be one token each (a ConfigError naming the key if not)."""
    from rlhf_ray.judge import JudgeError, label_ids
    j = cfg.judge
    check_model_dir(j.model, "judge.model")
    tokenizer = load_tokenizer(j.tokenizer or j.model, cfg.models.trust_remote_code)
    try:
        label_ids(tokenizer, tuple(j.score_labels), "judge.score_labels")
        label_ids(tokenizer, tuple(j.verdict_labels), "judge.verdict_labels")
    except JudgeError as e:
        raise ConfigError(f"config: {e}") from None
    return tokenizer


def output_dir(path: str) -> Path:
    """The run's output directory, created if need be; one line if it is a file or cannot be written."""
    p = Path(path).resolve()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"config: run.output_dir {p} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config: run.output_dir {p} cannot be created ({e.strerror})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"config: run.output_dir {p} is not writable")
    return p
