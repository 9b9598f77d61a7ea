"""What a step optimises, decided once: which models it needs, which loss terms run, their weights and the
names they are logged under. The distill and sft stages build one and hand it to `update.accumulate`.

    opd        L_OPD                                                  (teacher)
    stableopd  L_OPD + gold_coef * L_SFT(golden) + ref_kl_coef * KL(pi_theta || pi_ref)
                                                                      (teacher, reference when ref_kl_coef > 0)
    jsd        L_JSD(teacher) + ref_kl_coef * KL(pi_theta || pi_ref)  (the teacher runs inside the update)
    sft        L_SFT(golden)                                          (no teacher, no reference)

Every term is normalised by the whole step's counts (losses.token_weights), so the total is a plain weighted
sum of the terms' values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Name = Literal["opd", "stableopd", "jsd", "sft"]
POLICY_TERM = {"opd": "opd", "stableopd": "opd", "jsd": "jsd", "sft": None}
# present in every step's metrics, null when the term does not run (the documented metric names)
ALWAYS_LOGGED = ("loss/opd", "loss/gold_sft", "loss/ref_kl")


@dataclass(frozen=True)
class Objective:
    name: Name = "stableopd"
    advantage: str = "log_ratio"
    power_alpha: float = 5.0
    adv_clip: float = 1.0
    clip_eps: float | None = None  # PPO clipping, only when a batch is trained on more than once
    aggregation: str = "seq_mean"
    ref_kl_coef: float = 0.01
    gold_coef: float = 0.1
    jsd_beta: float = 0.5
    reward_to_go: float = 0.0  # discount of the advantage's reward-to-go (losses.reward_to_go); 0 = per token
    teacher_temperature: float = 1.0
    chunk_size: int = 1024
    # facts of the loaded models, set by `bound`:
    vocab_size: int | None = None
    teacher_swaps: tuple[tuple[int, int], ...] = ()  # columns exchanged in the teacher's distribution
    # the sampler's log-probs are the trainer's own (temperature 1, no top-p / top-k, nothing banned), so the
    # one-pass OPD term can take them as pi_old and run on the forward-gradient kernel (linear_logprobs_sum)
    sampler_is_policy: bool = False

    @classmethod
    def from_loss(cls, loss: Any, *, multi_pass: bool) -> Objective:
        """From the `loss` config section; `multi_pass`: each batch is trained on more than once."""
        keys = ("advantage", "power_alpha", "adv_clip", "aggregation", "ref_kl_coef", "gold_coef", "jsd_beta")
        keys += ("reward_to_go", "teacher_temperature", "chunk_size")
        return cls(
            name=loss.objective,
            clip_eps=loss.clip_eps if multi_pass else None,
            **{k: getattr(loss, k) for k in keys},
        )

    @classmethod
    def sft(cls, *, chunk_size: int, vocab_size: int | None) -> Objective:
        """Supervised fine-tuning: the golden term alone, at weight 1."""
        return cls(name="sft", gold_coef=1.0, ref_kl_coef=0.0, chunk_size=chunk_size, vocab_size=vocab_size)

    def bound(
        self, vocab_size: int, *, swaps: tuple[tuple[int, int], ...] = (), sampler_is_policy: bool = False
    ) -> Objective:
        """This objective for the loaded models: the vocabulary both read, the teacher's swapped columns."""
        return dataclasses.replace(
            self, vocab_size=vocab_size, teacher_swaps=swaps, sampler_is_policy=sampler_is_policy
        )

    @property
    def policy_term(self) -> str | None:
        """The on-policy term: "opd", "jsd", or None (sft)."""
        return POLICY_TERM[self.name]

    @property
    def needs_teacher(self) -> bool:
        return self.policy_term is not None

    @property
    def teacher_in_update(self) -> bool:
        """The teacher's full distribution is read in the training pass (JSD), not scored before it."""
        return self.policy_term == "jsd"

    @property
    def uses_ref(self) -> bool:
        """The KL to the initial student runs (it needs the reference model)."""
        return self.name in ("stableopd", "jsd") and self.ref_kl_coef > 0

    @property
    def uses_gold(self) -> bool:
        """The SFT term on golden solutions runs."""
        return self.name in ("stableopd", "sft") and self.gold_coef > 0

    @property
    def policy_metric(self) -> str | None:
        return None if self.policy_term is None else f"loss/{self.policy_term}"

    def terms(self) -> list[tuple[str, float]]:
        """(metric, weight) of every term that runs, in the order the total adds them."""
        out = [(self.policy_metric, 1.0)] if self.policy_metric else []
        if self.uses_gold:
            out.append(("loss/gold_sft", self.gold_coef))
        if self.uses_ref:
            out.append(("loss/ref_kl", self.ref_kl_coef))
        return out

    def total(self, losses: dict[str, float]) -> float:
        """loss/total: the weighted sum of the running terms' values (a term that is off never enters it)."""
        return sum(weight * losses.get(metric, 0.0) for metric, weight in self.terms())

    def metric_names(self) -> tuple[str, ...]:
        """The loss metrics every step logs (null when off): the documented names and the policy term's."""
        extra = (
            (self.policy_metric,) if self.policy_metric and self.policy_metric not in ALWAYS_LOGGED else ()
        )
        return ALWAYS_LOGGED + extra
