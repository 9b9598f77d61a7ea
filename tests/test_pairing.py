"""The teacher reads the student's tokens on its own terms: its template, its end token, refused ids.

The pairs are the paper's, with tokenizers that reproduce the real special-token layouts (tests/qwen_family.py
says which public file each mirrors): a Qwen2.5-Math student with a DeepSeek-R1-Distill-Qwen teacher (same
end id, different added tokens) and with a Qwen2.5-Instruct-derived teacher (OpenThinker3: same tokens,
different end token).
"""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from stableopd.cli import app
from stableopd.config import load_config
from stableopd.core.kernels import linear_jsd, linear_kl
from stableopd.data.sources import encode_prompt
from stableopd.engine.teacher import score_targets
from stableopd.errors import UserError
from stableopd.models.pairing import end_of_turn_id, pair_tokens, stop_ids
from stableopd.models.tiny import build_tokenizer
from stableopd.stages import distill as trainer
from stableopd.stages import training
from stableopd.types import Rollout, Sample
from tests import qwen_family
from tests.push import Push

MATH_EOS, IM_START, IM_END = 151643, 151644, 151645


@pytest.fixture(scope="module")
def toks():
    return {kind: qwen_family.build(kind) for kind in qwen_family.SPECS}


def pair(toks, student: str, teacher: str, **kw):
    gen = type("Gen", (), {"eos_token_id": qwen_family.SPECS[student]["gen_eos"]})()
    return pair_tokens(
        toks[student],
        toks[teacher],
        student_stops=stop_ids(toks[student], gen),
        chat_template=True,
        names=(student, teacher),
        **kw,
    )


def test_each_model_formats_the_prompt_with_its_own_template(toks):
    student = toks["qwen_math"].decode(encode_prompt(toks["qwen_math"], "What is 2+3?"))
    teacher = toks["r1_distill"].decode(encode_prompt(toks["r1_distill"], "What is 2+3?"))
    assert student == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert teacher == "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜>"


def test_end_of_turn_is_read_off_each_template(toks):
    assert end_of_turn_id(toks["qwen_instruct"], chat_template=True) == IM_END
    assert end_of_turn_id(toks["r1_distill"], chat_template=True) == MATH_EOS  # <｜end▁of▁sentence｜>
    assert end_of_turn_id(toks["qwen_instruct"], chat_template=False) == IM_END  # its EOS
    assert end_of_turn_id(toks["qwen_math"], chat_template=False) == MATH_EOS


def test_r1_teacher_is_refused_by_default_naming_the_first_differing_id(toks):
    with pytest.raises(UserError) as exc:
        pair(toks, "qwen_math", "r1_distill")
    assert str(exc.value) == (
        "student 'qwen_math' and teacher 'r1_distill' disagree on 6 token id(s) a response can hold: id 151644 is "
        "'<|im_start|>' for the student and '<｜User｜>' for the teacher; set teacher.mismatched_tokens=suppress "
        "so the student never samples them, or pick a teacher with the student's tokens"
    )


def test_r1_teacher_with_suppression_shares_the_stop_and_bans_the_differing_ids(toks):
    p = pair(toks, "qwen_math", "r1_distill", mismatched="suppress")
    assert p.vocab_size == 151665 and p.student_stops == (MATH_EOS,)
    assert p.stop_map == {MATH_EOS: MATH_EOS} and p.swaps == () and p.identity  # both end on id 151643
    assert p.banned == (151644, 151645, 151646, 151647, 151648, 151649)
    assert all(
        toks["qwen_math"].convert_ids_to_tokens(i) == toks["r1_distill"].convert_ids_to_tokens(i)
        for i in range(151650, 151665)
    )


def test_instruct_teacher_is_scored_on_its_own_end_token(toks):
    p = pair(toks, "qwen_math", "qwen_instruct")
    assert p.banned == () and p.teacher_end == IM_END
    assert p.stop_map == {MATH_EOS: IM_END} and p.swaps == ((MATH_EOS, IM_END),)
    assert p.teacher_target([17, 18, MATH_EOS], stopped=True) == [17, 18, IM_END]
    assert p.teacher_target([17, 18, 19], stopped=False) == [17, 18, 19]  # truncated: nothing to map


