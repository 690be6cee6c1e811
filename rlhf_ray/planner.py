"""Per-GPU memory of every role of a layout, before anyone pays for the GPUs (pure; `rlhf-ray plan`).

Model states of a trained role, mixed-precision Adam (Rajbhandari et al. 2020, ZeRO, section 3.1): Ψ parameters
take 2Ψ bytes (bf16 weights) + 2Ψ (bf16 gradients) + 12Ψ (fp32 master weights, momentum, variance), divided over
the role's N data-parallel ranks by stage:

    stage 0: 2Ψ + 2Ψ + 12Ψ       stage 1: 2Ψ + 2Ψ + 12Ψ/N       stage 2: 2Ψ + (2Ψ + 12Ψ)/N       stage 3: 16Ψ/N

Offload (ZeRO-Offload) moves the 12Ψ optimizer states to CPU memory, and at stage 3 the bf16 parameters too.
Stage 3 also holds the gathered parameters of the layers in flight (two layers, bf16). With LoRA only the Ψ_t
adapter parameters have gradients and optimizer states; the frozen base keeps its 2Ψ (2Ψ/N at stage 3).

What DeepSpeed and PyTorch add to the paper's states, measured on one H200 (benchmarks/gpu_check.py: Qwen2-shaped
0.5 B and 1.5 B models, one rank, stages 0, 2 and 3 forced; the terms below were set on the 0.5 B runs and hold
on the 1.5 B ones within a few per cent, README "The trainer on a GPU"):
- A trained role's peak is the larger of two phases. Backward: the states, the activations, and at stage 2 the
  gradient bucket (reduce_bucket_size bf16 elements). Optimizer step: the states plus the step's working set,
  the fp32 gradients of the partition being stepped and torch's foreach-Adam temporaries, 8 bytes per element
  (stage 0: 8Ψ; stages 1-2: 6Ψ/N, the bf16 gradients are released as they are converted; stage 3: 8 bytes per
  element of one sub-group, min(Ψ/N, sub_group_size), measured at DeepSpeed's default 1e9; rlhf-ray sets 1e8,
  rlhf_ray/ds_config.py); none with optimizer offload (the step runs on the CPU).
- Stage 3 keeps its gradient bucket resident (2 x reduce_bucket_size bytes).
- Activations per micro-batch of b sequences of s tokens, L HF decoder layers of hidden h and MLP width i, bf16,
  no tensor parallelism, an attention kernel without an s² term: (24h + 8i)·s·b bytes per layer (RMSNorm's fp32
  upcasts, q/k/v with the KV heads repeated to every query head, the SwiGLU's four intermediates); with full
  gradient checkpointing 2·s·b·h per layer (each layer's input) plus one layer's (24h + 8i)·s·b during its
  recomputation. A causal LM adds its logits on the T response positions only (the LM head runs on nothing
  else): bf16 logits, their fp32 upcast, and the first micro-batch's entropy for logging (log-softmax, its exp,
  their product), 18·T·b·V; with an entropy bonus in the loss (ppo.entropy_coef > 0) its log-softmax and
  probabilities stay in the graph, 8·T·b·V more.
- The caching allocator reserves more than it hands out (SLACK, a share of the peak, by stage and by
  train.cuda_alloc_conf), and every GPU process holds CUDA_CONTEXT outside it (CUDA context, cuBLAS, NCCL).
Frozen roles (reference, teacher, reward) hold bf16 weights (2Ψ, or 2Ψ/N sharded at ZeRO-3), one layer's forward
working set and their logits, and a CUDA context (not measured on a GPU). A vLLM engine takes
gpu_memory_utilization of each of its TP GPUs: 2Ψ/TP of weights, the rest KV cache at 2·L·kv_heads·head_dim·2
bytes per token (split over TP).

Quantised bases (bitsandbytes; `<role>.quantization`, QLoRA): the linear layers of every block hold 4-bit NF4 codes,
half a byte per weight, plus their per-64-weight scales (fp32, 1/16 byte per weight; with double quantisation an 8-bit
scale per block and an fp32 one per 256 blocks, ~1/64 byte), or 1 byte per weight with int8; embeddings, norms and the
output head stay bf16. A layer's weight is dequantised to the compute dtype for each matmul: one (the largest)
transient bf16 weight. A QLoRA policy with reference.from_policy_base has no reference role: its ranks score the
reference with the adapters off, within the memory they already hold. The engines get the merged bf16 weights (2Ψ);
plan.engine_weights nf4 plans a 4-bit engine that would receive only the adapters instead (not a run mode yet).

Roles colocated on the same GPUs add up. With the engines sleeping (vLLM sleep mode) they hold nothing while the
trainers run; during generation the trainers' model states stay resident beside the engine. Roles sharing one
process (placement.share_process; the hybrid layout puts the policy and its engine there) share its GPU the same
way and hold one CUDA context between them. In the hybrid layout a QLoRA policy's engine could read the policy's own
4-bit base and take only the adapters (plan.engine_weights shared: Unsloth's layout on one GPU; vLLM serves
bitsandbytes + LoRA on CUDA only, so on CPU the engine takes the merged weights and this stays a plan).
What one rank cannot show, and so stays the paper's arithmetic: the 1/N division across ranks, ZeRO-3's
prefetch at N > 1, NCCL's buffers per peer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.ds_config import ZERO3_SUB_GROUP

GiB = 1024 ** 3

# Measured on one H200 (torch 2.11, CUDA 13; benchmarks/results/gpu_check_h200_*.json), set on the 0.5 B runs:
CUDA_CONTEXT = 1.30 * GiB    # per GPU process outside the caching allocator: CUDA context 0.61, cuBLAS and NCCL 0.69
# Reserved beyond the peak allocated, as a share of it, by ZeRO stage, keyed by expandable segments on or off
# (train.cuda_alloc_conf). Stages 2 and 3 keep apart the blocks of their reduction and prefetch streams
# (overlap_comm), which expandable segments do not merge. Stage 1 was not measured: stage 2's.
SLACK = {True: {0: 0.012, 1: 0.354, 2: 0.354, 3: 0.225}, False: {0: 0.332, 1: 0.449, 2: 0.449, 3: 0.425}}
REDUCE_BUCKET = 5e8          # DeepSpeed's reduce_bucket_size default (elements, bf16): ZeRO-2/3's gradient bucket


@dataclass(frozen=True)
class Arch:
    """What the memory model needs of a decoder-only transformer."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h   # q, o; k, v; gated MLP; two norms

    def params(self, lm_head: bool = True) -> int:
        emb = self.vocab * self.hidden
        head = emb if lm_head and not self.tied_embeddings else (self.hidden if not lm_head else 0)
        return emb + head + self.layers * self.layer_params() + self.hidden

    def linear_params(self) -> int:
        """Weights of the blocks' linear layers (q, k, v, o, gate, up, down): what bitsandbytes quantises."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate)

    def lora_params(self, rank: int) -> int:
        """Adapters on every linear layer of every block (q, k, v, o, gate, up, down): r·(in + out) each."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
        return self.layers * per_layer

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# Public architectures (their config.json values), so a plan needs no download.
PRESETS = {
    "llama2-7b": Arch(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "llama2-13b": Arch(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    "llama2-70b": Arch(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000),
}


def arch_from(spec: str) -> Arch:
    """A preset name, or an HF model directory whose config.json describes a decoder-only model."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec) / "config.json"
    if not path.is_file():
        from rlhf_ray.config import ConfigError
        raise ConfigError(f"plan: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    return Arch(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                kv_heads=c.get("num_key_value_heads", heads), intermediate=c["intermediate_size"],
                vocab=c["vocab_size"], tied_embeddings=bool(c.get("tie_word_embeddings", False)))


# Bytes per quantised weight: the codes, then the block scales (bitsandbytes' blocksize 64 for NF4; with double
# quantisation 8-bit scales and an fp32 scale per 256 of them). int8: a byte, and an fp32 scale per output row.
QUANT_BYTES = {"nf4": {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}, "int8": {True: 1.0, False: 1.0}}


def weight_bytes(arch: Arch, lm_head: bool = True, quantization: str = "none", double_quant: bool = True) -> float:
    """Bytes of a model's weights: bf16, or its blocks' linear layers quantised and the rest bf16."""
    psi = arch.params(lm_head)
    if quantization == "none":
        return 2.0 * psi
    q = arch.linear_params()
    return 2.0 * (psi - q) + QUANT_BYTES[quantization][double_quant] * q


def model_states(psi: int, n: int, stage: int, offload: bool = False, trainable: int | None = None,
                 frozen_bytes: float | None = None) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states (ZeRO paper accounting). `trainable` < psi: LoRA.
    frozen_bytes: the base's weights when not 2·psi bf16 (a quantised base, stage 0-2 only)."""
    t = psi if trainable is None else trainable
    weights = 2 * psi / n if stage == 3 else (2 * psi if frozen_bytes is None else frozen_bytes)
    if trainable is not None:                       # LoRA: the adapters' own bf16 weights
        weights += 2 * t / n if stage == 3 else 2 * t
    grads = 2 * t / n if stage >= 2 else 2 * t
    optim = 12 * t / n if stage >= 1 else 12 * t
    if offload:
        optim = 0.0
        if stage == 3:
            weights = 0.0
    return {"weights": weights, "grads": grads, "optimizer": optim}


def layer_activations(arch: Arch, seq: int, micro: int) -> float:
    """Bytes one HF decoder layer saves for its backward, bf16 (see the module's docstring)."""
    return (24 * arch.hidden + 8 * arch.intermediate) * seq * micro


def activations(arch: Arch, seq: int, micro: int, checkpointing: bool, lm_tokens: int = 0,
                entropy_in_graph: bool = False) -> float:
    """Activation bytes of one micro-batch; lm_tokens: the positions the LM head runs on (0: no LM head)."""
    layer = layer_activations(arch, seq, micro)
    acts = (2 * seq * micro * arch.hidden * arch.layers + layer) if checkpointing else layer * arch.layers
    return acts + (18 + 8 * entropy_in_graph) * lm_tokens * micro * arch.vocab


def step_working_set(t: float, n: int, stage: int, offload: bool, sub_group: float = ZERO3_SUB_GROUP) -> float:
    """Bytes the optimizer step adds to the states: fp32 gradients of what is stepped and foreach-Adam's
    temporaries (t: trainable parameters, n ranks; ZeRO-3 steps `sub_group` elements at a time)."""
    if offload:
        return 0.0
    return {0: 8 * t, 1: 6 * t / n, 2: 6 * t / n}.get(stage, 8 * min(t / n, sub_group))


def slack(stage: int, cuda_alloc_conf: str | None) -> float:
    return SLACK["expandable_segments:True" in (cuda_alloc_conf or "")][stage]


@dataclass
class RolePlan:
    role: str
    gpus: int
    per_gpu: dict[str, float]                   # component -> bytes
    resident: float = 0.0                       # bytes that stay on the GPU while another phase runs
    cpu_per_rank: float = 0.0                   # offloaded states in the node's CPU memory

    @property
    def total(self) -> float:
        return sum(self.per_gpu.values())


def plan_trained(role: str, arch: Arch, rc, seq: int, lm_tokens: int = 0, entropy_in_graph: bool = False,
                 cuda_alloc_conf: str | None = None, sub_group: float = ZERO3_SUB_GROUP) -> RolePlan:
    """Per GPU: the paper's states, ZeRO-3's layers in flight and resident bucket, then the larger of the backward
    phase (activations, stage 2's bucket) and the optimizer step's working set, the allocator's slack on all of
    that, and the CUDA context."""
    lm_head = lm_tokens > 0
    psi = arch.params(lm_head)
    n, stage = rc.num_ranks, rc.zero_stage
    trainable = arch.lora_params(rc.lora.rank) + (0 if lm_head else arch.hidden) if rc.lora.rank else None
    t = psi if trainable is None else trainable
    quant = getattr(rc, "quantization", "none")
    frozen = weight_bytes(arch, lm_head, quant, rc.double_quant) if quant != "none" else None
    states = model_states(psi, n, stage, rc.offload, trainable, frozen)
    offloaded = {k: v - states[k] for k, v in model_states(psi, n, stage, False, trainable, frozen).items()}
    bucket = 2 * min(REDUCE_BUCKET, t)
    fixed = {"zero3_gathered": 2 * 2 * arch.layer_params() if stage == 3 else 0.0,
             "zero3_bucket": bucket if stage == 3 else 0.0,
             "dequantized_weight": 2.0 * arch.hidden * arch.intermediate if quant != "none" else 0.0}
    backward = (activations(arch, seq, rc.micro_batch_size, rc.gradient_checkpointing, lm_tokens, entropy_in_graph)
                + (bucket if stage in (1, 2) else 0.0))
    step = step_working_set(t, n, stage, rc.offload, sub_group)
    phase = {"activations": backward} if backward >= step else {"optimizer_step": step}
    allocated = sum(states.values()) + sum(fixed.values()) + max(backward, step)
    per_gpu = {**states, **fixed, **phase, "allocator_slack": slack(stage, cuda_alloc_conf) * allocated,
               "cuda_context": CUDA_CONTEXT}
    return RolePlan(role, n, per_gpu, resident=sum(states.values()) + sum(fixed.values()) + CUDA_CONTEXT,
                    cpu_per_rank=sum(offloaded.values()))


def plan_frozen(role: str, arch: Arch, rc, seq: int, lm_tokens: int = 0, zero3: bool = False,
                quantization: str | None = None) -> RolePlan:
    """quantization: the model's own (a reward source's); None: the role's."""
    psi = arch.params(lm_tokens > 0)
    n = rc.num_ranks
    quant = quantization or rc.quantization
    weights = 2 * psi / n if zero3 else weight_bytes(arch, lm_tokens > 0, quant, rc.double_quant)
    work = layer_activations(arch, seq, rc.micro_batch_size) + 6 * lm_tokens * rc.micro_batch_size * arch.vocab
    return RolePlan(role, n, {"weights": weights, "activations": work, "cuda_context": CUDA_CONTEXT},
                    resident=weights + CUDA_CONTEXT)


def plan_engine(arch: Arch, ec, gen, gpu_bytes: float, role: str = "engine",
                weights_bytes: float | None = None) -> tuple[RolePlan, int, int]:
    """vLLM preallocates gpu_memory_utilization of each GPU: its share of the weights, the rest as KV cache.
    Returns the plan, the KV cache's room in tokens per engine, and the rollout sequences each engine must hold
    (it runs as many at once as the room allows and queues the rest). weights_bytes: the whole model's weights
    when not bf16."""
    tp = ec.tensor_parallel_size
    weights = (2 * arch.params(True) if weights_bytes is None else weights_bytes) / tp
    kv = max(0.0, ec.gpu_memory_utilization * gpu_bytes - weights)
    capacity_tokens = int(kv * tp / arch.kv_bytes_per_token())
    seqs = math.ceil(gen.prompts_per_step * gen.n / ec.num_ranks)
    return RolePlan(role, ec.num_ranks * tp, {"weights": weights, "kv_cache": kv}), capacity_tokens, seqs


@dataclass
class Plan:
    roles: list[RolePlan]
    gpu_groups: list[tuple[list[str], int, float]]   # (roles sharing the GPUs, #GPUs, peak bytes per GPU)
    gpus: int
    nodes: int
    gpu_bytes: float
    engine_kv_capacity_tokens: int
    engine_concurrent_seqs: int                       # full-length sequences an engine holds at once
    engine_seqs_per_step: int
    cpu_per_node: float                               # offloaded states on the fullest node
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(cfg) -> Plan:
    """The plan of cfg's layout (cfg: rlhf_ray.config.Config with its `plan` and `placement` sections)."""
    pl, place = cfg.plan, cfg.placement
    gpu_bytes = place.gpu_memory_gib * GiB
    pol = arch_from(pl.policy_arch or cfg.models.policy)
    rew = arch_from(pl.reward_arch or pl.policy_arch or cfg.models.reward) if cfg.needs_reward() or cfg.needs_critic() \
        else None
    T = cfg.generation.max_new_tokens
    seq = cfg.data.max_prompt_tokens + T
    roles = {"policy": plan_trained("policy", pol, cfg.policy, seq, T, entropy_in_graph=cfg.ppo.entropy_coef > 0,
                                    cuda_alloc_conf=cfg.train.cuda_alloc_conf)}
    if cfg.needs_reference():
        roles["reference"] = plan_frozen("reference", pol, cfg.reference, seq, T, cfg.reference.zero_stage == 3)
    if cfg.needs_teacher():          # scores every sampled token, as the reference does: its logits count
        roles["teacher"] = plan_frozen("teacher", arch_from(pl.teacher_arch or cfg.models.teacher), cfg.teacher, seq,
                                       T, cfg.teacher.zero_stage == 3)
    models = [s for s in cfg.reward_sources() if s.kind == "model"]    # the planner counts one reward model
    if cfg.needs_reward():
        roles["reward"] = plan_frozen("reward", rew, cfg.reward, seq, 0, cfg.reward.zero_stage == 3,
                                      models[0].quantization if models else None)
    if cfg.needs_critic():
        roles["critic"] = plan_trained("critic", rew, cfg.critic, seq, cuda_alloc_conf=cfg.train.cuda_alloc_conf)
    engine_weights = None
    if pl.engine_weights == "nf4":       # a 4-bit engine holding the base and the policy's bf16 adapters
        engine_weights = weight_bytes(pol, True, "nf4") + 2 * pol.lora_params(cfg.policy.lora.rank)
    if pl.engine_weights == "shared":    # the policy's process: its 4-bit base once, the engine's own adapters
        if not cfg.hybrid() or cfg.policy.quantization == "none" or not cfg.policy.lora.rank:
            from rlhf_ray.config import ConfigError
            raise ConfigError("config: plan.engine_weights shared needs a quantised LoRA policy sharing its process "
                              "with the engine (placement.share_process [[policy, engine, ...]])")
        engine_weights = 2 * pol.lora_params(cfg.policy.lora.rank)
    engine, capacity, seqs = plan_engine(pol, cfg.engine, cfg.generation, gpu_bytes, weights_bytes=engine_weights)
    roles["engine"] = engine
    if cfg.needs_judge():            # its own engines, sized like the policy's: weights, then KV cache
        roles["judge"] = plan_engine(arch_from(pl.judge_arch or cfg.judge.model), cfg.judge.engine, cfg.generation,
                                     gpu_bytes, role="judge")[0]

    problems: list[str] = []
    groups: list[tuple[list[str], int, float]] = []
    placed: set[str] = set()
    for members in [*place.colocate, *place.share_process]:
        one_process = members in place.share_process
        members = [m for m in members if m in roles]
        if not members:
            continue
        sizes = {roles[m].gpus for m in members}
        if len(sizes) > 1:
            problems.append(f"colocated roles {members} need the same GPU count, got "
                            + ", ".join(f"{m}={roles[m].gpus}" for m in members))
        others = [roles[m] for m in members if m != "engine"]
        sleeps = "engine" in members and (not one_process or "policy" in members)    # beside trainers: asleep
        if sleeps:
            if not place.engines_sleep:
                problems.append("engines colocated with other roles need placement.engines_sleep: true (vLLM sleep mode)")
            # generation: engine + everything else's resident states; training: engine asleep, trainers' peaks
            peak = max(engine.total + sum(r.resident for r in others), sum(r.total for r in others))
        else:                          # frozen roles beside an awake engine (one process), or no engine
            peak = sum(r.total for r in others) + (engine.total if "engine" in members else 0.0)
        if one_process:                # one CUDA context between them (each role's plan counts its own)
            peak -= max(0, len(others) - 1) * CUDA_CONTEXT
        groups.append((members, max(sizes), peak))
        placed.update(members)
    for name, r in roles.items():
        if name not in placed:
            groups.append(([name], r.gpus, r.total))
    for members, _, peak in groups:
        util = {"engine": cfg.engine.gpu_memory_utilization, "judge": cfg.judge.engine.gpu_memory_utilization}
        limit = place.gpu_memory_gib * GiB * (util[members[0]] if len(members) == 1 and members[0] in util else 1.0)
        if peak > limit:
            problems.append(f"{'+'.join(members)} needs {peak / GiB:.1f} GiB per GPU, over the "
                            f"{limit / GiB:.1f} GiB it may use by {(peak - limit) / GiB:.1f} GiB")
    if engine.per_gpu["weights"] > cfg.engine.gpu_memory_utilization * gpu_bytes:
        pass                                            # reported above as an overflow
    elif capacity < cfg.engine.max_model_len:
        problems.append(f"engine: KV cache room of {capacity:,} tokens holds not even one "
                        f"{cfg.engine.max_model_len}-token sequence")
    gpus = sum(n for _, n, _ in groups)
    # GPUs are handed out group after group, node after node: the CPU memory of the fullest node
    slots = [sum(roles[m].cpu_per_rank for m in members) for members, n, _ in groups for _ in range(n)]
    cpu_node = max(sum(slots[i:i + place.gpus_per_node]) for i in range(0, len(slots), place.gpus_per_node))
    if cpu_node > place.cpu_memory_gib * GiB:
        problems.append(f"offloaded optimizer states need {cpu_node / GiB:.0f} GiB of CPU memory per node, over its "
                        f"{place.cpu_memory_gib:.0f} GiB by {(cpu_node - place.cpu_memory_gib * GiB) / GiB:.0f} GiB")
    return Plan(list(roles.values()), groups, gpus, math.ceil(gpus / place.gpus_per_node), gpu_bytes, capacity,
                min(seqs, capacity // cfg.engine.max_model_len), seqs, cpu_node, problems)


def format_plan(plan: Plan) -> str:
    lines = ["| role | GPUs | per GPU (GiB) | of which |", "|---|---|---|---|"]
    for r in plan.roles:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in r.per_gpu.items() if v)
        lines.append(f"| {r.role} | {r.gpus} | {r.total / GiB:.1f} | {parts} |")
    lines += ["", "| GPUs shared by | GPUs | peak per GPU (GiB) |", "|---|---|---|"]
    lines += [f"| {' + '.join(m)} | {n} | {peak / GiB:.1f} |" for m, n, peak in plan.gpu_groups]
    lines += ["", f"{plan.gpus} GPUs on {plan.nodes} node(s) of {plan.gpu_bytes / GiB:.0f} GiB GPUs; each engine's KV "
                  f"cache holds {plan.engine_kv_capacity_tokens:,} tokens: {plan.engine_concurrent_seqs} of its "
                  f"{plan.engine_seqs_per_step} rollout sequences at full length at once; offloaded states: "
                  f"{plan.cpu_per_node / GiB:.0f} GiB of CPU memory per node",
              "fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.problems)]
    return "\n".join(lines)
