"""Model and tokenizer helpers shared by every role.

Every model is an HF-format directory opened with `from_pretrained` (safetensors only, remote code off
unless the config says so). The policy and reference are causal LMs; the reward model and the critic are
`AutoModelForSequenceClassification` with one label, whose `score` head we also apply per token for values.

Batch layout (built by `rlhf_ray.batch`): prompts left-padded to P, responses right-padded to T, so the
response occupies columns P..P+T-1 and the logits predicting it sit at columns P-1..P+T-2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_ray.algos import entropy_from_logits, logprobs_from_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model directory that is missing, not HF format, or does not match its tokenizer."""


def check_model_dir(path: str | Path, what: str) -> dict:
    """An HF model directory that will load: config.json a JSON object, safetensors weights each whole (the header
    parses and the file holds every byte it promises). Returns config.json; a problem is a one-line
    ModelLoadError naming the file. Reads only headers: cheap enough to run before any actor starts."""
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{what}: directory not found: {path}")
    conf = p / "config.json"
    if not conf.is_file():
        raise ModelLoadError(f"{what}: no HF model at {path} (missing config.json)")
    try:
        config = json.loads(conf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what}: {conf} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{what}: {conf} must hold a JSON object")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{what}: {path} has no .safetensors weights (only safetensors are loaded)")
    for f in weights:
        _check_safetensors(f, what)
    return config


def _check_safetensors(f: Path, what: str) -> None:
    """The file's header (8-byte length, then JSON) parses and the file is as long as its tensors' offsets say."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n < 100 << 20:             # safetensors caps its header at 100 MB
            raise ModelLoadError(f"{what}: {f} is not a safetensors file (bad header length)")
        if n > size - 8:
            raise ModelLoadError(f"{what}: {f} is truncated ({size} bytes, inside its {n}-byte header)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{what}: {f} has a damaged safetensors header") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelLoadError(f"{what}: {f} is truncated ({size} of {expected} bytes)")


def model_context_length(config: dict) -> int | None:
    """The longest sequence a model's positions cover, from its config.json (None: unbounded or not stated)."""
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in an HF directory (pad = EOS when it has none); a directory that holds none, or a
    damaged one, is a one-line ModelLoadError."""
    from transformers import AutoTokenizer
    if not Path(path).is_dir():
        raise ModelLoadError(f"tokenizer: directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        why = " ".join(str(e).split())
        raise ModelLoadError(f"tokenizer: cannot load one from {path} ({type(e).__name__}: {why[:200]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer_matches(tokenizer, model_dir: str | Path, what: str, config: dict | None = None) -> dict:
    """One-line error when the model directory is damaged (check_model_dir, unless its `config` was read already)
    or token ids of the tokenizer would index past the model's embedding; returns the model's config.json."""
    cfg = config if config is not None else check_model_dir(model_dir, what)
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(f"{what}: tokenizer has {len(tokenizer)} tokens but {model_dir} embeds only {vocab} "
                             f"(config.json vocab_size): tokenizer and model do not match")
    return cfg


def check_same_tokenizer(tokenizer, model_dir: str | Path, what: str, trust_remote_code: bool = False) -> None:
    """A model that scores the policy's token ids (the distillation teacher) must read them as the policy does:
    the tokenizer saved in its directory maps every token to the same id as `tokenizer`, EOS included. One line
    naming the first difference otherwise; a directory with no tokenizer is refused too (nothing to check)."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(model_dir) / f).is_file() for f in files):
        raise ModelLoadError(f"{what}: no tokenizer to check against the policy's in {model_dir} (none of "
                             f"{', '.join(files)}); save the tokenizer it was trained with beside its weights")
    theirs = load_tokenizer(model_dir, trust_remote_code)
    mine, other = tokenizer.get_vocab(), theirs.get_vocab()
    differ = sorted((t for t in mine.keys() | other.keys() if mine.get(t) != other.get(t)),
                    key=lambda t: min(mine.get(t, 1 << 30), other.get(t, 1 << 30)))
    if differ:
        t = differ[0]
        raise ModelLoadError(f"{what}: its tokenizer ({model_dir}) is not the policy's: {len(differ)} of "
                             f"{len(mine | other)} tokens differ (e.g. {t!r} is id {other.get(t)} there, "
                             f"{mine.get(t)} for the policy); it scores the policy's token ids, so they must share "
                             "one tokenizer")
    if theirs.eos_token_id != tokenizer.eos_token_id:
        raise ModelLoadError(f"{what}: its tokenizer ({model_dir}) ends text with id {theirs.eos_token_id}, the "
                             f"policy's with {tokenizer.eos_token_id}: they must share one tokenizer")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """RLHF trains without dropout: it would make the PPO ratio and the KL noisy (Huang et al. 2023)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@dataclass(frozen=True)
class Quant:
    """How a model's linear layers load (bitsandbytes): none, nf4 (4-bit NormalFloat, Dettmers et al. 2023; per-block
    scales, themselves quantised with double_quant) or int8 (LLM.int8). compute_dtype: what 4-bit weights are
    dequantised to for each matmul. Embeddings, norms and the output head stay in the model's dtype."""
    kind: str = "none"
    double_quant: bool = True
    compute_dtype: str = "float32"

    @classmethod
    def of(cls, section, dtype: str, kind: str | None = None) -> "Quant":
        """From a role's config section (quantization, double_quant, compute_dtype); `kind` overrides its
        quantization (a reward source's own), the compute dtype defaults to the run's dtype."""
        return cls(kind or section.quantization, section.double_quant, section.compute_dtype or dtype)

    def hf_config(self, keep: str):
        """transformers' BitsAndBytesConfig, `keep` (the output head) unquantised; None when kind is none."""
        if self.kind == "none":
            return None
        from transformers import BitsAndBytesConfig
        if self.kind == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=self.double_quant,
                                      bnb_4bit_compute_dtype=DTYPES[self.compute_dtype], llm_int8_skip_modules=[keep])
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[keep])


