"""Typed run configuration: YAML -> a tree of dataclasses, with `--set a.b=c` overrides.

Validation happens on load. An unknown key or a value of the wrong type is a one-line `ConfigError`
naming the dotted key (and the file it came from), so a typo never silently falls back to a default.
The same tree describes the tiny CPU world and a 70B cluster; only the values differ.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rlhf_ray.choices import (AdvantageEstimator, ComputeDtype, ISCorrection, KLEstimator, KLPlacement,
                              LossAggregation, PreferenceFormat, Quantization, RatioLevel, RewardNorm, SFTFormat,
                              options)
from rlhf_ray.judge import PAIRWISE as JUDGE_PAIRWISE, POINTWISE as JUDGE_POINTWISE


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming it."""


@dataclass
class RunConfig:
    name: str = "ppo"
    output_dir: str = "runs/ppo"       # metrics.jsonl, W&B files, checkpoints, resolved config
    seed: int = 42
    base_dir: Optional[str] = None     # relative model, data and output paths resolve against it; null: the
                                       # directory the command runs in (`rlhf-ray submit` sets the submitting one)


@dataclass
class RayConfig:
    address: Optional[str] = None      # None: start a local cluster here; "auto": join the one this job runs on
    num_cpus: Optional[int] = None     # logical CPUs of a local cluster (None: enough for every actor)
    dashboard: bool = False            # local cluster only; bound to 127.0.0.1 when on


@dataclass
class ModelsConfig:
    policy: str = ""                   # HF-format directory (safetensors) the policy starts from (the SFT model)
    reference: Optional[str] = None    # frozen KL anchor; None: the policy's starting weights
    reward: str = ""                   # scalar-head model (AutoModelForSequenceClassification, num_labels=1)
    critic: Optional[str] = None       # None: initialised from the reward model, as InstructGPT does
    monitor: Optional[str] = None      # a held-out reward model, trained on rankings disjoint from the reward
                                       # model's: scored every step beside it (monitor/score_mean), never
                                       # optimised. Proxy up while monitor falls: the policy exploits the RM
    tokenizer: Optional[str] = None    # None: the policy's directory
    teacher: Optional[str] = None      # on-policy distillation's teacher (distill section): a frozen causal LM with
                                       # the policy's tokenizer, scoring every sampled token; None: no teacher
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    prompts: str = ""                  # JSONL file, one object per line
    prompt_key: str = "prompt"
    max_prompt_tokens: int = 64
    shuffle: bool = True
    apply_chat_template: bool = False  # render each prompt as a user turn (for chat/SFT models)
    reward_keys: list[str] = field(default_factory=list)   # row fields handed to rule/HTTP reward sources as
                                                           # keyword lists, e.g. [answer] -> fn(..., answer=[...])


@dataclass
class RoleResources:
    """Where a role's ranks run, the same keys in every role's section, checked in one place
    (`Config._check_resources`). A rank is one process of a trained or frozen role, one vLLM engine (with all its
    tensor-parallel workers), or one environment worker."""
    num_ranks: int = 1
    cpus_per_rank: float = 1.0         # Ray's logical CPUs, and the rank's threads
    gpus_per_rank: float = 0.0         # 0 on CPU; 1 per rank on a GPU cluster (an engine: all its workers' GPUs,
                                       # gpus_per_rank / tensor_parallel_size each); a fraction shares a GPU
    node_resource: Optional[str] = None   # a custom resource some nodes advertise (`ray start --resources
                                       # '{"trainer": 8}'`): the role's ranks go only to those nodes
    cpu_cores: Optional[list[int]] = None   # one machine only (benchmarks): pin every rank of the role to these
                                       # cores, one thread each; null: the OS places it


RENAMED = {"num_engines": "num_ranks", "cpus_per_engine": "cpus_per_rank", "gpus_per_engine": "gpus_per_rank",
           "num_workers": "num_ranks", "cpus_per_worker": "cpus_per_rank"}    # keys of earlier releases


@dataclass
class TrainerRoleConfig(RoleResources):
    """A role trained under DeepSpeed ZeRO (policy, critic)."""
    zero_stage: int = 2
    offload: bool = False              # ZeRO-Offload of optimizer states (and params at stage 3) to CPU
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    micro_batch_size: int = 4          # sequences per rank per forward/backward
    gradient_checkpointing: bool = False
    lora: "LoraConfig" = field(default_factory=lambda: LoraConfig())
    quantization: Quantization = "none"   # nf4: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes), only the
                                       # adapters train; needs lora.rank > 0 and ZeRO stage 0-2 (docs/qlora.md)
    double_quant: bool = True          # nf4: quantise the per-block scales too (~0.4 bit per weight saved)
    compute_dtype: Optional[ComputeDtype] = None   # what 4-bit weights are dequantised to for each matmul;
                                       # null: train.dtype


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021, via peft): only A and B (and a critic's value head) train; the
    engines and saved checkpoints get the merged weights W + (alpha / r) B A."""
    rank: int = 0                      # 0: off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])   # or e.g. [q_proj, v_proj]


@dataclass
class InferenceRoleConfig(RoleResources):
    """A frozen role (reference, reward, teacher): forward passes only."""
    micro_batch_size: int = 16
    zero_stage: Literal[0, 3] = 0      # 0: every rank holds the whole model; 3: weights partitioned over the ranks
                                       # (DeepSpeed ZeRO-3 inference; each forward is a collective), for models
                                       # larger than one GPU
    quantization: Quantization = "none"   # nf4 or int8: load the frozen model quantised (bitsandbytes); reward:
                                       # the default of its model sources and the monitor; zero_stage 0 only
    double_quant: bool = True          # as for trained roles
    compute_dtype: Optional[ComputeDtype] = None


@dataclass
class ReferenceRoleConfig(InferenceRoleConfig):
    """The frozen KL anchor."""
    from_policy_base: bool = False     # no model of its own: the policy's ranks compute the reference logprobs with
                                       # their LoRA adapters switched off, i.e. with their frozen base (which is
                                       # models.policy): one copy of the base, as TRL and OpenRLHF do for LoRA.
                                       # Needs policy.lora.rank > 0; with policy.quantization nf4 the anchor is
                                       # the 4-bit base the policy computes with


@dataclass
class DistillConfig:
    """On-policy distillation from models.teacher (docs/algorithms.md): the teacher scores each token the policy
    sampled, d_t = log pi_teacher(y_t) - log pi_old(y_t) (minus the per-token reverse KL, one-sample estimate), and
    coef times d's return with discount gamma joins every token's advantage, whatever the estimator."""
    coef: float = 1.0                  # weight of the teacher's signal beside the task's advantages
    gamma: float = 0.0                 # discount of d's return: 0, each token its own reverse KL (Qwen3's and
                                       # Thinking Machines' recipe); 1, the sum over the tokens after it too (the
                                       # sequence-level reverse KL's policy gradient, MiniLLM)
    only: bool = False                 # the teacher is the only signal: no reward sources, no reward actors


@dataclass
class RewardSourceConfig:
    """One source of reward; the reward actor scores with every source and sums weight * score."""
    kind: Literal["model", "function", "http", "judge", "env", "agent"] = "model"
    path: str = ""                     # model: scalar-head HF dir ("" -> models.reward); function:
                                       # "package.module:function" (fn(prompts, responses) -> list of floats,
                                       # importable on every node); http: the endpoint URL; judge: unused (the
                                       # judge section says which model and how it is asked); env: unused (the
                                       # env section's environment rewards each turn, this weight scales it);
                                       # agent: unused (the number each agent returns, times this weight)
    weight: float = 1.0
    batch_size: int = 64               # http: responses per request
    timeout_s: float = 30.0            # http: per request
    retries: int = 3                   # http: further attempts after a failed request (exponential backoff)
    auth_env: Optional[str] = None     # http: environment variable holding a bearer token (never logged)
    quantization: Optional[Quantization] = None   # model: load it quantised; null: reward.quantization


@dataclass
class RewardRoleConfig(InferenceRoleConfig):
    """The reward actor: forward passes of a reward model and/or rule and remote scorers."""
    sources: list[RewardSourceConfig] = field(default_factory=list)   # empty: the model at models.reward
    monitor_quantization: Optional[Quantization] = None   # models.monitor loaded quantised; null: quantization


@dataclass
class EngineConfig(RoleResources):
    """vLLM generation engines (the only backend): num_ranks engines."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: float = 1.0          # CPU build only (VLLM_CPU_KVCACHE_SPACE); unset it sizes ~12 GiB
    max_model_len: int = 512
    enforce_eager: bool = True
    in_process: bool = True           # CPU: run the vLLM engine core inside the actor (faster load, less memory)


@dataclass
class JudgeConfig:
    """An LLM judge (rlhf_ray/judge.py): a frozen causal LM on vLLM engines of its own (weights never synced),
    its verdict read from its next-token distribution over label tokens, never parsed from text. A reward source
    of kind judge scores each rollout with it, pointwise."""
    model: str = ""                    # HF directory of the judge's causal LM ("": no judge)
    tokenizer: Optional[str] = None    # None: the judge's directory
    engine: EngineConfig = field(default_factory=EngineConfig)   # the judge's engines (num_ranks, cores, length)
    pointwise: str = JUDGE_POINTWISE   # fields {prompt}, {response}
    score_labels: list[str] = field(default_factory=lambda: [" 1", " 2", " 3", " 4", " 5"])   # one token each
    score_values: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0])
    pairwise: str = JUDGE_PAIRWISE     # fields {prompt}, {a}, {b}: the label stage's question
    verdict_labels: list[str] = field(default_factory=lambda: [" A", " B"])   # first answer, second: one token each
    max_pairs: Optional[int] = None    # label stage: pairs compared per prompt of K answers (None: all C(K, 2);
                                       # fewer: a cycle through all K first, the rest drawn with the run seed)
    chat_template: bool = False        # ask as one user turn of the judge tokenizer's chat template
    batch_size: int = 64               # answers per call to one engine
    timeout_s: float = 120.0           # per call
    retries: int = 2                   # further attempts after a call that failed or timed out (a dead engine is
                                       # not retried: the run replaces it, see fault_tolerance)
    fallback_score: Optional[float] = None   # after the retries: null stops the step with one line; a number
                                       # scores the call's answers with it, counted in judge/fallbacks