def test_instruct_student_ends_on_either_stop_and_the_teacher_on_im_end(toks):
    p = pair(toks, "qwen_instruct", "qwen_instruct")
    assert p.student_stops == (MATH_EOS, IM_END) and p.stop_map == {MATH_EOS: IM_END, IM_END: IM_END}
    assert p.swaps == ()  # the student already stops on the teacher's end token: no column to exchange


def test_same_tokenizer_is_the_identity():
    p = pair_tokens(build_tokenizer(), build_tokenizer(), student_stops=[2], chat_template=True)
    assert p.identity and p.banned == () and p.stop_map == {2: 2}


def test_teacher_end_token_can_be_named_and_must_exist(toks):
    p = pair(toks, "qwen_math", "qwen_instruct", teacher_end="<|endoftext|>")
    assert p.identity
    with pytest.raises(
        UserError, match="teacher.end_token='<|eot_id|>' is not a token of teacher 'qwen_instruct'"
    ):
        pair(toks, "qwen_math", "qwen_instruct", teacher_end="<|eot_id|>")


def test_kernels_read_the_teachers_end_column_at_the_students():
    g = torch.Generator().manual_seed(0)
    v, d = 12, 6
    h, w = torch.randn(5, d, generator=g), torch.randn(v, d, generator=g)
    h_t, w_t = torch.randn(5, d, generator=g), torch.randn(v, d, generator=g)
    ls = (h @ w.T).double().log_softmax(-1)
    lt = (h_t @ w_t.T).double().log_softmax(-1)
    lt_swapped = lt[:, [0, 1, 2, 9, 4, 5, 6, 7, 8, 3, 10, 11]]  # the teacher's id 9 read at the student's 3
    kl = linear_kl(h, w, h_t, w_t, None, chunk_size=2, swap_other=[(3, 9)])
    torch.testing.assert_close(kl.double(), (ls.exp() * (ls - lt_swapped)).sum(-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kl, linear_kl(h, w, h_t, w_t, None, chunk_size=2))
    b = 0.3
    m = (1 - b) * ls.exp() + b * lt_swapped.exp()
    want = b * (lt_swapped.exp() * (lt_swapped - m.log())).sum(-1) + (1 - b) * (
        ls.exp() * (ls - m.log())
    ).sum(-1)
    torch.testing.assert_close(
        linear_jsd(h, w, h_t, w_t, None, beta=b, swap_other=[(3, 9)]).double(), want, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="swap_other"):
        linear_kl(h, w, h_t, w_t, None, swap_other=[(3, v)])


# ---- through the trainer, with Qwen-family model directories (random tiny Llamas, 151,936 rows) --------


class StopsAt:
    """A sampling backend double: every response is [17, 18] then the student's end token."""

    name = "double"

    def __init__(self, end: int):
        self.end = end

    def generate(self, prompts, params):
        return [
            [
                Sample(token_ids=[17, 18, self.end], logprobs=[-1.0, -1.0, -1.0], finish_reason="stop")
                for _ in range(params.n)
            ]
            for _ in prompts
        ]

    def sync_weights(self, model):
        pass


@pytest.fixture(scope="module")
def family_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("qwen-family"))


def paper_pair_setup(root: str, prompts_file, teacher: str, *extra: str):
    cfg = load_config(
        None,
        [
            "train.prompts_per_step=2",
            "sampling.n=2",
            "sampling.max_new_tokens=4",
            "train.eval_every=0",
            "student.device=cpu",
            "teacher.device=cpu",
            "loss.objective=opd",
            *extra,
        ],
        {
            "data.source": str(prompts_file),
            "student.name": str(qwen_family.model_dir("qwen_math", root)),
            "teacher.name": str(qwen_family.model_dir(teacher, root)),
        },
    )
    return cfg, training.prepare(cfg, student_path=None, need_teacher=True, need_ref=False)