NO_QUANT = Quant()


def _load_kwargs(dtype: str, trust_remote_code: bool, attn: str | None, quant: Quant, keep: str) -> dict:
    q = quant.hf_config(keep)
    return {"dtype": DTYPES[dtype], "use_safetensors": True, "trust_remote_code": trust_remote_code,
            **({"attn_implementation": attn} if attn else {}), **({"quantization_config": q} if q else {})}


def one_4bit_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every 4-bit layer in the one layout that every CPU computes with. On a CPU with AVX-512 bf16,
    bitsandbytes 0.50 repacks a Linear4bit's weight in place, on its first forward in eval mode without grad, for
    an inference kernel (nn/modules.py Linear4bit.forward, `support_avx512bf16_for_cpu`). From then on the layer
    computes in bf16 whatever compute_dtype says (~1e-2 from the fp32 matmul), its training forward runs that
    kernel too and fails in autograd, and its bytes are no longer NF4 codes that dequantize_4bit can read (the engines
    and the HF export got weights 0.34 off). So the policy's old logprobs, its training forward and the engines
    would compute with three models. Undoing the packing afterwards cannot restore the model: the repack rounds the
    block scales to bf16. So it is never allowed to start; the kernel is an inference speed-up this project forgoes
    (docs/qlora.md). A no-op on other CPUs, on GPUs, and for int8 layers."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, what: str = "policy",
                   attn: str | None = None, quant: Quant = NO_QUANT):
    from transformers import AutoModelForCausalLM
    check_model_dir(path, what)
    return one_4bit_layout(disable_dropout(AutoModelForCausalLM.from_pretrained(
        str(path), **_load_kwargs(dtype, trust_remote_code, attn, quant, "lm_head"))))


def load_scalar_model(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                      what: str = "reward", attn: str | None = None, quant: Quant = NO_QUANT):
    from transformers import AutoModelForSequenceClassification
    check_model_dir(path, what)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, **_load_kwargs(dtype, trust_remote_code, attn, quant, "score"))
    if not hasattr(model, "score"):
        raise ModelLoadError(f"{what}: {type(model).__name__} has no `score` head; expected a *ForSequenceClassification")
    return one_4bit_layout(disable_dropout(model))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int):
    """Drop the columns that are padding in every row: leading ones (left-padded prompts) and trailing ones
    (right-padded responses). Returns (input_ids, attention_mask, kept response columns). Column P-1, whose
    logits predict the first response token, is always kept. A forward on the trimmed batch gives the padded
    batch's results on every real token (positions come from the mask, padding is masked out of attention)."""
    first, end = real_span(attention_mask)
    P = input_ids.size(1) - response_len
    first, end = min(first, P - 1), max(end, P + 1)
    return input_ids[:, first:end], attention_mask[:, first:end], end - P


def real_span(attention_mask: torch.Tensor) -> tuple[int, int]:
    """[first, end) of the columns where some row has a real token."""
    cols = attention_mask.bool().any(0).nonzero()
    return (int(cols.min()), int(cols.max()) + 1) if len(cols) else (0, attention_mask.size(1))


def _pad_response(x: torch.Tensor, response_len: int) -> torch.Tensor:
    """[B, kept] -> [B, response_len], zeros on the trimmed (all-padding) columns."""
    return F.pad(x, (0, response_len - x.size(1)))


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                      temperature: float = 1.0, entropy: str | None = None):
    """Log-probabilities of the response tokens under a causal LM: [B, T]. entropy="grad" also returns the
    per-token entropy inside the autograd graph (for an entropy bonus), "detached" returns it outside the graph
    (for logging: no backward through a full-vocabulary softmax). The LM head runs on the response's
    positions only (`logits_to_keep`), and all-padding columns are trimmed first."""
    ids, mask, kept = trim_padding(input_ids, attention_mask, response_len)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                **({"logits_to_keep": kept + 1} if _accepts_logits_to_keep(model) else {}))
    logits = out.logits[:, -kept - 1:-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = _pad_response(logprobs_from_logits(logits, ids[:, -kept:]), response_len)
    if entropy is None:
        return lp
    if entropy == "detached":
        with torch.no_grad():
            return lp, _pad_response(entropy_from_logits(logits.detach()), response_len)
    return lp, _pad_response(entropy_from_logits(logits), response_len)


def _accepts_logits_to_keep(model) -> bool:
    import inspect
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _backbone_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    base = getattr(model, model.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask,
               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Critic values V(s_t) for each response position: the score head on the state before token t. [B, T].
    All-padding columns are trimmed first (their values come back as 0)."""
    ids, mask, kept = trim_padding(input_ids, attention_mask, response_len)
    hidden = _backbone_hidden(model, ids, mask)[:, -kept - 1:-1]
    return _pad_response(model.score(hidden).squeeze(-1).float(), response_len)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each whole sequence: the score head at its last real token. [B]."""
    first, end = real_span(attention_mask)                # all-padding columns change no score: trim them
    input_ids, attention_mask = input_ids[:, first:end], attention_mask[:, first:end]
    hidden = _backbone_hidden(model, input_ids, attention_mask)
    scores = model.score(hidden).squeeze(-1).float()
    # last real token: the highest column index where the mask is 1 (works for left and right padding)
    idx = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * idx).argmax(-1)
    return scores[torch.arange(scores.size(0), device=scores.device), last]