@dataclass
class EnvConfig(RoleResources):
    """Multi-turn rollouts (rlhf_ray/env.py): the engines generate a turn, an environment worker answers with an
    observation (appended as tokens), a reward and done, until done, EOS or a limit. The whole response, turns and
    observations, stays within generation.max_new_tokens."""
    cls: str = ""                      # "package.module:Class" of an rlhf_ray.env.Environment ("": single-turn)
    max_turns: int = 4                 # model turns per episode
    max_turn_tokens: Optional[int] = None   # per model turn (None: generation.max_new_tokens)
    turn_stop: list[str] = field(default_factory=list)   # strings that end a turn, each one token of the policy's
                                       # tokenizer (the engines stop on token ids, never on decoded text); the
                                       # stop token is part of the turn. EOS ends the episode
    cpus_per_rank: float = 0.25        # num_ranks environment workers, each serving many episodes at once (threads)
    timeout_s: float = 30.0            # per environment call; past it the episode ends ("timeout")
    error_reward: float = -1.0         # added to the last turn of an episode whose environment raised, answered
                                       # something unusable or timed out (counted in env/errors, env/timeouts)


@dataclass
class AgentConfig(RoleResources):
    """Agents as people write them (rlhf_ray/agent.py): the user's async agent function calls the policy through an
    OpenAI-compatible endpoint (actors/agent.py, the gateway), each episode its own session, recorded token for
    token. Its ranks are the agent workers; the whole response (the model's turns and what the calls appended)
    stays within generation.max_new_tokens."""
    cls: str = ""                      # "package.module:function": async fn(base_url, api_key, row) -> float | None
    tool_format: str = ""              # "package.module:Class" parsing tool calls out of the model's text
                                       # (rlhf_ray.agent.ToolFormat; "": no tool calls, every reply is content)
    chat_template: str = ""            # a Jinja file rendering the calls' messages ("": the tokenizer's, or the
                                       # default of rlhf_ray/prompts.py)
    host: str = "127.0.0.1"            # the endpoint's address: 0.0.0.0 serves agent workers on other nodes
    port: int = 0                      # 0: a free port
    cpus_per_rank: float = 0.25        # num_ranks agent workers, each running up to 256 agents at once (threads)
    gateway_cpus: float = 0.25         # the endpoint's actor
    timeout_s: float = 60.0            # wall time per agent episode; past it the episode ends ("timeout")
    error_reward: float = -1.0         # on the last recorded token of an episode whose agent raised, returned
                                       # something unusable or ran out of time (agent/errors, agent/timeouts)


@dataclass
class GenerationConfig:
    prompts_per_step: int = 8
    n: int = 2                         # samples per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class PPOConfig:
    """The RL update. Every flag, its formula and its source: docs/algorithms.md."""
    advantage: AdvantageEstimator = "gae"   # only gae creates a critic actor
    grpo_norm_std: bool = True         # grpo: divide by the group's reward std (false: Dr. GRPO)
    epochs: int = 1                    # passes over each step's experience
    minibatch_size: int = 8            # sequences per optimizer step (across all ranks)
    clip: Optional[float] = None       # ratio clip epsilon, the symmetric shorthand: clip_low = clip_high = clip
                                       # (none of the three given: 0.2; clip with either of the others: refused)
    clip_low: Optional[float] = None   # eps_low: the ratio's lower bound is 1 - eps_low
    clip_high: Optional[float] = None  # eps_high: its upper bound 1 + eps_high. DAPO's clip-higher: 0.2 / 0.28.
                                       # With epochs 1 and one minibatch per step every ratio is 1: no clip acts
    ratio_level: RatioLevel = "token"  # sequence: GSPO, one length-normalised ratio per answer,
                                       # clipped by seq_clip_low/high, the loss a mean over answers (needs
                                       # loss_agg seq-mean-token-mean and an outcome estimator, not gae)
    seq_clip_low: float = 3e-4         # GSPO's clip range (Zheng et al. 2025: 3e-4 / 4e-4): sequence ratios
    seq_clip_high: float = 4e-4        # stay far closer to 1 than token ratios
    overlong_buffer: int = 0           # DAPO's soft overlong punishment: an answer longer than max_new_tokens -
                                       # buffer loses overlong_penalty * (excess / buffer) from its score, linearly
                                       # up to the whole penalty at max_new_tokens; 0: off
    overlong_penalty: float = 1.0
    mask_truncated: bool = False       # DAPO's overlong filtering: answers cut at max_new_tokens without EOS carry
                                       # no loss (their scores still count in their group's baseline)
    dual_clip: Optional[float] = None  # c > 1: bound the loss of negative advantages by -c A (Ye et al. 2020)
    value_clip: float = 0.2            # value-prediction clip around the rollout's values (0: off)
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05              # KL penalty coefficient beta (the initial value if adaptive)
    kl_estimator: KLEstimator = "k1"
    kl_placement: KLPlacement = "reward"   # folded into the per-token reward, or a policy loss term
    kl_target: Optional[float] = None  # nats/sequence: adapt kl_coef toward it (Ziegler et al. 2019); None: fixed
    kl_horizon: float = 10.0           # steps over which the adaptive controller acts
    whiten_advantages: Optional[bool] = None   # None: the estimator's default (gae, reinforce++: on; grpo, rloo: off)
    entropy_coef: float = 0.0          # entropy bonus: loss -= coef * entropy
    loss_agg: LossAggregation = "token-mean"
    missing_eos_penalty: float = 0.0   # subtracted from the score of responses cut at max_new_tokens without EOS
    reuse_sample_logprobs: bool = False   # take the engines' sampling logprobs as pi_old instead of a policy
                                       # forward (one fewer forward per step). Only where engine and trainer
                                       # agree: rollout/logprob_diff_max, measured on the first minibatch before
                                       # its update, says how closely
    reward_norm: RewardNorm = "none"   # initial: score <- (score - mu0) / sd0 with mu0, sd0 the
                                       # first rollout's (the starting policy's), fixed thereafter; beta is then
                                       # in units of the starting policy's reward spread, whatever the RM's scale
    is_correction: ISCorrection = "none"   # off-policy correction between the engines'
                                       # sampling logprobs and pi_old, per token: tis weighs the loss by
                                       # min(pi_old / pi_sample, is_cap); mask drops tokens whose ratio leaves
                                       # [1 / is_cap, is_cap]. Needed with rollout.max_staleness > 0; also corrects
                                       # the engine-trainer precision gap in bf16
    is_cap: float = 2.0                # C of is_correction

    def clip_bounds(self) -> tuple[float, float]:
        """(eps_low, eps_high) of the ratio clip at this ratio_level."""
        if self.ratio_level == "sequence":
            return self.seq_clip_low, self.seq_clip_high
        eps = 0.2 if self.clip is None else self.clip
        return (eps if self.clip_low is None else self.clip_low, eps if self.clip_high is None else self.clip_high)


