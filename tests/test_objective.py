"""The objective decides in one place which models a run loads, which loss terms run, their weights and the
names they are logged under (stableopd/engine/objective.py); the stages and the update read it from there."""

import math

import pytest

from stableopd.config import LossConfig, load_config
from stableopd.engine.objective import Objective
from stableopd.stages import distill, sft, training

# (objective, loads the teacher, loads the reference, golden term, on-policy term's metric): the paper's
# objectives (OPD; StableOPD = OPD + lambda_gold SFT + beta_kl KL to the initial student), the JSD
# variant with the KL constraint, and SFT alone
TABLE = [
    ("opd", True, False, False, "loss/opd"),
    ("stableopd", True, True, True, "loss/opd"),
    ("jsd", True, True, False, "loss/jsd"),
    ("sft", False, False, True, None),
]


@pytest.mark.parametrize(("name", "teacher", "ref", "gold", "metric"), TABLE)
def test_each_objective_runs_its_terms_and_needs_its_models(name, teacher, ref, gold, metric):
    obj = Objective(name=name, gold_coef=0.1, ref_kl_coef=0.01)
    assert (obj.needs_teacher, obj.uses_ref, obj.uses_gold, obj.policy_metric) == (teacher, ref, gold, metric)
    assert obj.teacher_in_update == (name == "jsd")
    assert [m for m, _ in obj.terms()] == [m for m, on in ((metric, True), ("loss/gold_sft", gold),
                                                           ("loss/ref_kl", ref)) if m and on]  # fmt: skip


def test_a_zero_coefficient_turns_its_term_and_its_model_off():
    obj = Objective(name="stableopd", gold_coef=0.0, ref_kl_coef=0.0)
    assert not obj.uses_ref and not obj.uses_gold and [m for m, _ in obj.terms()] == ["loss/opd"]


def test_the_total_weighs_the_running_terms_and_nothing_else():
    nan = math.nan  # a term that does not run cannot poison the total
    losses = {"loss/opd": 0.5, "loss/jsd": 7.0, "loss/gold_sft": 2.0, "loss/ref_kl": 0.3}
    assert Objective(name="stableopd", gold_coef=0.1, ref_kl_coef=0.01).total(losses) == pytest.approx(0.703)
    assert (
        Objective(name="opd", gold_coef=0.1, ref_kl_coef=0.01).total({**losses, "loss/gold_sft": nan}) == 0.5
    )
    assert Objective(name="jsd", ref_kl_coef=0.01).total({**losses, "loss/opd": nan}) == pytest.approx(7.003)
    assert Objective.sft(chunk_size=8, vocab_size=None).total({**losses, "loss/opd": nan}) == 2.0
    no_kl = Objective(name="stableopd", gold_coef=0.1, ref_kl_coef=0.0)
    assert no_kl.total({**losses, "loss/ref_kl": nan}) == pytest.approx(0.7)


def test_every_loss_key_reaches_the_objective():
    keys = set(LossConfig.model_fields) - {"objective"}
    assert keys <= set(Objective.__dataclass_fields__)  # a key the objective does not carry would do nothing
    lo = LossConfig(objective="jsd", advantage="power", power_alpha=3.0, adv_clip=2.0, clip_eps=0.3,
                    aggregation="token_mean", ref_kl_coef=0.2, gold_coef=0.4, jsd_beta=0.25,
                    teacher_temperature=2.0, chunk_size=7)  # fmt: skip
    several = Objective.from_loss(lo, multi_pass=True)
    assert several.name == "jsd" and all(getattr(several, k) == getattr(lo, k) for k in keys)
    assert Objective.from_loss(lo, multi_pass=False).clip_eps is None  # the clip needs a second pass


def test_binding_keeps_the_objective_and_adds_the_models_facts():
    obj = Objective(name="opd", chunk_size=9)
    bound = obj.bound(321, swaps=((1, 2),), sampler_is_policy=True)
    assert (bound.name, bound.chunk_size, bound.vocab_size, bound.teacher_swaps) == ("opd", 9, 321, ((1, 2),))
    assert bound.sampler_is_policy and not obj.sampler_is_policy


@pytest.mark.parametrize(
    ("stage", "sets", "teacher", "ref"),
    [
        (distill.DISTILL, ["loss.objective=opd"], True, False),
        (distill.DISTILL, ["loss.objective=stableopd"], True, True),
        (distill.DISTILL, ["loss.objective=stableopd", "loss.ref_kl_coef=0"], True, False),
        (distill.DISTILL, ["loss.objective=jsd"], True, True),
        (sft.SFT, ["loss.objective=stableopd"], False, False),
    ],
)
def test_a_stage_loads_the_models_its_objective_needs(tmp_path, monkeypatch, stage, sets, teacher, ref):
    asked = {}

    class Loaded(Exception):
        pass

    def spy(cfg, *, student_path, need_teacher, need_ref):
        asked.update(teacher=need_teacher, ref=need_ref)
        raise Loaded

    monkeypatch.setattr(training, "prepare", spy)
    cfg = load_config(
        None, [*sets, "logging.progress=false"], {"student.name": "tiny", "out": str(tmp_path / "r")}
    )
    with pytest.raises(Loaded):
        training.run_stage(cfg, stage)
    assert asked == {"teacher": teacher, "ref": ref}
