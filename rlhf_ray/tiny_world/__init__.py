"""The tiny world: what tests and measures the library offline, not part of it.

Everything a run needs, built on this machine with no hub: a tokenizer and a small causal LM pretrained on the
documentation that ships with Python (`world.py`), the hidden gold reward people would want and the noisy
simulated labelers that rank by it (`gold.py`), a stand-in LLM judge taught gold on corpus text (`judge.py`), and
two verifiable tasks (`copy_task.py` for GRPO/DAPO/GSPO, `tool_task.py` for multi-turn tool use). What they write
are ordinary HF directories and JSONL files; the library reads them as it reads a user's, and nothing under
rlhf_ray/ outside this package imports from it.
"""