@dataclass
class TrainConfig:
    steps: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"   # bfloat16: bf16 weights and compute, fp32 master
                                       # weights and optimizer states (DeepSpeed bf16); the engines sample in bf16
                                       # too. auto: the faster of the two on this machine, measured (hardware.py)
    attn_implementation: Optional[Literal["sdpa", "eager"]] = None   # HF attention kernel of every trainer-side
                                       # model; None: transformers' default (sdpa). On CPU in bf16, eager trains
                                       # ~17 % faster at short lengths: the CPU flash-attention backward is slow
    cuda_alloc_conf: Optional[str] = "expandable_segments:True"   # PYTORCH_CUDA_ALLOC_CONF of the trained roles'
                                       # processes on CUDA (policy, critic, supervised stages); null: PyTorch's
                                       # default. Expandable segments cut the caching allocator's slack at ZeRO-0
                                       # from 5-33 % of the peak to ~1 % (benchmarks/gpu_check.py, README)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"   # online needs WANDB_API_KEY in the environment
    project: str = "rlhf-ray"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    samples_per_step: int = 2          # rollouts written to samples.jsonl each step, as the policy saw them


@dataclass
class CheckpointConfig:
    every: int = 0                     # steps between checkpoints (0: only at the end)
    keep: int = 2                      # newest complete checkpoints kept on disk


@dataclass
class RolloutConfig:
    """When generation runs relative to training (docs/algorithms.md, "Asynchronous rollout")."""
    max_staleness: int = 0             # 0: generate after every weight sync (on-policy). 1: the engines sample
                                       # step s+1 while the trainers update on step s, so step s+1 trains on samples
                                       # of the weights one update old; needs ppo.is_correction and a policy
                                       # forward for pi_old (ppo.reuse_sample_logprobs: false)
    filter_groups: bool = False        # DAPO's dynamic sampling: drop groups whose n rewards are all equal and draw
                                       # more prompts (whole rounds of generation.prompts_per_step) until
                                       # prompts_per_step groups with signal are found, or max_rounds were drawn;
                                       # then the step trains on as many whole minibatches as those fill (none:
                                       # it skips its update). Counted in the filter/* metrics
    max_rounds: int = 3                # generation rounds per step at most, the first included


@dataclass
class GuardConfig:
    """Stop a run that diverged (launch/ppo.py), with a one-line error naming the step and the metric: a
    non-finite loss or a skipped optimizer step (non-finite gradients) stops it at once; KL to the reference above
    max_kl_per_token for `patience` consecutive steps stops it too. No checkpoint is published from a step that
    stops the run or is over the KL bound."""
    max_kl_per_token: Optional[float] = 1.0   # nats per response token (kl/ref_per_seq / mean length); null: off.
                                       # Against a learned reward model a healthy run sits far below (the tiny
                                       # world's PPO: ~0.1) and more is exploitation; a verifiable reward can move
                                       # further by learning (configs/tiny_grpo.yaml sets it off)
    patience: int = 3                  # consecutive steps over max_kl_per_token before the run stops


@dataclass
class FaultToleranceConfig:
    """What the PPO driver does when an actor dies (launch/ppo.py `recover`): it replaces the dead actor in its
    placement group (a trainer's whole rank group), rolls every role back to the newest whole checkpoint and
    replays from there, so the run ends as an undisturbed one would. Each recovery costs the steps since that
    checkpoint: checkpoint.every bounds the replay."""
    max_actor_restarts: int = 3        # deaths a run recovers from; the next one stops it (0: every death stops it)
    probe_timeout_s: float = 30.0      # after a failure, how long each actor has to answer whether it is alive


@dataclass
class WeightSyncConfig:
    backend: Literal["auto", "object_store", "process_group", "cuda_ipc", "in_process"] = "auto"
    # auto: in_process when the engine lives in the policy's process (placement.share_process [[policy, engine,
    # ...]]: weights loaded in place), else object_store; process_group: gloo (CPU) / NCCL (GPU); cuda_ipc:
    # engines sharing policy rank 0's GPU (placement.colocate). Resolved by check_ppo: the dumped config says which
    bucket_mb: float = 64.0            # parameters gathered (ZeRO-3) and shipped bucket by bucket


@dataclass
class StageConfig:
    """A supervised stage (sft, rm, dpo, kto) trained on the same DeepSpeed rank machinery as PPO."""
    data: str = ""                     # JSONL / JSON / parquet / saved dataset dir (see rlhf_ray/formats.py)
    format: str = "auto"               # sft: auto|alpaca|dolly|messages|text|oasst2; rm/dpo: auto|pairwise|ranking|
                                       # hh|ultrafeedback|ultrafeedback_overall|oasst2; kto: auto|thumbs
                                       # (rlhf_ray/formats.py)
    model: str = ""                    # HF directory the stage starts from
    output: str = ""                   # where the trained HF model goes ("" -> <run.output_dir>/<stage>)
    epochs: int = 1
    batch_size: int = 16               # sequences (sft), prompts with all their ranked answers (rm, dpo) or
                                       # judged answers (kto) per optimizer step, across ranks; micro_batch_size
                                       # counts the same
    max_len: int = 256
    eval_fraction: float = 0.1         # held out by prompt, so no prompt is in both splits
    beta: float = 0.1                  # DPO, KTO: strength of the implicit KL constraint
    reference: str = ""                # DPO, KTO: the model the KL is to ("" -> the starting weights, model);
                                       # iterative DPO's later rounds start from the last round's model, KL to SFT
    desirable_weight: float = 1.0      # KTO: lambda_D and lambda_U, the weights of thumbs up and down (the paper:
    undesirable_weight: float = 1.0    # lambda_D n_D / (lambda_U n_U) in [1, 4/3]; the stage says where it is)
    trainer: TrainerRoleConfig = field(default_factory=TrainerRoleConfig)


@dataclass
class LabelerConfig:
    """One simulated labeler of a pool (rlhf_ray/tiny_world/gold.py SimulatedLabeler)."""
    name: str = ""
    noise: float = 0.3                 # std of its Gaussian noise on the gold score
    bias: Literal["none", "length", "first", "careless"] = "none"   # length: prefers longer answers; first: the one
                                       # shown first; careless: a random order on a `strength` share of rankings
    strength: float = 0.0              # the bias's size: per word above the mean, bonus of the first, or share


@dataclass
class PipelineConfig:
    """The tiny world's three stages end to end (launch/pipeline.py)."""
    world_dir: str = "assets/tiny"     # the pretrained base model (built there if missing)
    pretrain_steps: int = 300
    sft_examples: int = 1000           # instruction pairs cut from the corpus
    labels: Literal["simulated", "judge", "human"] = "simulated"   # who ranks the K answers: the simulated
                                       # labelers (noisy gold), the LLM judge (the judge section; pairwise, both
                                       # orders; with judge.model "", the world's stand-in judge:
                                       # rlhf_ray/tiny_world/judge.py), or people at the labelling page (the pipeline
                                       # queues the answers in label_db and waits for them: docs/labelling.md)
    label_db: str = ""                 # human: the label store ("" -> <run.output_dir>/labels.sqlite)
    people_per_task: int = 1           # human: people who rank each prompt's answers (several: aggregated by
                                       # reliability, weigh_labelers)
    label_wait_s: float = 0.0          # human: how long a stage waits for people before it stops in one line (0:
                                       # as long as it takes; `--resume` picks the wait up, labels given kept)
    label_page: str = "127.0.0.1:8765" # human: host:port the pipeline serves the labelling page on while it runs
                                       # ("": none; run `rlhf-ray label-server serve` on label_db yourself)
    label_prompts: int = 256           # prompts whose K sampled answers are ranked
    k: int = 4                         # answers per prompt (InstructGPT: 4..9)
    labeler_noise: float = 0.3         # std of the labelers' Gaussian noise on the gold score
    labelers: list[LabelerConfig] = field(default_factory=list)   # a pool: each labeler ranks every prompt's
                                       # answers, and the rankings are aggregated (rlhf_ray/labelers.py); empty:
                                       # one labeler per ranking with labeler_noise
    weigh_labelers: bool = True        # weigh each labeler by its reliability estimated from the labels alone
    monitor_prompts: int = 0           # prompts labelled for a held-out monitor RM (disjoint from the RM's; 0: none)
    monitor_window: int = 5            # PPO steps averaged when comparing the monitor's curve with gold's
    ppo_prompts: int = 256
    eval_prompts: int = 128            # held out from every stage
    eval_samples: int = 4              # answers per held-out prompt for each evaluated policy
    best_of_n: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    gold: Literal["topic", "topic_no_repeats"] = "topic"   # what the simulated people want (tiny_world/gold.py
                                       # GOLDS); topic_no_repeats: a flaw one pass of RLHF over-optimises
    # The closed loop (docs/rounds.md): round r >= 2 labels answers of the current policy, retrains the reward
    # model on every ranking so far and continues PPO (and DPO, as iterative DPO) from the last round's policy
    rounds: int = 1                    # 1: one pass (label the SFT model's answers once)
    refresh: Literal["schedule", "on_drift"] = "schedule"  # schedule: each round train.steps / rounds PPO steps;
                                       # on_drift: a round ends when the audit (or the monitor) says the RM drifted
    round_labels: int = 128            # rankings each later round: the last round's audit rankings + fresh ones
    round_steps: int = 0               # schedule: PPO steps a round (0: train.steps / rounds, the rest last)
    rm_refresh: Literal["scratch", "warm"] = "scratch"     # a later round's RM: trained from the SFT model on
                                       # all rankings so far, or from the last RM on the new ones
    kl_anchor: Literal["sft", "round"] = "sft"   # what a later round's PPO and DPO keep their KL to: the SFT
                                       # model, or the policy the round starts from (a trust region per round)
    audit_prompts: int = 0             # rankings of the current policy's answers an audit labels (0: no audit);
                                       # they count against the label budget and join the next round's data
    audit_every: int = 5               # PPO steps between audits
    drift_drop: float = 0.1            # on_drift: the fall in the audits' pairwise accuracy, from the round's start,
                                       # that makes the RM stale
    drift_audits: int = 2              # audits pooled, at the round's start and at its latest (one audit is ~100 pairs)
    drift_monitor: bool = True         # on_drift: also when the held-out monitor RM falls while the proxy rises
    kto: bool = False                  # also KTO from the SFT model, on thumbs from simulated users over the label
                                       # stage's answers (each answer's noisy gold against their median; the same
                                       # answers DPO's rankings judge), evaluated beside DPO (not with labels human)
    keep_trusted: bool = True          # the last round (no later one refreshes the RM), with audits: the audit
                                       # rule ends its PPO; the pipeline keeps the policy of the last audit passed


