"""The reward actor: scores each whole (prompt, response) with every configured source and sums
weight * score. A source is a frozen scalar-head reward model, a rule function (`module:function`), an
HTTP scorer (rlhf_ray/rewards.py) or an LLM judge on engines of its own (actors/judge.py); rule, remote and judge
sources see the decoded texts. An environment's rewards (kind env) and an agent's (kind agent) arrive with the
rollout: their column here is 0 and the driver fills it. A held-out monitor reward
model (models.monitor), when configured, is scored beside them and never enters the sum."""
from __future__ import annotations

import ray
import torch

from actors.base import FrozenRole, busy
from rlhf_ray.batch import RewardScores, RolloutBatch, response_texts, shard, shard_list
from rlhf_ray.models import Quant, load_scalar_model, load_tokenizer, sequence_scores
from rlhf_ray.rewards import combine, text_scorer


class Reward(FrozenRole):
    def __init__(self, rank: int, world_size: int, cfg, device: str):
        super().__init__(rank, world_size, device, role="reward", seed=cfg.run.seed, threads=cfg.reward.cpus_per_rank,
                         cores=cfg.reward.cpu_cores)
        self.cfg = cfg
        self.sources = cfg.reward_sources()
        self.weights = [s.weight for s in self.sources]
        self.scorers, self.tokenizer, self.monitor = [], None, None
        self._frozen(cfg.reward, cfg.train.dtype, self._load_sources)

    def _load_sources(self) -> None:
        cfg = self.cfg
        for i, src in enumerate(self.sources):
            if src.kind in ("env", "agent"):   # scored during the rollout: its column is the driver's
                self.scorers.append(("env", None))
            elif src.kind == "model":
                self._before_load()
                model = load_scalar_model(src.path, cfg.train.dtype, cfg.models.trust_remote_code,
                                          f"reward.sources[{i}]", cfg.train.attn_implementation,
                                          Quant.of(cfg.reward, cfg.train.dtype, src.quantization))
                self.scorers.append(("model", self._prepare(model)))
            else:
                if src.kind == "judge":
                    from actors.judge import JudgeScorer
                    scorer = JudgeScorer(cfg, load_tokenizer(cfg.judge.tokenizer or cfg.judge.model,
                                                             cfg.models.trust_remote_code))
                else:
                    scorer = text_scorer(src.kind, src.path, batch_size=src.batch_size, timeout_s=src.timeout_s,
                                         retries=src.retries, auth_env=src.auth_env)
                self.scorers.append(("text", scorer))
                if self.tokenizer is None:
                    self.tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.policy, cfg.models.trust_remote_code)
        if cfg.models.monitor:
            self._before_load()
            self.monitor = self._prepare(load_scalar_model(cfg.models.monitor, cfg.train.dtype,
                                                           cfg.models.trust_remote_code, "models.monitor",
                                                           cfg.train.attn_implementation,
                                                           Quant.of(cfg.reward, cfg.train.dtype,
                                                                    cfg.monitor_quantization())))

    def _model_scores(self, model, batch: RolloutBatch) -> torch.Tensor:
        return self._forward_shard(batch, lambda mb: sequence_scores(model, mb.input_ids, mb.attention_mask),
                                   self.cfg.reward.micro_batch_size)

    def attach_judge(self, engines: list) -> bool:
        """Hand the judge sources the judge engines' handles (at start, and after any actor was replaced)."""
        for _, scorer in self.scorers:
            if hasattr(scorer, "attach"):
                scorer.attach(engines)
        return True

    def judge_stats(self) -> dict:
        """Since the last call: answers judged, fallbacks, retries, the judge's mass on its labels (summed) and
        the seconds spent judging, over this rank's judge sources."""
        total: dict = {}
        for _, scorer in self.scorers:
            if hasattr(scorer, "take_stats"):
                for k, v in scorer.take_stats().items():
                    total[k] = total.get(k, 0) + v
        return total

    @busy
    def scores(self, batch: RolloutBatch, prompts: list[str] | None = None,
               extras: dict[str, list] | None = None) -> RewardScores:
        """This rank's shard's scores: each source's own, their weighted total, and the monitor's when there is
        one. Text sources get `prompts` (the data rows' prompt strings, one per sample, as written: no chat
        template) and the decoded responses; `extras`: row fields (data.reward_keys), one entry per sample, as
        keyword lists."""
        cols, texts = [], None
        for kind, scorer in self.scorers:
            if kind in ("env", "agent"):
                cols.append(torch.zeros(len(shard(batch, self.rank, self.world_size))))
                continue
            if kind == "model":
                cols.append(self._model_scores(scorer, batch))
                continue
            if texts is None:                      # decoded once for every text source
                if prompts is None:
                    raise ValueError("text reward sources need the prompt strings")
                texts = (shard_list(prompts, self.rank, self.world_size),
                         response_texts(self.tokenizer, shard(batch, self.rank, self.world_size)))
                mine = {k: shard_list(v, self.rank, self.world_size) for k, v in (extras or {}).items()}
            cols.append(torch.tensor(scorer(*texts, **mine), dtype=torch.float32))
        per_source = torch.stack(cols, dim=-1)
        monitor = self._model_scores(self.monitor, batch) if self.monitor is not None else None
        return RewardScores(combine(per_source, self.weights), per_source, monitor)


RewardActor = ray.remote(Reward)