@pytest.mark.parametrize("teacher,extra,end", [
    ("qwen_instruct", [], IM_END),
    ("r1_distill", ["teacher.mismatched_tokens=suppress"], MATH_EOS),
])  # fmt: skip
def test_a_step_scores_the_teacher_on_its_prompt_and_its_end_token(
    family_root, prompts_file, teacher, extra, end
):
    cfg, setup = paper_pair_setup(family_root, prompts_file, teacher, *extra)
    optimizer = training.make_adamw(setup.student.model.parameters(), lr=1e-3)
    _, records = trainer.train_step(
        cfg,
        setup,
        StopsAt(MATH_EOS),
        optimizer,
        1,
        objective=training.bind(trainer.objective_of(cfg), cfg, setup.vocab_size, setup.pair),
    )
    s_tok, t_tok = setup.student.tokenizer, setup.teacher.tokenizer
    for r in records:
        assert s_tok.decode(r["prompt_token_ids"]).startswith("<|im_start|>system\n")
        t_prompt = t_tok.decode(r["teacher_prompt_token_ids"])
        assert t_prompt.startswith(
            "<｜begin▁of▁sentence｜><｜User｜>"
            if teacher == "r1_distill"
            else "<|im_start|>system\nYou are Qwen"
        )
        assert r["response_token_ids"] == [17, 18] and r["stop_token_id"] == MATH_EOS
        assert r["teacher_stop_token_id"] == end
        want = score_targets(
            setup.teacher.model,
            [r["teacher_prompt_token_ids"]],
            [[17, 18, end]],
            pad_id=t_tok.pad_token_id,
            micro_batch=1,
            chunk_size=64,
            vocab_size=setup.vocab_size,
        )[0]
        assert r["teacher_logprobs"] == pytest.approx(want[:2], rel=1e-5, abs=1e-6)
    # the stop position's teacher log-prob (the last advantage term) is the teacher's own end token's
    rollouts = trainer.teacher_view(setup, [0], [Rollout.from_json(records[0])], [[17, 18, MATH_EOS]], 1)
    assert rollouts[1] == [[17, 18, end]]
    ids = torch.tensor([records[0]["teacher_prompt_token_ids"] + [17, 18]])
    with torch.no_grad():
        logits = setup.teacher.model(input_ids=ids).logits[0, -1, : setup.vocab_size].float()
    direct = float(logits.log_softmax(-1)[end])
    got = score_targets(
        setup.teacher.model,
        [records[0]["teacher_prompt_token_ids"]],
        rollouts[1],
        pad_id=t_tok.pad_token_id,
        micro_batch=1,
        chunk_size=64,
        vocab_size=setup.vocab_size,
    )[0][2]
    assert math.isclose(got, direct, rel_tol=1e-5, abs_tol=1e-6)


def test_banned_ids_are_never_sampled_and_a_backend_that_ignores_them_is_stopped(family_root, prompts_file):
    cfg, setup = paper_pair_setup(
        family_root, prompts_file, "r1_distill", "teacher.mismatched_tokens=suppress"
    )
    backend = training.build_step_backend(cfg, setup)
    params = trainer.sampling_params(cfg, 1, setup.pair)
    assert params.banned_token_ids == setup.pair.banned
    model = setup.student.model
    head, model.lm_head = model.lm_head, Push(model.lm_head, IM_START)
    try:
        out = backend.generate(setup.train_ids[:2], params)
        assert all(IM_START not in s.token_ids for samples in out for s in samples)
        assert sum(len(s.token_ids) for samples in out for s in samples) > 0
        unbanned = backend.generate(setup.train_ids[:2], trainer.sampling_params(cfg, 1))
        assert all(s.token_ids[0] == IM_START for samples in unbanned for s in samples)  # the push works
    finally:
        model.lm_head = head
    optimizer = training.make_adamw(setup.student.model.parameters(), lr=1e-3)
    with pytest.raises(
        UserError, match="produced token id 151644, which SamplingParams.banned_token_ids forbids"
    ):
        trainer.train_step(
            cfg,
            setup,
            StopsAt(IM_START),
            optimizer,
            1,
            objective=training.bind(trainer.objective_of(cfg), cfg, setup.vocab_size, setup.pair),
        )


