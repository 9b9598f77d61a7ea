"""Config: defaults, YAML, `-s` overrides with type coercion, precedence, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from stableopd.config import Config, SamplingConfig, dump_config, load_config, parse_override
from stableopd.errors import UserError


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_documented_values():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.student.name == "tiny" and cfg.teacher.name == "tiny-teacher"
    assert cfg.data.source == "builtin:arith"
    assert (cfg.data.id_field, cfg.data.prompt_field, cfg.data.answer_field, cfg.data.solution_field) == (
        "id",
        "prompt",
        "answer",
        "solution",
    )
    assert cfg.sampling.backend == "hf" and cfg.sampling.temperature == 1.0 and cfg.sampling.top_k == 0
    assert cfg.loss.objective == "stableopd"
    assert cfg.diagnose.rep_tail_chars == 10_000 and cfg.diagnose.rep_ratio == 10.0
    assert cfg.out is None


def test_yaml_file_sets_nested_keys_and_leaves_the_rest_at_defaults(tmp_path):
    path = write(tmp_path, "sampling:\n  n: 7\n  temperature: 0.5\nloss:\n  objective: opd\nout: runs/a\n")
    cfg = load_config(path)
    assert cfg.sampling.n == 7 and cfg.sampling.temperature == 0.5
    assert cfg.loss.objective == "opd" and cfg.out == "runs/a"
    assert cfg.sampling.max_new_tokens == Config().sampling.max_new_tokens
    assert cfg.train == Config().train


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("sampling.n=3", lambda c: c.sampling.n, 3),
        ("sampling.temperature=0.25", lambda c: c.sampling.temperature, 0.25),
        ("train.lr=1e-5", lambda c: c.train.lr, 1e-5),
        ("data.shuffle=false", lambda c: c.data.shuffle, False),
        ("logging.report_to=[tensorboard,mlflow]", lambda c: c.logging.report_to, ["tensorboard", "mlflow"]),
        ("eval.pass_k=[1, 4, 8]", lambda c: c.eval.pass_k, [1, 4, 8]),
        ("data.limit=null", lambda c: c.data.limit, None),
        ("data.val_limit=null", lambda c: c.data.val_limit, None),
        ("data.system_prompt=null", lambda c: c.data.system_prompt, None),
        ("sampling.options.batch_size=4", lambda c: c.sampling.options, {"batch_size": 4}),
        ("student.name=Qwen/Qwen2.5-1.5B-Instruct", lambda c: c.student.name, "Qwen/Qwen2.5-1.5B-Instruct"),
        ("loss.ref_kl_coef=0.02", lambda c: c.loss.ref_kl_coef, 0.02),
    ],
)
def test_override_coerces_types(override, getter, expected):
    value = getter(load_config(overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        # text fields take the text as typed, not what YAML would make of it
        (
            "data.system_prompt=Solve it: show every step",
            lambda c: c.data.system_prompt,
            "Solve it: show every step",
        ),
        ("data.split=2024", lambda c: c.data.split, "2024"),
        ("student.revision=007", lambda c: c.student.revision, "007"),
        ("out=yes", lambda c: c.out, "yes"),
        ("data.system_prompt=[draft]", lambda c: c.data.system_prompt, "[draft]"),
    ],
)
def test_override_of_a_text_field_keeps_the_text(override, getter, expected):
    assert getter(load_config(overrides=[override])) == expected


def test_parse_override_splits_on_the_first_equals_sign():
    assert parse_override("data.system_prompt=a=b") == ("data.system_prompt", "a=b")
    assert parse_override("sampling.n=2") == ("sampling.n", 2)
    assert parse_override("data.system_prompt=") == ("data.system_prompt", "")


def test_precedence_flags_over_overrides_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, "student:\n  name: from-yaml\nsampling:\n  n: 2\n  seed: 5\ndata:\n  limit: 9\n")
    cfg = load_config(
        path,
        ["student.name=from-set", "sampling.n=3"],
        {"student.name": "from-flag", "data.limit": None},  # None = flag not given
    )
    assert cfg.student.name == "from-flag"  # flag > -s > yaml
    assert cfg.sampling.n == 3  # -s > yaml
    assert cfg.sampling.seed == 5  # yaml > default
    assert cfg.data.limit == 9  # an unset flag changes nothing
    assert cfg.sampling.max_new_tokens == Config().sampling.max_new_tokens  # default


def test_later_override_of_the_same_key_wins():
    assert load_config(overrides=["sampling.n=2", "sampling.n=5"]).sampling.n == 5


def test_unknown_top_level_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(UserError) as exc:
        load_config(write(tmp_path, "sampllng:\n  n: 2\n"))
    valid = ", ".join(Config.model_fields)
    assert valid.startswith("student, teacher, data, sampling, loss, train, eval, diagnose, logging")
    assert str(exc.value) == f"unknown config key 'sampllng'; valid keys here: {valid}"


def test_unknown_nested_key_names_it_and_lists_the_section_keys():
    with pytest.raises(UserError) as exc:
        load_config(overrides=["sampling.temprature=0.5"])
    valid = ", ".join(SamplingConfig.model_fields)
    assert valid.startswith("backend, n, temperature, top_p, top_k, max_new_tokens, seed, options")
    assert str(exc.value) == f"unknown config key 'sampling.temprature'; valid keys here: {valid}"


@pytest.mark.parametrize("override", ["student.engine=vllm", "student.engine_options={max_model_len: 4096}"])
def test_teacher_only_engine_keys_on_the_student_say_where_they_go(override):
    with pytest.raises(UserError) as exc:
        load_config(overrides=[override])
    key = override.split("=")[0]
    assert str(exc.value).startswith(f"config key '{key}' does not exist: ")
    assert "sampling." in str(exc.value) and "teacher.engine" in str(exc.value)
    moved = [override.replace("student.", "teacher.")] + (
        [] if "engine=" in override else ["teacher.engine=vllm"]
    )
    assert load_config(overrides=moved).teacher  # where it belongs


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("sampling.n=abc", "config key 'sampling.n': Input should be a valid integer"),
        ("sampling.n=2.5", "config key 'sampling.n'"),
        ("sampling.n=0", "config key 'sampling.n': Input should be greater than or equal to 1"),
        ("sampling.top_p=1.5", "config key 'sampling.top_p'"),
        ("loss.objective=ppo", "config key 'loss.objective'"),
        ("data.shuffle=maybe", "config key 'data.shuffle'"),
        ("eval.pass_k=[0]", "config key 'eval.pass_k'"),
        ("out=  ", "config key 'out'"),
        ("sampling=3", "config key 'sampling'"),
        # values that pass a type check but break sampling or overflow later are refused at load
        ("sampling.temperature=nan", "config key 'sampling.temperature': Input should be a finite number"),
        ("sampling.temperature=.inf", "config key 'sampling.temperature': Input should be a finite number"),
        ("sampling.temperature=0.00000001", "config key 'sampling.temperature': must be 0 (greedy)"),
        (
            "sampling.temperature=1000",
            "config key 'sampling.temperature': Input should be less than or equal",
        ),
        ("eval.temperature=-.inf", "config key 'eval.temperature'"),
        ("loss.teacher_temperature=0", "config key 'loss.teacher_temperature'"),
        (
            "sampling.max_new_tokens=100000000000000000000",
            "config key 'sampling.max_new_tokens': Input should be less than or equal to 1048576",
        ),
        (
            "sampling.top_k=99999999999",
            "config key 'sampling.top_k': Input should be less than or equal to 2147483647",
        ),
        ("sampling.n=1000000000000", "config key 'sampling.n'"),
        ("train.seed=-1", "config key 'train.seed': Input should be greater than or equal to 0"),
        ("sampling.seed=100000000000000000000", "config key 'sampling.seed'"),
        ("data.seed=1e3", "config key 'data.seed'"),
        ("train.lr=nan", "config key 'train.lr'"),
        ("train.lr=1e300", "config key 'train.lr'"),
        ("train.dist_timeout_s=1e300", "config key 'train.dist_timeout_s'"),
        ("loss.power_alpha=1e308", "config key 'loss.power_alpha'"),
        ("loss.ref_kl_coef=.nan", "config key 'loss.ref_kl_coef'"),
        ("diagnose.inflation_min_growth=.inf", "config key 'diagnose.inflation_min_growth'"),
        ("eval.pass_k=[1, 100000000000]", "config key 'eval.pass_k'"),
        ("data.max_line_mb=0", "config key 'data.max_line_mb'"),
        (
            "sampling.options={batch_size: 0}",
            "sampling.options.batch_size: Input should be greater than or equal",
        ),
        ("sampling.options={batch_size: .nan}", "sampling.options.batch_size"),
        ("sampling.options={beams: 2}", "unknown hf option 'sampling.options.beams'"),
        ("sampling.backend=vllm", None),  # the vLLM options pass without vLLM installed ...
        ("sampling.options={gpu_memory_utilization: 2}", "sampling.options.gpu_memory_utilization"),
    ],
)
def test_wrong_type_or_range_is_a_user_error_naming_the_key(override, fragment):
    if fragment is None:
        load_config(overrides=[override])
        return
    if "gpu_memory" in override:  # ... and are checked against vLLM's option model when it is the backend
        override = f"sampling={{backend: vllm, options: {override.split('=', 1)[1]}}}"
    with pytest.raises(UserError) as exc:
        load_config(overrides=[override])
    msg = str(exc.value)
    assert msg.startswith(fragment)
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.n", "bad override 'sampling.n': expected key=value, e.g. -s train.steps=10"),
        ("sampling..n=2", "bad override key 'sampling..n': use a dotted path such as loss.ref_kl_coef"),
    ],
)
def test_malformed_override(override, message):
    with pytest.raises(UserError) as exc:
        load_config(overrides=[override])
    assert str(exc.value) == message


def test_override_below_a_value_is_rejected():
    with pytest.raises(UserError, match="'n' is a value, not a section"):
        load_config(overrides=["sampling.n=2", "sampling.n.x=3"])


def test_dump_then_reload_gives_an_equal_config(tmp_path):
    cfg = load_config(
        overrides=[
            "student.name=./my model",
            "data.system_prompt=Answer: a number",
            "data.split=2024",
            "data.limit=null",
            "sampling.options={batch_size: 3}",
            "eval.pass_k=[1, 2]",
            "train.lr=3e-7",
            "out=yes",
            "diagnose.rep_ratio=2.5",
        ]
    )
    path = write(tmp_path, dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_dump_of_defaults_reloads_equal(tmp_path):
    assert load_config(write(tmp_path, dump_config(Config()))) == Config()


def test_bad_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "sampling:\n  n: [1, 2\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"config file '{path}' is not valid YAML: ")
    assert "\n" not in msg


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("just text\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value) == f"config file '{path}' must hold a mapping of sections, not {kind}"


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert str(exc.value) == f"config file '{tmp_path / 'nope.yaml'}' does not exist"


def test_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  system_prompt: r\xe9ponds\n".encode("latin-1"))
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value) == f"config file '{path}' is not UTF-8 text (line 2); save it as UTF-8"


@pytest.mark.parametrize("kind", ["directory", "device", "huge", "deep"])
def test_config_path_of_the_wrong_kind_fails_before_reading(tmp_path, kind):
    path = {
        "directory": tmp_path,
        "device": Path("/dev/zero"),
        "huge": tmp_path / "big.yaml",
        "deep": tmp_path / "deep.yaml",
    }[kind]
    if kind == "huge":
        path.write_bytes(b"#" * (2 << 20))
    if kind == "deep":
        path.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(UserError) as exc:
        load_config(path)
    expected = {
        "directory": f"config file '{path}' is a directory, not a file",
        "device": "config file '/dev/zero' is a device, not a file",
        "huge": f"config file '{path}' is 2 MiB, over the 1 MiB limit",
        "deep": f"config file '{path}' is nested too deeply to be a config",
    }[kind]
    assert str(exc.value) == expected


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "out: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(path)


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.sampling.n = 0