@dataclass
class LabelConfig:
    """`rlhf-ray label` (launch/label.py): K answers per prompt ranked by the LLM judge (the judge section), or
    queued for people at the labelling page (queue)."""
    responses: str = ""                # JSONL rows {prompt, responses: [K answers]}: ranked as they are; or
    prompts: str = ""                  # JSONL prompts whose answers models.policy samples first (generation.n each)
    output: str = ""                   # the rankings JSONL ("" -> <run.output_dir>/rankings.jsonl)
    queue: str = ""                    # a label store (SQLite, launch/label_server.py): the answer sets are queued
                                       # there as ranking tasks for people instead of ranked by the judge
    batch: str = "label"               # queue: the batch they go in
    wanted: int = 1                    # queue: people to rank each


@dataclass
class PlacementConfig:
    """Which roles share GPUs, and the cluster's GPUs (the planner's inputs; see rlhf_ray/planner.py)."""
    colocate: list[list[str]] = field(default_factory=list)   # e.g. [[policy, reference], [critic, reward]];
                                       # the judge's engines too, e.g. [[reward, judge]] (they never sleep)
    engines_sleep: bool = False        # vLLM sleep mode: engines free their GPU memory while the trainers run
    share_process: list[list[str]] = field(default_factory=list)   # roles whose rank i lives in one worker process,
                                       # e.g. [[reference, reward]] or [[engine, reference, reward]]: on a small box
                                       # each process costs seconds of imports at start-up; shared roles' calls run
                                       # one at a time (actors/host.py). With the policy and the engine: the hybrid
                                       # layout, weights loaded in place (weight_sync.backend in_process)
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float = 1152.0     # per node (p4de.24xlarge), for offloaded optimizer states


