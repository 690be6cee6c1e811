"""The teacher of on-policy distillation: a frozen causal LM (models.teacher) sharing the policy's tokenizer, scoring
every token the policy sampled, as the reference does (docs/algorithms.md, "On-policy distillation")."""
from __future__ import annotations

import ray

from actors.reference import Reference


class Teacher(Reference):
    role = "teacher"

    def model_dir(self) -> str:
        return self.cfg.models.teacher


TeacherActor = ray.remote(Teacher)