def test_a_disagreeing_pair_is_refused_before_any_weights_load(tmp_path, prompts_file):
    root = str(tmp_path)
    student = qwen_family.model_dir("qwen_math", root, weights=False)  # tokenizer and configs, no weights
    teacher = qwen_family.model_dir("r1_distill", root, weights=False)
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--student",
            str(student),
            "--teacher",
            str(teacher),
            "--data",
            str(prompts_file),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "disagree on 6 token id(s) a response can hold: id 151644 is '<|im_start|>'" in result.output
    assert "no weights" not in result.output and not (tmp_path / "run").exists()


def test_a_vllm_teacher_engine_gets_the_teachers_prompts_and_end_token(
    family_root, prompts_file, monkeypatch
):
    from tests.vllm_double import FakeVLLM

    FakeVLLM().install(monkeypatch)
    cfg, setup = paper_pair_setup(family_root, prompts_file, "qwen_instruct", "teacher.engine=vllm")
    seen, real = [], setup.teacher_scorer.score
    setup.teacher_scorer.score = lambda p, t, **kw: seen.append((p, t)) or real(p, t, **kw)
    setup.golds = [None] * len(setup.train)  # no golden term
    optimizer = training.make_adamw(setup.student.model.parameters(), lr=1e-3)
    _, records = trainer.train_step(
        cfg,
        setup,
        StopsAt(MATH_EOS),
        optimizer,
        1,
        objective=training.bind(trainer.objective_of(cfg), cfg, setup.vocab_size, setup.pair),
    )
    prompts, targets = seen[0]
    assert prompts == [r["teacher_prompt_token_ids"] for r in records]
    assert all(
        setup.teacher.tokenizer.decode(p).startswith("<|im_start|>system\nYou are Qwen") for p in prompts
    )
    assert targets == [[17, 18, IM_END]] * len(records)


def _next_token_logprobs(model, prompt: list[int], target: list[int], vocab: int) -> torch.Tensor:
    """(T, V) full log-softmax at the positions that predict `target` after `prompt`, one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(target) - 1, :vocab].double().log_softmax(-1)


def _swapped(lt: torch.Tensor, swaps) -> torch.Tensor:
    perm = list(range(lt.shape[-1]))
    for a, b in swaps:
        perm[a], perm[b] = perm[b], perm[a]
    return lt[:, perm]


def test_validation_kl_reads_the_teacher_prompt_and_its_end_column(family_root, prompts_file):
    from stableopd.engine.teacher import reverse_kl_sums

    cfg, setup = paper_pair_setup(family_root, prompts_file, "qwen_instruct")
    s, t, v, pair = setup.student.model, setup.teacher.model, setup.vocab_size, setup.pair
    prompts, t_prompts = setup.train_ids[:2], setup.teacher_train_ids[:2]
    assert prompts[0] != t_prompts[0]
    targets = [[17, 18, MATH_EOS], [19]]
    with torch.no_grad():  # give the teacher's end token real mass, so that reading its column matters
        from stableopd.core.batch import pack, target_hidden

        h = target_hidden(t, pack(t_prompts, targets, 0, "cpu")).mean(0)  # (d,)
        t.get_output_embeddings().weight[IM_END] = 6.0 * h / h.norm() ** 2
    total, count = reverse_kl_sums(
        s,
        t,
        prompts,
        targets,
        pad_id=0,
        micro_batch=1,
        chunk_size=64,
        vocab_size=v,
        teacher_prompts=t_prompts,
        swaps=pair.swaps,
    )

    def naive(teacher_prompts, swaps) -> float:
        out = 0.0
        for p, tp, y in zip(prompts, teacher_prompts, targets):
            ls = _next_token_logprobs(s, p, y, v)
            lt = _swapped(_next_token_logprobs(t, tp, y, v), swaps)
            out += float((ls.exp() * (ls - lt)).sum())
        return out

    want = naive(t_prompts, pair.swaps)
    assert count == 4 and total == pytest.approx(want, rel=2e-4)  # fp32 kernels against fp64 logits
    for wrong in (naive(prompts, pair.swaps), naive(t_prompts, ())):  # the student's prompt; no swap
        assert abs(wrong - want) > 50 * abs(total - want)


def sharpen(model) -> None:
    """A random tiny model is nearly uniform over 151,665 ids whatever it reads; scaled logits make the
    teacher's distribution depend on its prompt."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)