@dataclass
class PlanConfig:
    """Architectures for `rlhf-ray plan`: a preset (llama2-7b, llama2-13b, llama2-70b) or an HF directory;
    "" reads models.policy / models.reward."""
    policy_arch: str = ""
    reward_arch: str = ""              # the reward model's and the critic's ("" -> models.reward, else policy_arch)
    judge_arch: str = ""               # the LLM judge's, when a reward source is a judge ("" -> judge.model)
    teacher_arch: str = ""             # the distillation teacher's ("" -> models.teacher)
    engine_weights: Literal["bf16", "nf4", "shared"] = "bf16"   # what the engines hold: the merged bf16 weights
                                       # (what runs); nf4: what-if of a 4-bit engine receiving only the LoRA adapters
                                       # (vLLM's bitsandbytes + LoRA serving, CUDA only; not a run mode of rlhf-ray
                                       # yet); shared: the same, the engine in the policy's process reading the
                                       # policy's own 4-bit base (the hybrid layout; a plan, not a run mode yet)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: TrainerRoleConfig = field(default_factory=TrainerRoleConfig)
    critic: TrainerRoleConfig = field(default_factory=TrainerRoleConfig)
    reference: ReferenceRoleConfig = field(default_factory=ReferenceRoleConfig)
    teacher: InferenceRoleConfig = field(default_factory=InferenceRoleConfig)   # models.teacher's ranks
    reward: RewardRoleConfig = field(default_factory=RewardRoleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    sft: StageConfig = field(default_factory=StageConfig)
    rm: StageConfig = field(default_factory=StageConfig)
    dpo: StageConfig = field(default_factory=StageConfig)
    kto: StageConfig = field(default_factory=StageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------ checks
    # Three levels, so that a command is refused only over what it uses: `validate` (on every load) checks each
    # value on its own and the trainer settings of every stage; `check_ppo` the cross-field rules of a PPO run;
    # `check_stage` those of one supervised stage. `paths=False` checks the rules alone (the pipeline checks every
    # stage before it starts, while their model and data paths are still to be made).

    def check_ppo(self, paths: bool = True) -> "Config":
        """What a PPO run needs beyond valid values."""
        need, ppo, gen = _need, self.ppo, self.generation
        if paths:
            need(bool(self.models.policy), "models.policy", "is required (an HF-format model directory)")
            need(bool(self.data.prompts), "data.prompts", "is required (a JSONL file of prompts)")
        if self.distill.only:
            self._check_distill_only()
        if self.needs_teacher():
            need(ppo.ratio_level == "token", "ppo.ratio_level", "must be token with models.teacher: the teacher's "
                 "signal is per token, and a sequence-level ratio (GSPO) averages each answer's advantages into one")
        for i, src in enumerate(self.reward_sources()):
            key = f"reward.sources[{i}].path"
            if src.kind == "model" and paths:
                need(bool(src.path), "models.reward", "is required (a scalar-head model directory), "
                     "or list rule/remote scorers under reward.sources")
            elif src.kind == "judge":
                need(bool(self.judge.model) or not paths, "judge.model", f"is required by reward.sources[{i}] "
                     "(kind judge): the judge's HF causal LM directory")
                self.judge_format()
            elif src.kind == "env":
                need(self.needs_env(), "env.cls", f"is required by reward.sources[{i}] (kind env): the environment "
                     "class, 'package.module:Class'")
            elif src.kind == "agent":
                need(self.needs_agent(), "agent.cls", f"is required by reward.sources[{i}] (kind agent): the agent "
                     "function, 'package.module:function'")
            elif src.kind != "model":
                need(bool(src.path), key, "is required ('module:function' or an http(s) URL)")
            if src.kind == "function":
                need(":" in src.path, key, f"must read 'package.module:function', got {src.path!r}")
            if src.kind == "http":
                need(src.path.startswith(("http://", "https://")), key, f"must be an http(s) URL, got {src.path!r}")
        rollout = gen.prompts_per_step * gen.n
        need(rollout % ppo.minibatch_size == 0, "ppo.minibatch_size",
             f"must divide generation.prompts_per_step * generation.n = {rollout}")
        for role in ("policy", "critic") if self.needs_critic() else ("policy",):
            _check_trainer(role, getattr(self, role), ppo.minibatch_size, "ppo.minibatch_size")
        if ppo.advantage in ("grpo", "rloo"):
            need(gen.n >= 2, "generation.n", f"must be >= 2 for ppo.advantage={ppo.advantage} "
                 "(advantages compare the samples of one prompt)")
        if self.needs_env():
            e = self.env
            need(":" in e.cls, "env.cls", f"must read 'package.module:Class', got {e.cls!r}")
            need(sum(s.kind == "env" for s in self.reward_sources()) == 1, "reward.sources",
                 "must list one source of kind env with env.cls set (its weight scales the environment's rewards)")
            need(e.max_turns >= 1, "env.max_turns", f"must be >= 1, got {e.max_turns}")
            need(e.max_turn_tokens is None or 1 <= e.max_turn_tokens <= gen.max_new_tokens, "env.max_turn_tokens",
                 f"must lie in 1..generation.max_new_tokens ({gen.max_new_tokens}), got {e.max_turn_tokens}")
            need(e.timeout_s > 0, "env.timeout_s", f"must be > 0, got {e.timeout_s}")
            need(ppo.reward_norm == "none", "ppo.reward_norm", "must be none with an environment (its rewards "
                 "reach each turn unnormalised)")
        if self.needs_agent():
            a = self.agent
            need(":" in a.cls, "agent.cls", f"must read 'package.module:function', got {a.cls!r}")
            need(not self.needs_env(), "agent.cls", "and env.cls are two ways of running episodes: set one")
            need(sum(s.kind == "agent" for s in self.reward_sources()) <= 1, "reward.sources",
                 "lists kind agent more than once")
            need(a.timeout_s > 0, "agent.timeout_s", f"must be > 0, got {a.timeout_s}")
            need(0 <= a.port < 65536, "agent.port", f"must be 0 (a free port) or a port number, got {a.port}")
            need(a.tool_format == "" or ":" in a.tool_format, "agent.tool_format",
                 f"must read 'package.module:Class', got {a.tool_format!r}")
            need(ppo.reward_norm == "none", "ppo.reward_norm", "must be none with agents (their rewards reach the "
                 "last token unnormalised)")
            need(not self.distill.only, "agent.cls", "must be unset with distill.only (an agent is a task reward)")
        longest = self.data.max_prompt_tokens + gen.max_new_tokens
        need(longest <= self.engine.max_model_len, "engine.max_model_len", f"must hold data.max_prompt_tokens + "
             f"generation.max_new_tokens = {longest} tokens, got {self.engine.max_model_len}")
        if ppo.reuse_sample_logprobs:
            need(ppo.is_correction == "none", "ppo.is_correction", "needs pi_old from the policy "
                 "(ppo.reuse_sample_logprobs: false): with the engines' logprobs as pi_old every weight is 1")
        self._check_recipe()
        self._check_quantized_roles()
        if self.rollout.max_staleness:
            need(not ppo.reuse_sample_logprobs, "ppo.reuse_sample_logprobs", "must be false with "
                 "rollout.max_staleness > 0: the engines sampled with weights older than the policy's")
            need(ppo.is_correction != "none", "ppo.is_correction", "must be tis or mask with "
                 "rollout.max_staleness > 0 (stale samples need an importance correction)")
            need(not self.placement.engines_sleep, "rollout.max_staleness", "must be 0 with placement.engines_sleep: "
                 "engines that sleep while the trainers run cannot generate beside them")
        self._check_layout()
        return self

    def _check_distill_only(self) -> None:
        """The teacher as the only signal: no task reward to score, so no reward source and no critic to fit it."""
        _need(self.needs_teacher(), "distill.only", "needs models.teacher (the teacher is then the only signal)")
        _need(not self.reward.sources and not self.models.monitor, "reward.sources", "must be empty with "
              "distill.only (the teacher is the only signal; set distill.coef to mix it with a task reward)")
        _need(self.ppo.advantage != "gae", "ppo.advantage", "gae fits a critic to the task return, which is 0 with "
              "distill.only: take grpo, rloo or reinforce++")
        _need(not self.needs_env(), "env.cls", "must be unset with distill.only (an environment is a task reward)")

    def _check_recipe(self) -> None:
        """DAPO's and GSPO's flags (docs/algorithms.md): one key per choice, and no two mechanisms for one concern."""
        need, ppo, gen = _need, self.ppo, self.generation
        need(ppo.clip is None or (ppo.clip_low is None and ppo.clip_high is None), "ppo.clip",
             "is the symmetric shorthand of ppo.clip_low / ppo.clip_high: give clip, or clip_low and clip_high")
        need(ppo.clip_bounds()[0] <= 1, "ppo.clip_low", f"must be <= 1 (the ratio's lower bound is 1 - clip_low), "
             f"got {ppo.clip_bounds()[0]}")
        if ppo.ratio_level == "sequence":
            need(ppo.clip is None and ppo.clip_low is None and ppo.clip_high is None, "ppo.ratio_level",
                 "sequence clips with ppo.seq_clip_low / seq_clip_high; ppo.clip, clip_low and clip_high are "
                 "token-level keys: leave them out")
            need(ppo.loss_agg == "seq-mean-token-mean", "ppo.loss_agg", "must be seq-mean-token-mean with "
                 f"ppo.ratio_level sequence (GSPO's loss is a mean over answers), got {ppo.loss_agg}")
            need(ppo.advantage != "gae", "ppo.ratio_level", "sequence needs one advantage per answer: an outcome "
                 "estimator (grpo, rloo, reinforce++), not gae")
        if self.rollout.filter_groups:
            need(ppo.advantage in ("grpo", "rloo"), "rollout.filter_groups", "drops groups that give a group "
                 f"estimator no signal: it needs ppo.advantage grpo or rloo, got {ppo.advantage}")
            need(ppo.minibatch_size % gen.n == 0, "ppo.minibatch_size", f"must be a multiple of generation.n "
                 f"({gen.n}) with rollout.filter_groups (minibatches of whole groups), got {ppo.minibatch_size}")
            need(self.rollout.max_rounds >= 1, "rollout.max_rounds", f"must be >= 1, got {self.rollout.max_rounds}")
        need(ppo.overlong_buffer < gen.max_new_tokens, "ppo.overlong_buffer",
             f"must be < generation.max_new_tokens ({gen.max_new_tokens}), got {ppo.overlong_buffer}")
        need(not ppo.missing_eos_penalty or not (ppo.overlong_buffer or ppo.mask_truncated), "ppo.missing_eos_penalty",
             "must be 0 with ppo.overlong_buffer or ppo.mask_truncated: they already handle answers cut at "
             "max_new_tokens (the overlong penalty reaches its whole overlong_penalty there; masked ones carry no loss)")

    def _check_quantized_roles(self) -> None:
        """The reference taken from the policy's base, and bitsandbytes present where a role loads quantised."""
        ref = self.reference
        if ref.from_policy_base:
            _need(self.policy.lora.rank > 0, "reference.from_policy_base", "needs policy.lora.rank > 0: the "
                  "reference is the policy's frozen base with its adapters switched off")
            _need(not self.models.reference or self.models.reference == self.models.policy, "models.reference",
                  "must be unset with reference.from_policy_base (the reference is models.policy's weights)")
            _need(ref.quantization == "none", "reference.quantization", "must be none with reference.from_policy_base:"
                  " the reference is the policy's base, in the precision policy.quantization gives it")
        quantized = [k for k, q in self.quantized_roles().items() if q != "none"]
        _need(self.reward.zero_stage == 0 or not any(k.startswith("reward.") for k in quantized), "reward.zero_stage",
              "must be 0 with a quantised reward model (stage 3 would partition the packed weights without their "
              "quantisation state)")
        if quantized:
            import importlib.util
            _need(importlib.util.find_spec("bitsandbytes") is not None, f"{quantized[0]}.quantization",
                  "needs bitsandbytes (pip install bitsandbytes==0.50.2; scripts/install.sh installs it)")

    def quantized_roles(self) -> dict[str, str]:
        """Every model a PPO run loads and its quantization, by the key that sets it."""
        out = {"policy": self.policy.quantization, "reference": self.reference.quantization}
        if self.needs_teacher():
            out["teacher"] = self.teacher.quantization
        if self.needs_critic():
            out["critic"] = self.critic.quantization
        for i, src in enumerate(self.reward_sources()):
            if src.kind == "model":
                out[f"reward.sources[{i}]"] = src.quantization
        if self.models.monitor:
            out["reward.monitor"] = self.monitor_quantization()
        return out

    def monitor_quantization(self) -> str:
        return self.reward.monitor_quantization or self.reward.quantization

    def needs_reference(self) -> bool:
        """Whether the reference has actors of its own (not with reference.from_policy_base)."""
        return not self.reference.from_policy_base

    def needs_teacher(self) -> bool:
        return bool(self.models.teacher)

    def needs_reward(self) -> bool:
        """Whether reward actors score the samples (not when the teacher is the only signal)."""
        return not self.distill.only

    def present(self, roles: list[str]) -> list[str]:
        """The roles of a placement group that have actors in this run: a critic only for gae, a judge only when
        a source asks it, the reference unless the policy's base stands in for it, a teacher only with
        models.teacher, reward actors unless the teacher is the only signal. A placement group names roles once for
        every run of a config; the absent ones are passed over."""
        wanted = {"critic": self.needs_critic(), "judge": self.needs_judge(), "reference": self.needs_reference(),
                  "env": self.needs_env(), "agent": self.needs_agent(), "teacher": self.needs_teacher(),
                  "reward": self.needs_reward()}
        return [r for r in roles if wanted.get(r, True)]

    def _check_layout(self) -> None:
        """Colocation, shared processes and the weight-sync backend that depends on them."""
        seen: set[str] = set()
        for group in self.placement.share_process:
            key = "placement.share_process"
            _need(len(group) >= 2 and set(group) <= SHAREABLE, key, f"lists groups of at least two of "
                  f"{sorted(SHAREABLE)} (the policy, the frozen roles and the engines), got {group}")
            _need(not seen & set(group), key, f"names a role twice: {sorted(seen & set(group))}")
            seen |= set(group)
            _need(not any(set(group) & set(c) for c in self.placement.colocate), key,
                  f"{group}: a role that shares a process is placed with it; leave it out of placement.colocate")
            ranks = {r: self.role_section(r).num_ranks for r in group}
            _need(len(set(ranks.values())) == 1, key, f"roles sharing processes need the same number of ranks, got {ranks}")
            if "policy" in group:
                # vLLM's in-process engine joins the process's torch.distributed world, which is then the policy's
                # group: with several ranks that takes vLLM's external_launcher mode (every rank one engine shard)
                _need(self.policy.num_ranks == 1, key, f"{group}: the policy shares a process with one rank only "
                      f"(policy.num_ranks 1), got {self.policy.num_ranks}")
            for r in group:
                _need(r in ("engine", "policy") or getattr(self, r).zero_stage == 0, key, f"{r}.zero_stage 3 joins "
                      "a process group of its own (one per process): it cannot share a process")
                _need(getattr(self, r).cpu_cores == getattr(self, group[0]).cpu_cores, key,
                      f"roles sharing processes need the same cpu_cores, got {r}.cpu_cores "
                      f"{getattr(self, r).cpu_cores} and {group[0]}.cpu_cores {getattr(self, group[0]).cpu_cores}")
                _need(getattr(self, r).node_resource == getattr(self, group[0]).node_resource, key,
                      "roles sharing processes need the same node_resource")
            if {"policy", "engine"} <= set(group) and self.policy.gpus_per_rank > 0:
                _need(self.placement.engines_sleep, "placement.engines_sleep", "must be true when the engine shares "
                      "the policy's process on a GPU (vLLM sleep mode frees its memory while the policy trains)")
            if "engine" in group:
                _need(self.rollout.max_staleness == 0, key, "an engine sharing a process with scoring roles must "
                      "be synchronous (rollout.max_staleness 0): off-policy it generates beside their scoring; give "
                      "it a process of its own (e.g. [[policy, reference, reward]])")
                _need(self.engine.tensor_parallel_size == 1, key, "an engine sharing a process needs "
                      "engine.tensor_parallel_size 1")
        hybrid = self.hybrid()
        if self.weight_sync.backend == "auto":
            self.weight_sync.backend = "in_process" if hybrid else "object_store"
        in_process = self.weight_sync.backend == "in_process"
        _need(in_process or not hybrid, "weight_sync.backend", "must be in_process (or auto) when the policy and the "
              f"engine share a process (placement.share_process): weights are loaded in place; got "
              f"{self.weight_sync.backend}")
        _need(hybrid or not in_process, "weight_sync.backend", "in_process needs the engine in the policy's "
              "process: placement.share_process [[policy, engine, ...]]")
        if self.weight_sync.backend == "cuda_ipc":
            _need(any({"policy", "engine"} <= set(g) for g in self.placement.colocate) and self.policy.gpus_per_rank > 0,
                  "weight_sync.backend", "cuda_ipc needs the engines on policy rank 0's GPU: placement.colocate "
                  "[policy, engine, ...] on a GPU cluster")
        for group in self.placement.colocate:
            if "engine" in group:
                _need(self.placement.engines_sleep or self.policy.gpus_per_rank == 0, "placement.engines_sleep",
                      "must be true when engines share GPUs with trainers (vLLM sleep mode frees their memory "
                      "while the trainers run)")
                _need(self.engine.tensor_parallel_size == 1, "engine.tensor_parallel_size",
                      "must be 1 for engines colocated with trainers (one engine per rank's GPU)")
            if "judge" in group:
                _need(self.judge.engine.tensor_parallel_size == 1, "judge.engine.tensor_parallel_size",
                      "must be 1 for judge engines colocated with other roles (one engine per rank's GPU)")
            present = self.present(group)
            ranks = {r: self.role_section(r).num_ranks for r in present}
            _need(len(set(ranks.values())) <= 1, "placement.colocate",
                  f"roles sharing GPUs need the same num_ranks, got {ranks}")
            nodes = {r: self.role_section(r).node_resource for r in group}
            _need(len(set(nodes.values())) <= 1, "placement.colocate",
                  f"roles sharing GPUs need the same node_resource, got {nodes}")

    def check_stage(self, name: str, paths: bool = True) -> "StageConfig":
        """What supervised stage `name` (sft, rm, dpo, kto) needs beyond valid values."""
        st: StageConfig = getattr(self, name)
        if paths:
            _need(bool(st.data), f"{name}.data", "is required (a data file or dataset directory)")
            _need(bool(st.model), f"{name}.model", "is required (the HF model directory the stage starts from)")
        _check_trainer(f"{name}.trainer", st.trainer, st.batch_size, f"{name}.batch_size")
        _need(0 < st.eval_fraction < 1, f"{name}.eval_fraction", "must lie in (0, 1)")
        formats = {"sft": options(SFTFormat), "kto": ("thumbs",)}.get(name, options(PreferenceFormat))
        _need(st.format in ("auto", *formats), f"{name}.format", f"is one of {['auto', *formats]}, got {st.format!r}")
        return st

    def check_pipeline(self) -> "Config":
        """The pipeline's every stage, before any starts: their rules (the pipeline makes their paths)."""
        for name in STAGES:
            self.check_stage(name, paths=False)
        if self.pipeline.labels == "judge":         # judge.model "": the tiny world's stand-in judge, built
            self.judge_format()                      # beside the world (rlhf_ray/tiny_world/judge.py)
        pool = self.pipeline.labelers
        if pool:
            names = [lab.name for lab in pool]
            _need(self.pipeline.labels == "simulated", "pipeline.labelers", "is a pool of simulated labelers: it "
                  f"needs pipeline.labels simulated, got {self.pipeline.labels}")
            _need(all(names) and len(set(names)) == len(names), "pipeline.labelers",
                  f"needs a distinct, non-empty name for each labeler, got {names}")
            for lab in pool:
                _need(lab.noise >= 0 and lab.strength >= 0, f"pipeline.labelers[{lab.name}]",
                      f"needs noise and strength >= 0, got {lab.noise} and {lab.strength}")
                _need(lab.bias != "careless" or lab.strength <= 1, f"pipeline.labelers[{lab.name}]",
                      f"careless: strength is the share of random rankings, in [0, 1], got {lab.strength}")
        pc = self.pipeline
        _need(pc.rounds >= 1, "pipeline.rounds", f"must be >= 1, got {pc.rounds}")
        _need(pc.rounds == 1 or pc.round_labels > pc.audit_prompts, "pipeline.round_labels",
              f"must exceed pipeline.audit_prompts ({pc.audit_prompts}): a round's rankings include the audits', "
              f"got {pc.round_labels}")
        steps = pc.round_steps or self.train.steps // pc.rounds
        _need(steps >= 1 and steps * (pc.rounds - 1) < self.train.steps, "pipeline.round_steps",
              f"leaves no PPO step for some of the {pc.rounds} rounds of train.steps {self.train.steps}")
        _need(pc.refresh == "schedule" or pc.audit_prompts > 0 or (pc.drift_monitor and pc.monitor_prompts),
              "pipeline.refresh", "on_drift needs pipeline.audit_prompts > 0 or a monitor RM (monitor_prompts, "
              "drift_monitor) to tell drift by")
        _need(pc.audit_every >= 1 and pc.drift_audits >= 1, "pipeline.audit_every",
              "and pipeline.drift_audits must be >= 1")
        _need(pc.gold == "topic" or pc.labels != "judge", "pipeline.gold", "the stand-in judge knows the topic "
              "gold only: topic_no_repeats needs pipeline.labels simulated or human")
        _need(pc.people_per_task >= 1, "pipeline.people_per_task", f"must be >= 1, got {pc.people_per_task}")
        _need(pc.label_wait_s >= 0, "pipeline.label_wait_s", f"must be >= 0, got {pc.label_wait_s}")
        _need(not pc.kto or pc.labels != "human", "pipeline.kto", "thumbs come from the tiny world's simulated "
              "users, not people: with pipeline.labels human, export people's thumbs from the label page and run "
              "`rlhf-ray kto`")
        if pc.labels == "human" and pc.label_page:
            host, _, port = pc.label_page.rpartition(":")
            _need(bool(host) and port.isdigit(), "pipeline.label_page", f"is host:port or \"\", got {pc.label_page!r}")
        return self.check_ppo(paths=False)

    def round_plan(self) -> list[int]:
        """PPO steps each round gets on a schedule (on_drift: the most a round may run), summing to train.steps."""
        pc, total = self.pipeline, self.train.steps
        each = pc.round_steps or total // pc.rounds
        return [each] * (pc.rounds - 1) + [total - each * (pc.rounds - 1)]

    def check_label(self) -> "Config":
        """What `rlhf-ray label` needs: a judge (or a queue for people), and answers given or a policy to sample
        them from."""
        lc = self.label
        _need(bool(self.judge.model) or bool(lc.queue), "judge.model", "is required (the judge's HF causal LM "
              "directory), unless label.queue sends the answers to people")
        _need(lc.wanted >= 1, "label.wanted", f"must be >= 1, got {lc.wanted}")
        _need(bool(lc.responses) != bool(lc.prompts), "label", "takes label.responses (answers to rank) or "
              "label.prompts (answers sampled from models.policy first), one of them")
        if lc.prompts:
            _need(bool(self.models.policy), "models.policy", "is required to sample answers for label.prompts")
            _need(self.generation.n >= 2, "generation.n", "must be >= 2: the answers per prompt to rank")
        if not lc.queue:
            self.judge_format()
        return self

    def reward_sources(self) -> list[RewardSourceConfig]:
        """reward.sources, or the single reward model at models.reward when none are listed; a model source
        without a path takes models.reward. None with distill.only (the teacher is the only signal)."""
        if not self.needs_reward():
            return []
        srcs = self.reward.sources or [RewardSourceConfig(kind="model")]
        return [dataclasses.replace(s, path=s.path or self.models.reward,
                                    quantization=s.quantization or self.reward.quantization)
                if s.kind == "model" else s for s in srcs]

    def role_section(self, role: str) -> RoleResources:
        """The config section that places a role's ranks (the judge's engines: judge.engine)."""
        return self.judge.engine if role == "judge" else getattr(self, role)

    def needs_env(self) -> bool:
        return bool(self.env.cls)

    def needs_agent(self) -> bool:
        return bool(self.agent.cls)

    def needs_episodes(self) -> bool:
        """Multi-turn rollouts: an environment's (env.cls) or an agent's (agent.cls)."""
        return self.needs_env() or self.needs_agent()

    def needs_judge(self) -> bool:
        return any(s.kind == "judge" for s in self.reward_sources())

    def hybrid(self) -> bool:
        """The hybrid layout: the engine lives in the policy's process (placement.share_process [[policy, engine,
        ...]]), its weights loaded in place."""
        return any({"policy", "engine"} <= set(g) for g in self.placement.share_process)

    def judge_format(self):
        """The judge section's templates and labels, checked (rlhf_ray/judge.py: a bad one is a ConfigError)."""
        from rlhf_ray.judge import JudgeError, JudgeFormat
        j = self.judge
        try:
            return JudgeFormat(j.pointwise, j.pairwise, tuple(j.score_labels), tuple(j.score_values),
                               tuple(j.verdict_labels), j.chat_template)
        except JudgeError as e:
            raise ConfigError(str(e)) from None

    def judge_engine_config(self) -> "Config":
        """The config a judge engine is built from: the policy's engine code serving judge.model with the judge's
        engine settings, synchronous (no off-policy scheduling), its weights its own."""
        j = self.judge
        return derive(self, {"models.policy": j.model, "models.tokenizer": j.tokenizer or j.model,
                             "engine": dataclasses.asdict(j.engine), "rollout.max_staleness": 0,
                             "ppo.is_correction": "none", "placement.engines_sleep": False})

    def needs_critic(self) -> bool:
        return self.ppo.advantage == "gae"

    def critic_init(self) -> str:
        """The critic starts from models.critic, else the reward model (InstructGPT), else the policy
        (a fresh value head on the SFT backbone: rule rewards have no reward model to start from)."""
        models = [s.path for s in self.reward_sources() if s.kind == "model"]
        return self.models.critic or (models[0] if models else self.models.policy)

    def device_for(self, gpus_per_rank: float) -> str:
        """Where a role runs: train.device when set, else CUDA exactly when the role asks for GPUs."""
        if self.train.device != "auto":
            return self.train.device
        return "cuda" if gpus_per_rank > 0 else "cpu"

    def validate(self) -> "Config":
        """Each value on its own (its range, its form) and every trainer's optimizer settings: what is wrong
        whatever command runs. Cross-field rules of a command are in check_ppo / check_stage."""
        need = _need
        self._check_ranges()
        for key in ("policy", "critic", *(f"{st}.trainer" for st in STAGES)):
            r: TrainerRoleConfig = self._get(key)
            need(r.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", f"must be 0-3, got {r.zero_stage}")
            need(len(r.betas) == 2 and all(0 <= b < 1 for b in r.betas), f"{key}.betas",
                 f"must be two numbers in [0, 1), got {r.betas}")
            need(r.lora.rank >= 0, f"{key}.lora.rank", "must be >= 0 (0: off)")
            _check_quantization(key, r)
        for key in ("reference", "reward", "teacher"):
            r = self._get(key)
            need(r.quantization == "none" or r.zero_stage == 0, f"{key}.quantization",
                 f"{r.quantization} loads whole quantised layers on every rank: it needs {key}.zero_stage 0 "
                 "(stage 3 would partition the packed weights without their quantisation state)")
        self._check_resources()
        need(0 < self.ppo.gamma <= 1, "ppo.gamma", f"must lie in (0, 1], got {self.ppo.gamma}")
        need(0 < self.ppo.lam <= 1, "ppo.lam", f"must lie in (0, 1], got {self.ppo.lam}")
        need(self.ppo.dual_clip is None or self.ppo.dual_clip > 1, "ppo.dual_clip", "must be > 1 (or null: off)")
        need(self.ppo.is_cap > 1, "ppo.is_cap", f"must be > 1, got {self.ppo.is_cap}")
        need(self.rollout.max_staleness in (0, 1), "rollout.max_staleness",
             f"must be 0 (synchronous) or 1 (one step off-policy), got {self.rollout.max_staleness}")
        roles = {"policy", "critic", "reference", "reward", "engine", "judge", "teacher"}
        for group in self.placement.colocate:
            unknown = [r for r in group if r not in roles]
            need(not unknown, "placement.colocate", f"names unknown role(s) {unknown} (roles: {sorted(roles)})")
        return self

    def _check_ranges(self) -> None:
        """Every number that has a meaningful range: counts at least 1, rates finite and positive, and so on."""
        at_least = {"train.steps": 1, "ppo.epochs": 1, "ppo.minibatch_size": 1, "generation.prompts_per_step": 1,
                    "generation.n": 1, "generation.max_new_tokens": 1, "data.max_prompt_tokens": 1,
                    "engine.tensor_parallel_size": 1, "engine.max_model_len": 2,
                    "checkpoint.every": 0, "logging.samples_per_step": 0, "guard.patience": 1,
                    "fault_tolerance.max_actor_restarts": 0}
        for role in ("policy", "critic", "reference", "reward", "teacher"):
            at_least.update({f"{role}.micro_batch_size": 1})
        at_least.update({"judge.engine.max_model_len": 2, "judge.batch_size": 1,
                         "judge.retries": 0, "judge.timeout_s": 1e-3})
        for st in STAGES:
            at_least.update({f"{st}.epochs": 1, f"{st}.batch_size": 1, f"{st}.max_len": 2,
                             f"{st}.trainer.micro_batch_size": 1})
        for key, low in at_least.items():
            v = self._get(key)
            _need(v >= low, key, f"must be >= {low}, got {v}")
        positive = ["ppo.clip", "ppo.clip_low", "ppo.clip_high", "ppo.seq_clip_low", "ppo.seq_clip_high",
                    "generation.temperature", "generation.top_p", "engine.kv_cache_gib",
                    "fault_tolerance.probe_timeout_s"]
        positive += [f"{r}.lr" for r in ("policy", "critic", *(f"{st}.trainer" for st in STAGES))]
        non_negative = ["ppo.kl_coef", "distill.coef", "ppo.value_clip", "ppo.entropy_coef", "ppo.missing_eos_penalty",
                        "ppo.overlong_penalty", "ppo.overlong_buffer",
                        "guard.max_kl_per_token"]
        non_negative += [f"{r}.{k}" for r in ("policy", "critic", *(f"{st}.trainer" for st in STAGES))
                         for k in ("grad_clip", "weight_decay")]
        for key in positive + non_negative:
            v = self._get(key)
            ok = v is None or (math.isfinite(v) and (v > 0 if key in positive else v >= 0))
            _need(ok, key, f"must be a finite number {'> 0' if key in positive else '>= 0'}, got {v}")
        _need(0 <= self.distill.gamma <= 1, "distill.gamma", f"must lie in [0, 1], got {self.distill.gamma}")
        _need(self.generation.top_p <= 1, "generation.top_p", f"must lie in (0, 1], got {self.generation.top_p}")

    def role_sections(self) -> dict[str, RoleResources]:
        """Every role's resources, by the key of its section (the supervised stages' trainers included)."""
        return {"policy": self.policy, "critic": self.critic, "reference": self.reference, "teacher": self.teacher,
                "reward": self.reward,
                "engine": self.engine, "judge.engine": self.judge.engine, "env": self.env, "agent": self.agent,
                **{f"{st}.trainer": getattr(self, st).trainer for st in STAGES}}

    def _check_resources(self) -> None:
        """Every role's num_ranks, cpus_per_rank, gpus_per_rank and cpu_cores, in one place."""
        for key, r in self.role_sections().items():
            _need(r.num_ranks >= 1, f"{key}.num_ranks", f"must be >= 1, got {r.num_ranks}")
            for k in ("cpus_per_rank", "gpus_per_rank"):
                v = getattr(r, k)
                _need(math.isfinite(v) and v >= 0, f"{key}.{k}", f"must be a finite number >= 0, got {v}")
            _need(r.cpu_cores is None or (len(r.cpu_cores) > 0 and min(r.cpu_cores) >= 0), f"{key}.cpu_cores",
                  f"must list core numbers (or be null), got {r.cpu_cores}")
        for key, workers in (("env", "environment workers"), ("agent", "agent workers")):
            r = getattr(self, key)
            _need(r.gpus_per_rank == 0 and r.cpu_cores is None, key, f"{workers} take CPUs only: gpus_per_rank 0 "
                  f"and cpu_cores null, got {r.gpus_per_rank} and {r.cpu_cores}")

    def cpus_needed(self) -> float:
        """Logical CPUs a run's actors take at once: the PPO roles present, or the largest supervised stage."""
        ppo = sum(r.num_ranks * r.cpus_per_rank for r in map(self.role_section, self.present(list(ROLES))))
        ppo += self.agent.gateway_cpus if self.needs_agent() else 0.0
        return max(ppo, *(getattr(self, st).trainer.num_ranks * getattr(self, st).trainer.cpus_per_rank
                          for st in STAGES))

    def _get(self, dotted: str):
        node = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


STAGES = ("sft", "rm", "dpo", "kto")
ROLES = ("policy", "critic", "reference", "teacher", "reward", "engine", "judge", "env", "agent")   # a PPO run's roles
SHAREABLE = {"policy", "reference", "teacher", "reward", "engine"}   # roles that may share a worker process
                                                                        # (placement.share_process)


def _check_trainer(key: str, r: TrainerRoleConfig, batch_size: int, batch_key: str) -> None:
    """A trained role's batch splits evenly: `batch_size` rows per optimizer step over its ranks, each rank's share
    into whole micro-batches (DeepSpeed's train_batch_size = micro x accumulation steps x ranks)."""
    per_rank, rem = divmod(batch_size, r.num_ranks)
    _need(rem == 0, batch_key, f"must be a multiple of {key}.num_ranks ({r.num_ranks}), got {batch_size}")
    _need(per_rank % min(r.micro_batch_size, per_rank) == 0, f"{key}.micro_batch_size",
          f"must divide the per-rank batch ({batch_key} {batch_size} / {r.num_ranks} ranks = {per_rank}), "
          f"got {r.micro_batch_size}")


def _check_quantization(key: str, r: TrainerRoleConfig) -> None:
    """A trained role's quantised base: QLoRA (nf4 + adapters) for the PPO roles, at ZeRO stage 0-2."""
    if r.quantization == "none":
        return
    _need(key in ("policy", "critic"), f"{key}.quantization", "must be none: the supervised stages train on a "
          "full-precision base (QLoRA is for the PPO roles, policy and critic)")
    _need(r.quantization == "nf4", f"{key}.quantization", "int8 is for frozen roles only: LLM.int8 quantises the "
          "activations too, so no merged weight (the engines', an HF export's) reproduces the trained model; use nf4")
    _need(r.lora.rank > 0, f"{key}.quantization", f"nf4 freezes the base in 4 bits: it needs {key}.lora.rank > 0 "
          "(only the adapters train)")
    _need(r.zero_stage in (0, 1, 2), f"{key}.zero_stage", f"must be 0, 1 or 2 with {key}.quantization nf4: stage 3 "
          "partitions every parameter, the packed 4-bit base among them, without its quantisation state (at stages "
          "0-2 the frozen base is whole on every rank; the adapters' gradients and optimizer states are partitioned)")


def _need(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key} {why}")


# ----------------------------------------------------------------------------------------------- loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats). Raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config: {key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, not a float: accept such numerals.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config: {key} must be true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"config: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k in RENAMED and RENAMED[k] in names:
            raise ConfigError(f"config: '{prefix}{k}' is now '{prefix}{RENAMED[k]}' (every role's resources: "
                              "num_ranks, cpus_per_rank, gpus_per_rank, node_resource, cpu_cores)")
        if k not in names:
            raise ConfigError(f"config: unknown key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, what: str) -> None:
    parts = dotted.strip().split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: {what} {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"config: --set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    _set_dotted(tree, dotted, yaml.safe_load(raw) if raw != "" else "", "--set")


def derive(cfg: Config, sets: dict[str, Any]) -> Config:
    """A new config: `cfg` with each dotted key set to its (Python) value, built and validated exactly as a
    YAML file with `--set` overrides is. How a driver derives one stage's config from another's."""
    tree = cfg.to_dict()
    for dotted, value in sets.items():
        _set_dotted(tree, dotted, value, "set")
    return _build(Config, tree).validate()


def _read_tree(p: Path, chain: list[Path]) -> dict:
    """A YAML file's mapping; with a top-level `extends: other.yaml` (relative to this file), that file's mapping
    with this one's keys merged over it, section by section (a variant names only what it changes)."""
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}" + (f" (extended by {chain[-1]})" if chain else ""))
    if p.resolve() in chain:
        raise ConfigError(f"config: {p} extends itself through {' -> '.join(map(str, chain))}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config: {p} must hold a mapping at the top level")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    return _merge(_read_tree(p.parent / parent, chain + [p.resolve()]), tree)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply `a.b=c` overrides, build and validate the typed tree."""
    tree: dict = {}
    where = ""
    if path is not None:
        where = f" ({path})"
        tree = _read_tree(Path(path), [])
    for o in overrides or []:
        _apply_override(tree, o)
    try:
        return _build(Config, tree).validate()
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def resolve_paths(cfg: Config) -> Config:
    """Make every relative model, data and output path absolute against `run.base_dir` (null: the directory the
    command runs in), so actors, and a job whose working directory is Ray's copy of the code (`ray job submit`),
    open the same files. Absolute paths stay as they are, empty ones stay empty. Models are local directories
    (check_model_dir refuses anything else), so a relative name is always a path, never a hub id."""
    base = Path(cfg.run.base_dir or Path.cwd()).absolute()

    def fix(p):
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p
    cfg.run.base_dir = str(base)
    m = cfg.models
    m.policy, m.reference, m.reward, m.critic, m.tokenizer, m.monitor, m.teacher = map(
        fix, (m.policy, m.reference, m.reward, m.critic, m.tokenizer, m.monitor, m.teacher))
    cfg.judge.model, cfg.judge.tokenizer = fix(cfg.judge.model), fix(cfg.judge.tokenizer)
    cfg.label.responses, cfg.label.prompts, cfg.label.output = map(fix, (cfg.label.responses, cfg.label.prompts,
                                                                      cfg.label.output))
    cfg.data.prompts, cfg.agent.chat_template = fix(cfg.data.prompts), fix(cfg.agent.chat_template)
    cfg.reward.sources = [dataclasses.replace(s, path=fix(s.path)) if s.kind == "model" else s
                          for s in cfg.reward.sources]
    for st in (getattr(cfg, name) for name in STAGES):
        st.data, st.model, st.output, st.reference = fix(st.data), fix(st.model), fix(st.output), fix(st.reference)
    cfg.run.output_dir, cfg.pipeline.world_dir = fix(cfg.run.output_dir), fix(cfg.pipeline.world_dir)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
