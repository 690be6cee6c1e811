"""Small SFT and ranking files cut from the tiny world's corpus, for the stage tests."""
import json
import random
import re

from rlhf_ray.tiny import corpus_text


def gold(text: str) -> float:
    """A hidden scoring function for simulated labelers: prefers answers that mention 'the' often."""
    return text.lower().split().count("the") - 0.05 * len(text.split())


def write_stage_data(out_dir, n_sft=96, n_rank=64, k=4, seed=0):
    rng = random.Random(seed)
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", corpus_text().replace("\n", " "))]
    sents = [s for s in sents if 8 <= len(s.split()) <= 24]
    rng.shuffle(sents)
    sft = out_dir / "sft.jsonl"
    with sft.open("w") as f:
        for s in sents[:n_sft]:
            w = s.split()
            f.write(json.dumps({"instruction": "Continue: " + " ".join(w[:4]), "input": "",
                                "output": " ".join(w[4:])}) + "\n")
    ranks = out_dir / "rankings.jsonl"
    pool = sents[n_sft:]
    with ranks.open("w") as f:
        for i in range(n_rank):
            responses = pool[i * k:(i + 1) * k]
            scores = [gold(r) for r in responses]
            ranking = sorted(range(k), key=lambda j: -scores[j])
            f.write(json.dumps({"prompt": f"Say something about topic {i}.", "responses": responses,
                                "ranking": ranking}) + "\n")
    return {"sft": str(sft), "rankings": str(ranks)}
