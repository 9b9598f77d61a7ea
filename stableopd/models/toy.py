"""Built-in toy models: small Llama models trained on `builtin:arith`, for the quickstart and the collapse.

`arith-teacher` and `arith-student` make the quickstart's world: a teacher that solves 2-digit additions
(written out digit by digit) almost always, and a smaller student that gets about a quarter of them right,
so there is something to distill. Both use the tiny family's character tokenizer (stableopd/models/tiny.py) and
are trained on golden solutions by the optimizer pass every training stage runs (`engine.update.optimizer_step`
with `Objective.sft`, the sft stage's objective), and cached
under `cache_dir()/models/` like every built-in (models.resolve_model_path, atomic; the cache name holds a
hash of the recipe, so a changed recipe is rebuilt).

The package ships every recipe's output (`SHIPPED`: the weights and a manifest of recipe keys and SHA-256
sums), so first use installs them in seconds instead of training for minutes. They were built by
tools/ship_toy_weights.py on one thread with torch's AVX2 kernels, and tests/test_shipped_models.py
rebuilds each recipe and compares the files byte for byte. With `STABLEOPD_BUILD_TOYS=1`, for a changed
recipe, or for a shipped file whose hash is wrong, the model is trained here instead.

A build is deterministic: the init seed, the data and its order are fixed by the recipe, nothing else draws
random numbers, and it runs on one thread, because float sums are ordered by the thread count (with 2
threads the student recipe ends at 10% instead of 28%). Same torch build and same CPU kernels, same
weights. torch picks its kernels by instruction set (`torch.backends.cpu.get_cpu_capability()`, overridden
by `ATEN_CPU_CAPABILITY`), and AVX-512 and AVX2 kernels round sums in another order: the build line and
toy_build.json name them.

Recipes (one thread; greedy accuracy on the 200 validation problems of `TOY_DATA`, measured with AVX-512
kernels; the shipped AVX2 builds get 96.5% for the teacher and 22% for the student, SFT loss 0.0839 instead
of 0.0653):
- `arith-teacher`: 4 layers, hidden 128, 0.62M parameters, 400 steps of 32 solutions, lr 3e-3 with
  warmup and cosine decay to 10%: 97.5%, in about 110 s.
- `arith-student`: 3 layers, hidden 96, 0.33M parameters, 250 steps: 28%, in about 40 s.
Deviations from plain `stableopd sft` (constant lr, Adam defaults), both measured, both about the
student being distillable rather than about the SFT itself:
- A schedule: it is what gets a model this small through its phase transition in a few hundred steps.
- The student ends at its peak lr (no decay) and uses Adam beta2 = 0.95. A student annealed into a sharp
  minimum (decay to 10%, beta2 0.999) lost 15-30 points in the first steps of any fresh-optimizer
  update, plain SFT at lr 1.5e-4 included, and OPD's noisier gradient never won them back; trained this
  way it gains 40+ points from OPD or StableOPD in 150 steps (examples/quickstart.yaml).

`collapse-teacher` and `collapse-student` make the world of examples/collapse.yaml, where vanilla OPD
inflates and collapses as in the paper (sections 1-4). Their solutions carry self-verification lines
("Wait, let me check.", `builtin:arith?checks=`) before the answer:
- `collapse-teacher` (the arith-teacher recipe on `COLLAPSE_TEACHER_DATA`: 0, 1-2 or 5 checks, weights
  1:2:9) writes past a 128-token budget 57% of the time at temperature 1, like the paper's teachers, and
  predicts a repeated check line with confidence. On the 200 validation problems: 99.5% greedy with room
  to finish (it always checks 5 times, so greedy at 128 tokens never reaches the answer), 69.5% sampled
  at temperature 1 with room, 26.5% within 128 tokens; built in about 220 s.
- `collapse-student` continues arith-student for 100 steps on `COLLAPSE_DATA` (0, 1 or 2 checks, weights
  3:2:1; every solution fits 128 tokens, the longest needs 117): 32.5% greedy, 16.5% sampled, about
  25 s. It starts from arith-student (built first if needed) because a student that already solves some
  problems has something to lose; the checks it has seen are its golden format, and StableOPD trains on
  the same solutions.

    stableopd distill -c examples/quickstart.yaml      # installs both on first use (seconds)
    STABLEOPD_BUILD_TOYS=1 STABLEOPD_CACHE=/tmp/c stableopd distill -c examples/quickstart.yaml   # builds them
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from stableopd.core.schedule import lr_at_step, set_lr
from stableopd.models.tiny import TinySpec

TOY_DATA = "builtin:arith?digits=2&ops=+"
# the collapse world (examples/collapse.yaml): the teacher checks its work 0, 1-2 or 5 times (weights 1:2:9),
# so 75% of its solutions run past a 128-token budget; the student's golden solutions check 0 to 2 times and
# always fit
COLLAPSE_TEACHER_DATA = TOY_DATA + "&checks=0*1,1-2*2,5*9"
COLLAPSE_DATA = TOY_DATA + "&checks=0*3,1*2,2*1"
# the weights of every recipe below, as built by it (tools/ship_toy_weights.py), with manifest.json
SHIPPED = Path(__file__).parent / "toy_weights"


@dataclass(frozen=True)
class ToyRecipe:
    spec: TinySpec  # architecture and init seed
    steps: int
    lr: float  # peak; linear warmup, then cosine decay to `final_lr_frac * lr`
    prompts_per_step: int = 32
    warmup: int = 20
    final_lr_frac: float = 0.1
    beta2: float = 0.999
    data: str = TOY_DATA
    data_seed: int = 0  # order of the golden solutions (trainer.step_indices)
    limit: int | None = None  # training examples used (None: the whole train split)
    base: str | None = None  # start from this built-in's trained weights (same spec) instead of the init


TEACHER_SPEC = TinySpec(
    hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate=256, vocab_rows=128, seed=0
)
STUDENT_SPEC = TinySpec(
    hidden_size=96, layers=3, heads=4, kv_heads=2, intermediate=256, vocab_rows=128, seed=0
)
TOY_FAMILY: dict[str, ToyRecipe] = {
    "arith-teacher": ToyRecipe(
        spec=TEACHER_SPEC,
        steps=400,
        lr=3e-3,
    ),
    "arith-student": ToyRecipe(
        spec=STUDENT_SPEC,
        steps=250,
        lr=3e-3,
        final_lr_frac=1.0,  # no decay: see the module docstring
        beta2=0.95,
    ),
    "collapse-teacher": ToyRecipe(
        spec=TEACHER_SPEC,
        data=COLLAPSE_TEACHER_DATA,
        steps=400,
        lr=3e-3,
    ),
    "collapse-student": ToyRecipe(
        spec=STUDENT_SPEC,
        base="arith-student",
        data=COLLAPSE_DATA,
        steps=100,
        lr=3e-3,
        warmup=10,
        final_lr_frac=1.0,
        beta2=0.95,
    ),
}


def recipe_key(recipe: ToyRecipe) -> str:
    """Short hash of a recipe, of the golden solutions it trains on and of its base's key: part of the cache
    directory name, so a changed recipe, a changed data generator or a changed base is rebuilt."""
    from stableopd.data.sources import load_examples

    digest = hashlib.sha256(repr(recipe).encode())
    for ex in load_examples(recipe.data, split="train", limit=recipe.limit):
        digest.update(f"{ex.prompt}\0{ex.solution}\0".encode())
    if recipe.base:
        digest.update(recipe_key(TOY_FAMILY[recipe.base]).encode())
    return digest.hexdigest()[:10]


def lr_at(recipe: ToyRecipe, step: int) -> float:
    """Learning rate of `step` (1-based): linear warmup, then cosine from `lr` down to `final_lr_frac * lr`."""
    return lr_at_step(
        recipe.lr,
        step=step,
        total=recipe.steps,
        schedule="cosine",
        warmup=recipe.warmup,
        floor=recipe.final_lr_frac,
    )


def train_on_golden(
    model, tokenizer, recipe: ToyRecipe, *, label: str, progress: bool = True
) -> dict[str, float]:
    """SFT `model` in place on the recipe's golden solutions; return the last step's metrics.

    Runs on one thread: float sums are ordered by the thread count, and the same recipe must give the same
    weights on a laptop and on a 64-core box.
    """
    import torch

    from stableopd.data.sources import encode_prompts, gold_targets, load_examples, step_indices
    from stableopd.engine.objective import Objective
    from stableopd.engine.optimizer import make_adamw
    from stableopd.engine.update import optimizer_step
    from stableopd.progress import progress_bar
    from stableopd.types import GoldSeq

    examples = load_examples(recipe.data, split="train", limit=recipe.limit)
    prompts = encode_prompts(tokenizer, examples)
    golds = gold_targets(tokenizer, examples, tokenizer.eos_token_id)
    objective = Objective.sft(chunk_size=1024, vocab_size=len(tokenizer))
    optimizer = make_adamw(model.parameters(), lr=recipe.lr, betas=(0.9, recipe.beta2))
    metrics: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            torch.random.fork_rng(devices=[]),
            progress_bar(label, recipe.steps, enabled=progress) as advance,
        ):
            torch.manual_seed(
                recipe.spec.seed
            )  # nothing draws today (no dropout); a future recipe stays seeded
            model.train()
            for step in range(1, recipe.steps + 1):
                set_lr(optimizer, lr_at(recipe, step))
                idx = step_indices(len(examples), step, recipe.prompts_per_step, recipe.data_seed)
                batch = [GoldSeq(prompt=prompts[i], target=golds[i]) for i in idx]
                metrics = optimizer_step(
                    model,
                    optimizer,
                    [],
                    batch,
                    objective,
                    pad_id=tokenizer.pad_token_id,
                    micro_batch=recipe.prompts_per_step,
                    grad_clip=1.0,
                )
                advance(1)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return metrics


def shipped_weights(name: str) -> Path | None:
    """The packaged weights of a built-in toy model, when they are the output of its current recipe.

    None when `STABLEOPD_BUILD_TOYS=1`, when the package ships none for `name`, when the recipe (or its data,
    or its base) changed since they were built (the manifest's recipe key), or when the file's SHA-256 is not
    the manifest's (a damaged install): the model is then built from its recipe."""
    if os.environ.get("STABLEOPD_BUILD_TOYS") == "1" or name not in TOY_FAMILY:
        return None
    entry = shipped_manifest().get(name)
    path = SHIPPED / f"{name}.safetensors"
    if not entry or entry["recipe_key"] != recipe_key(TOY_FAMILY[name]) or not path.is_file():
        return None
    return path if file_sha256(path) == entry["sha256"] else None


def shipped_manifest() -> dict[str, dict]:
    path = SHIPPED / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_shipped(name: str, weights: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """The build's directory with the packaged weights: the recipe's config and tokenizer (written by the same
    code a build runs), then the shipped `model.safetensors`, byte for byte."""
    from stableopd.models.tiny import build_tiny_model

    entry = shipped_manifest()[name]
    build_tiny_model(name, out_dir, spec=TOY_FAMILY[name].spec)
    shutil.copyfile(weights, out_dir / "model.safetensors")
    info = {"name": name, "recipe": asdict(TOY_FAMILY[name]), "source": "shipped", **entry}
    message = (
        f"installed {name}: weights shipped with stableopd, built by its recipe with torch {entry['torch']}'s "
        f"{entry['cpu_capability']} kernels (STABLEOPD_BUILD_TOYS=1 builds it on this machine instead)"
    )
    return _record(out_dir, info, message if progress else None)


def _record(out_dir: Path, info: dict, message: str | None) -> Path:
    """Write the entry's toy_build.json (how its weights came to be) and print `message` if there is one."""
    from stableopd.progress import console

    (out_dir / "toy_build.json").write_text(json.dumps(info, indent=1) + "\n")
    if message:
        console.print(message, highlight=False)
    return out_dir


def build_toy_model(
    name: str,
    out_dir: Path,
    *,
    recipe: ToyRecipe | None = None,
    progress: bool = True,
    resolve: Callable[[str], str] | None = None,
) -> Path:
    """Random-init the recipe's model, train it on golden solutions, save it with its tokenizer into `out_dir`.

    A built-in's default recipe installs its shipped weights instead, when they match (`shipped_weights`).
    A recipe with a base starts from `resolve(base)`, the base's model directory (loading.resolve_model_path)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stableopd.models.tiny import build_tiny_model, build_tokenizer

    shipped = shipped_weights(name) if recipe is None else None
    if shipped is not None:
        return install_shipped(name, shipped, out_dir, progress=progress)
    recipe = recipe or TOY_FAMILY[name]
    t0 = time.perf_counter()
    if recipe.base:
        if TOY_FAMILY[recipe.base].spec != recipe.spec:
            raise ValueError(f"{name}: base {recipe.base} has another architecture")
        if resolve is None:
            raise ValueError(f"{name}: a recipe with a base needs `resolve` to find the base's directory")
        # the base's trained weights, tokenizer and generation config, without its cache marker and build log
        skip = shutil.ignore_patterns("COMPLETE", "toy_build.json")
        shutil.copytree(resolve(recipe.base), out_dir, dirs_exist_ok=True, ignore=skip)
    else:
        build_tiny_model(name, out_dir, spec=recipe.spec)  # init weights (seeded) + tokenizer
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tokenizer = build_tokenizer()
    label = f"building {name} (first use only)"
    metrics = train_on_golden(model, tokenizer, recipe, label=label, progress=progress)
    model.save_pretrained(out_dir, safe_serialization=True)
    seconds = time.perf_counter() - t0
    info = {
        "name": name,
        "recipe": asdict(recipe),
        "final_sft_loss": metrics.get("loss/gold_sft"),
        "build_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels that rounded the sums
    }
    message = (
        f"built {name} in {seconds:.0f} s with torch's {info['cpu_capability']} kernels (final SFT loss "
        f"{metrics.get('loss/gold_sft', 0):.4f})"
    )
    return _record(out_dir, info, message if progress else None)
