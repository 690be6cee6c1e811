"""Every random stream of a run derives from (run seed, what it is for, where: step, rank, ...), so two runs with
different run.seed share none, a resumed or replayed step repeats its own exactly, and when a stream is used (e.g.
an asynchronous rollout started early) does not change what it draws."""
from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, purpose: str, *where: int) -> int:
    """A 31-bit seed for one use of randomness: a hash of (run_seed, purpose, *where), the same in every process and
    on every machine (Python's own hash of a str is salted per process)."""
    key = repr((int(run_seed), purpose, *map(int, where))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2 ** 31 - 1)