def test_jsd_step_compares_with_the_teacher_on_its_own_prompt(family_root, prompts_file):
    cfg, setup = paper_pair_setup(
        family_root,
        prompts_file,
        "qwen_instruct",
        "loss.objective=jsd",
        "loss.jsd_beta=0.3",
        "loss.aggregation=token_mean",
        "loss.ref_kl_coef=0",
    )
    sharpen(setup.teacher.model)
    seen = []
    setup.teacher.model.get_decoder().register_forward_hook(
        lambda mod, args, kw, out: seen.append(kw["input_ids"]), with_kwargs=True
    )
    setup.golds = [None] * len(setup.train)  # no golden term: the decoder's inputs are the teacher's only
    optimizer = training.make_adamw(setup.student.model.parameters(), lr=1e-3)
    metrics, records = trainer.train_step(
        cfg,
        setup,
        StopsAt(MATH_EOS),
        optimizer,
        1,
        objective=training.bind(trainer.objective_of(cfg), cfg, setup.vocab_size, setup.pair),
    )
    v, b = setup.vocab_size, 0.3
    assert all(r["teacher_stop_token_id"] == IM_END for r in records)
    # the same JSD value from full logits, with a fresh copy of the student as it was before the update
    _, fresh = paper_pair_setup(
        family_root,
        prompts_file,
        "qwen_instruct",
        "loss.objective=jsd",
        "loss.jsd_beta=0.3",
        "loss.aggregation=token_mean",
        "loss.ref_kl_coef=0",
    )
    sharpen(fresh.teacher.model)

    def naive(teacher_prompt_key: str) -> float:
        total, n = 0.0, 0
        for r in records:
            y = [17, 18, MATH_EOS]
            ls = _next_token_logprobs(fresh.student.model, r["prompt_token_ids"], y, v)
            lt = _swapped(
                _next_token_logprobs(fresh.teacher.model, r[teacher_prompt_key], y, v), fresh.pair.swaps
            )
            m = ((1 - b) * ls.exp() + b * lt.exp()).log()
            total += float(
                (b * (lt.exp() * (lt - m)).sum(-1) + (1 - b) * (ls.exp() * (ls - m)).sum(-1)).sum()
            )
            n += len(y)
        return total / n

    want = naive("teacher_prompt_token_ids")
    assert metrics["loss/jsd"] == pytest.approx(want, rel=5e-4)  # fp32 kernels against fp64 logits
    assert metrics["loss/opd"] is None  # the JSD is logged under its own name
    # the step's only teacher forward (the JSD inside the update, which also gives the records' teacher
    # log-probs) read the teacher's prompts
    rows = [row for ids in seen for row in ids.tolist()]
    t_prompts = {tuple(r["teacher_prompt_token_ids"]) for r in records}
    assert len(rows) == len(records)
    assert all(
        any(
            tuple(row[: len(tp)]) == tp and row[len(tp) : len(tp) + 3] == [17, 18, IM_END] for tp in t_prompts
        )
        for row in rows
    )


def test_the_teacher_context_must_hold_its_own_prompt_and_the_budget(family_root, prompts_file):
    student = qwen_family.model_dir("qwen_math", family_root)  # 512 positions
    teacher = qwen_family.model_dir("qwen_instruct", family_root, context=200)
    cfg = load_config(
        None,
        ["sampling.max_new_tokens=100", "train.eval_every=0"],
        {"data.source": str(prompts_file), "student.name": str(student), "teacher.name": str(teacher)},
    )
    with pytest.raises(
        UserError, match="prompt \\+ sampling.max_new_tokens reaches .* over the teacher's context of 200"
    ):
        training.prepare(cfg, student_path=None, need_teacher=True, need_ref=False)
