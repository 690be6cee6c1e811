"""How a prompt becomes token ids, for every stage: SFT, RM and DPO data, labelling, PPO rollouts and evaluation
all call `render_prompt`, so a model is trained, scored and evaluated on exactly the prompt it samples from.

data.apply_chat_template decides the rendering: true renders the prompt as one user turn of the tokenizer's chat
template with the assistant's generation prompt (what SFT trained the model to answer); false tokenises the
raw text. Truncation keeps the prompt's end (the instruction's last words and the generation prompt).
"""
from __future__ import annotations

from rlhf_ray.data import DataError

# Used only when a tokenizer brings no chat template of its own (the tiny world's tokenizer has none).
# (HF renders templates with trim_blocks: a newline right after a block tag is dropped, so newlines are
# written as expressions.) An assistant turn ends with EOS, the token generation stops at.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template (or DEFAULT_CHAT_TEMPLATE)."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, prompt: str, chat: bool, max_tokens: int | None = None) -> list[int]:
    """The ids a model answers `prompt` from: a user turn plus the generation prompt (chat), or the raw text;
    the last `max_tokens` of them when given. An empty result is a one-line DataError naming the prompt."""
    if chat:
        ids = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[-max_tokens:] if max_tokens > 0 else []
    if not ids:
        raise DataError(f"prompt tokenises to nothing: {prompt!r}")
    return ids


def render_prompts(tokenizer, prompts: list[str], data) -> list[list[int]]:
    """`render_prompt` over a list, as the config's `data` section (apply_chat_template, max_prompt_tokens) says."""
    return [render_prompt(tokenizer, p, data.apply_chat_template, data.max_prompt_tokens) for p in prompts]


def single_token_ids(tokenizer, strings: list[str], where: str) -> list[int]:
    """Strings a turn ends on, as token ids of the policy's tokenizer: each must be exactly one token (the engines
    stop on ids; a string the model could spell in several ways would end some turns and not others). A ValueError
    naming `where` and the string otherwise."""
    ids = []
    for text in strings:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"{where}: {text!r} is {len(enc)} tokens of the policy's tokenizer, not one")
        ids += enc
    return ids
