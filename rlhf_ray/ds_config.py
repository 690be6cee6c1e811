"""DeepSpeed configs, derived from the typed config (pure; unit-testable): a trained role's ZeRO config, and ZeRO-3
inference for a partitioned frozen model."""
from __future__ import annotations


# ZeRO-3 steps the optimizer one sub-group of parameters at a time; each takes 8 bytes per element of working set
# (fp32 gradients, foreach-Adam temporaries: rlhf_ray/planner.py). DeepSpeed's default, 1e9 elements, is 7.5 GiB
# per GPU of a 7B model's step (measured at 1e9 on an H200, benchmarks/gpu_check.py); 1e8 makes it 0.75 GiB.
ZERO3_SUB_GROUP = 100_000_000


def deepspeed_config(role, minibatch_size: int, dtype: str, device: str) -> dict:
    """ZeRO config for one optimizer step per PPO minibatch of `minibatch_size` sequences across all ranks.

    Adam is torch's AdamW (`torch_adam`; foreach kernels on CUDA) on CPU and GPU alike: DeepSpeed's FusedAdam
    JIT-builds a C++/CUDA op on first use (~2 min on CPU, minutes of nvcc on a GPU node, and it needs a CUDA
    toolkit matching torch's). With optimizer offload, DeepSpeedCPUAdam is what DeepSpeed runs.

    One rank without offload runs stage 0 whatever zero_stage says: there is nothing to partition, and stage 2's
    gradient bucketing and flat-buffer copies cost ~9 % of a CPU policy update (benchmarks/vs_trl.py).
    """
    per_rank = minibatch_size // role.num_ranks
    micro = min(role.micro_batch_size, per_rank)
    zero: dict = {"stage": effective_zero_stage(role), "overlap_comm": device == "cuda", "contiguous_gradients": True}
    if role.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        if role.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if zero["stage"] == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False,
                     "sub_group_size": ZERO3_SUB_GROUP})
    return {
        "train_batch_size": minibatch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "gradient_clipping": role.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": role.lr, "betas": list(role.betas), "eps": 1e-8, "weight_decay": role.weight_decay,
            "torch_adam": not role.offload}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def effective_zero_stage(role) -> int:
    return 0 if role.num_ranks == 1 and not role.offload else role.zero_stage


def inference_config(micro_batch_size: int, dtype: str) -> dict:
    """ZeRO-3 for a frozen model (reference, reward with zero_stage 3): weights partitioned over the ranks, no
    optimizer; DeepSpeed still asks for batch sizes, which only forwards use here."""
    return {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == "bfloat16"}}
