"""What HF generate() samples with in a TRL peer, read back from the trainer (benchmarks/trl_peer.py,
benchmarks/trl_grpo_peer.py): the drivers assert it equals rlhf-ray's sampling. Pure: the peers run it in the TRL
venv, imported from beside them."""

SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
OFF = {"top_h": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
       "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
       "begin_suppress_tokens": (None,), "sequence_bias": (None,), "min_new_tokens": (None, 0),
       "min_length": (None, 0), "num_beams": (None, 1), "guidance_scale": (None, 1, 1.0),
       "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,),
       "renormalize_logits": (None, False), "watermarking_config": (None,)}   # what else generate() could filter with


def effective_sampling(model, generation_config) -> dict:
    """The settings generate() samples with: the trainer's generation config merged, as generate() merges it, with
    the model's generation_config.json and transformers' defaults (unset top_k there would become 50); plus the
    names of any other logits filters left on (`other_filters`: must be empty)."""
    merged, _ = model._prepare_generation_config(generation_config)
    return {**{k: getattr(merged, k) for k in SAMPLING},
            "other_filters": sorted(k for k, off in OFF.items() if getattr(merged, k, None) not in off)}
