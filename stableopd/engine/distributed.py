"""Data-parallel distillation across processes: torch.distributed + FSDP2 (`fully_shard`) under torchrun.

    torchrun --nproc_per_node=2 -m stableopd distill --student tiny --teacher tiny-teacher --out runs/dp
    stableopd distill --nproc 2 ...        # the same: re-executes itself under torch.distributed.run

`Dist` is the one object the trainer sees. With one process (`SINGLE`) every method is a no-op or an
identity, so the single-process path is unchanged. With K processes:
- `train.prompts_per_step` is the *global* batch; rank r takes the r-th contiguous 1/K of the step's
  prompt indices (`split`), so concatenating the ranks' records gives the single-process order.
- the loss weights use global counts (`all_sum` of sequence/token counts) and FSDP's gradient divide
  factor is 1, so the summed gradient equals the single-process gradient of the same global batch.
- the student is sharded with FSDP2: each decoder layer is a unit and the whole model is the root unit,
  which holds the embeddings, the final norm and the lm_head (tied to the embeddings or not, as in
  Qwen2.5-1.5B). The chunked kernels read the head weight instead of calling the module; so the model's
  class gains a forward that also accepts `head_fn`: it runs the decoder and then `head_fn(hidden, weight)`
  (batch.head_forward), all inside one call, so FSDP's root hooks gather the root parameters for it and
  reduce-scatter their gradients after its backward.
- no-grad passes that run different numbers of forwards per rank (HF generate stops when its batch
  stops) run inside `unsharded(model)`: every unit is all-gathered once, forwards do no collectives,
  then everything is resharded. The peak of a rank is therefore the full student during sampling.
- teacher and reference are replicated on every rank, or with `train.shard_frozen` sharded the same way
  (1/K of their weights per rank). A sharded frozen model runs inside `gathered_root(model)`: its root unit
  (embeddings, norm, head) stays gathered for the block, its layers gather one at a time as its decoder
  runs, so every rank runs the same number of its forwards (validation pads with placeholder batches).
- validation prompts are split over ranks (`split`) and the records gathered in prompt order.
- metrics are reduced (sums; max for maxima) and records all-gathered, so every rank computes the same
  step metrics and guard verdicts (no rank can stop alone); only rank 0 writes files.
- checkpoints hold the consolidated student (full state dict, HF format) and an optimizer state in the
  single-process layout (integer parameter ids), so a run resumes with any K, including K = 1.

Deviations: none in the math; sums are added in another order, so K > 1 matches K = 1 to float
rounding, not bitwise (tests/test_distributed.py states the tolerance).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stableopd.errors import EXIT_DIR_ENV, UserError


def _init_root(model: nn.Module) -> None:
    """One token through the whole model, so FSDP fixes `model` as the root of its units. Otherwise, when the
    first forward to run is the decoder's alone (a scoring pass while vLLM samples), its first layer would
    become a root of its own, and the model's next forward would fail. Collective: every rank runs it."""
    from torch.distributed.fsdp import FSDPModule

    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    for m in model.modules():  # the root keeps its gathered weights after a forward: shard them again
        if isinstance(m, FSDPModule):
            m.reshard()


def _with_head_fn(model: nn.Module) -> None:
    """Give `model` a forward that also accepts `head_fn` (batch.head_forward): the decoder, then
    `head_fn(hidden (B, L, d), lm_head weight)`, in one call. FSDP's root hooks then cover the embeddings
    and the head, which the chunked kernels read as a weight instead of calling the module."""
    base = type(model)

    def forward(self, *args, head_fn=None, **kwargs):
        if head_fn is None:
            return base.forward(self, *args, **kwargs)  # generate() and every other caller
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state  # (B, L, d)
        out = head_fn(hidden, self.get_output_embeddings().weight)
        # FSDP hooks the outputs for its pre-backward; a view output would warn (and could lose the hook)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)

    model.__class__ = type(f"HeadFn{base.__name__}", (base,), {"forward": forward, "runs_head_fn": True})


@dataclass(eq=False)  # hashable: it is a dataclass default (trainer.Setup.dist)
class Dist:
    rank: int = 0
    world: int = 1
    _gathered: int = 0  # depth of nested `unsharded` blocks
    _roots: set = field(default_factory=set)  # ids of frozen models inside `gathered_root`

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data
    def split(self, items: list) -> list:
        """This rank's contiguous share of any list: the first len % K ranks take one item more, so the
        ranks' shares concatenated in rank order are `items`."""
        q, r = divmod(len(items), self.world)
        start = self.rank * q + min(self.rank, r)
        return items[start : start + q + (self.rank < r)]

    def all_sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "sum")

    def all_max(self, values: list[float]) -> list[float]:
        return self._reduce(values, "max")

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def reduce_dict(self, values: dict[str, float], max_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """Sum (or max, for `max_keys`) each key over ranks; keys may differ between ranks."""
        if not self.active:
            return values
        keys = sorted(set().union(*self.all_gather(sorted(values))))
        sums = self.all_sum([values.get(k, 0.0) if k not in max_keys else 0.0 for k in keys])
        maxes = self.all_max([values.get(k, float("-inf")) if k in max_keys else 0.0 for k in keys])
        return {k: (m if k in max_keys else s) for k, s, m in zip(keys, sums, maxes)}

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def concat(self, items: list) -> list:
        return [x for part in self.all_gather(items) for x in part]

    def device(self) -> torch.device:
        import torch.distributed as dist

        return (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # ---- model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard a trainable *ForCausalLM (a decoder with `.layers`) with FSDP2: each decoder layer is a unit,
        and the model is the root unit holding the rest (embeddings, final norm, lm_head, tied or not)."""
        if not self.active:
            return model
        from torch.distributed.fsdp import FSDPModule

        _with_head_fn(model)
        self._shard(model)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # the loss is already normalised by global counts: sum gradients over ranks, don't average
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; SUM is exact here anyway
        _init_root(model)
        return model

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """Shard a frozen model (teacher, reference) the same way; run it inside `gathered_root`."""
        if self.active:
            self._shard(model)
        return model

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        decoder = model.get_decoder()
        if not hasattr(decoder, "layers"):
            raise UserError(
                f"multi-process distill shards decoders with a .layers list; "
                f"{type(model).__name__} has none: run it with one process"
            )
        for layer in decoder.layers:
            fully_shard(layer)
        fully_shard(model)

    @contextlib.contextmanager
    def gathered_root(self, model: nn.Module | None) -> Iterator[None]:
        """A sharded frozen model's root unit (embeddings, norm, head) gathered for the block, so its head
        weight can be read; its layers still gather one at a time as its decoder runs. Collective: every
        rank enters it, and runs the same number of forwards inside."""
        from torch.distributed.fsdp import FSDPModule

        if model is None or not isinstance(model, FSDPModule) or id(model) in self._roots:
            yield
            return
        self._roots.add(id(model))
        model.unshard()
        try:
            yield
        finally:
            self._roots.discard(id(model))
            model.reshard()

    @contextlib.contextmanager
    def unsharded(self, model: nn.Module) -> Iterator[None]:
        """All parameters gathered on every rank; forwards inside issue no collectives (for generate)."""
        if not self.active or self._gathered:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        self._gathered += 1
        try:
            yield
        finally:
            self._gathered -= 1
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def sampler(self, backend, model: nn.Module):
        """`backend` whose generate runs on the gathered student (ranks may run different forward counts);
        a backend with its own copy of the weights (vLLM, synced after each update) runs as it is."""
        if not self.active or getattr(backend, "own_weights", False):
            return backend
        return _GatheredSampler(backend, self, model)

    # ---- checkpoints
    def full_states(self, model: nn.Module, optimizer) -> tuple[dict | None, dict | None]:
        """(model, optimizer) full state dicts on rank 0 (None elsewhere); collective. The optimizer state
        is in the single-process layout (parameter ids in model.parameters() order)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if not self.is_main:
            return None, None
        # a tied weight appears under each of its names; keep the first, as save_pretrained does unsharded
        first = {n for n, _ in model.named_parameters()}
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - first
        msd = {k: v for k, v in msd.items() if k not in aliases}
        ids = {n: i for i, n in enumerate(_trainable_names(model))}
        osd = {
            "state": {ids[k]: v for k, v in osd["state"].items()},
            "param_groups": [
                {
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},  # betas
                    "params": [ids[n] for n in g["params"]],
                }
                for g in osd["param_groups"]
            ],
        }
        return msd, osd

    def load_optimizer(self, model: nn.Module, optimizer, state: dict) -> None:
        """Load a single-process-layout full optimizer state (every rank holds it) into a sharded optimizer."""
        if not self.active:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _trainable_names(model)
        fqn = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Dist()


class _GatheredSampler:
    def __init__(self, backend, dist: Dist, model: nn.Module) -> None:
        self.backend, self.dist, self.model = backend, dist, model
        self.name = backend.name

    def generate(self, prompts_P, params):
        with self.dist.unsharded(self.model):
            return self.backend.generate(prompts_P, params)

    def sync_weights(self, model) -> None:
        self.backend.sync_weights(model)


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def launched_world() -> int:
    """The process count torchrun launched this process among (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_env(timeout_s: float) -> Dist:
    """`SINGLE` unless launched by torchrun (WORLD_SIZE > 1): then init the process group (nccl on CUDA,
    gloo on CPU). A collective that waits longer than `timeout_s` raises, so ranks never hang forever."""
    world = launched_world()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world)


def check_launch(world: int, cfg) -> None:
    """Refuse, before any model loads, what K > 1 processes cannot run: a global batch K does not divide, a
    sampler other than hf or vllm, vLLM engines that would span ranks, two vLLM engines per rank, and LoRA
    students."""
    if world <= 1:
        return
    if cfg.train.prompts_per_step % world:
        raise UserError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} is the global batch and must be "
            f"divisible by the {world} processes; set it to a multiple of {world} or change the "
            "process count"
        )
    backend, engine = cfg.sampling.backend, cfg.teacher.engine
    if backend not in ("hf", "vllm"):
        raise UserError(
            f"multi-process distill samples with the hf or vllm backend (got sampling.backend="
            f"{backend}); set -s sampling.backend=hf or run one process"
        )
    for key, options, used in (
        ("sampling.options", cfg.sampling.options, backend == "vllm"),
        ("teacher.engine_options", cfg.teacher.engine_options, engine == "vllm"),
    ):
        if used and int(options.get("tensor_parallel_size", 1)) != 1:
            raise UserError(
                f"{key}.tensor_parallel_size={options['tensor_parallel_size']}: with {world} "
                "processes every rank hosts its own vLLM engine on its own device; set it to 1 "
                "(or run one process for a tensor-parallel engine)"
            )
    if backend == "vllm" and engine == "vllm":
        raise UserError(
            "multi-process distill hosts one vLLM engine per rank: sampling.backend=vllm with "
            "teacher.engine=vllm would need two; set -s teacher.engine=hf or run one process"
        )
    if cfg.student.lora is not None:
        raise UserError(
            "a LoRA student (student.lora) trains in one process; run one process, or drop "
            "student.lora to shard full weights over the processes"
        )


def maybe_delay(rank: int) -> None:
    """Test hook: STABLEOPD_TEST_DELAY=RANK:SECONDS makes that rank sleep before it loads the models."""
    spec = os.environ.get("STABLEOPD_TEST_DELAY", "")
    if spec.startswith(f"{rank}:"):
        import time

        time.sleep(float(spec.split(":", 1)[1]))


def maybe_fail(rank: int, step: int) -> None:
    """Test hook: STABLEOPD_TEST_FAIL=RANK:STEP makes that rank raise at the start of that step."""
    spec = os.environ.get("STABLEOPD_TEST_FAIL")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"STABLEOPD_TEST_FAIL: rank {rank} fails at step {step}")


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m stableopd <argv>` under torch.distributed.run with `nproc` local processes.

    torchrun exits 1 whenever a rank fails; the ranks record their own exit codes (errors.record_exit_code),
    and the lowest failing rank's code is returned, so `--nproc` exits 2 on a bad config like one process."""
    import tempfile

    cmd = [
        sys.executable,
        "-m",
        "stableopd.engine.launch",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stableopd",
        *argv,
    ]
    with tempfile.TemporaryDirectory(prefix="stableopd-exit-") as exits:
        proc = subprocess.Popen(cmd, env={**os.environ, EXIT_DIR_ENV: exits})
        previous = {
            sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }  # the ranks stop cleanly; torchrun relays
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code:
            ranks = sorted(
                int(f.name.removeprefix("rank")) for f in os.scandir(exits) if f.name.startswith("rank")
            )
            if ranks:
                with open(os.path.join(exits, f"rank{ranks[0]}")) as fh:
                    code = int(fh.read().strip() or code)
    return code


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc K` / `--nproc=K`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; bytes up to GiB (and TiB), three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def memory_plan(
    student: nn.Module,
    others: list[nn.Module],
    *,
    world: int,
    micro_batch: int,
    seq_len: int,
    chunk_size: int,
    shard_frozen: bool = False,
    gathered_sampling: bool = True,
    checkpointing: bool = False,
) -> str:
    """Per-rank bytes: sharded student params, grads and AdamW moments (fp32), frozen models (replicated,
    or sharded with `shard_frozen`), and an activation estimate in the student's precision (see the formula
    in the returned text); with `checkpointing` only each layer's input is kept, plus one layer's worth."""

    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    cfg = student.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * d)
    vocab = student.get_output_embeddings().weight.shape[0]
    params = nbytes(student)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    grads = sum(
        p.numel() * p.element_size() for p in student.parameters() if p.requires_grad
    )  # LoRA: adapter only
    optim = 2 * 4 * n_train  # exp_avg + exp_avg_sq in fp32
    frozen = sum(nbytes(m) for m in others)
    elem = next(student.parameters()).element_size()  # activations are in the weights' precision
    per_token = layers * d + (12 * d + 3 * inter) if checkpointing else layers * (12 * d + 3 * inter)
    act = elem * micro_batch * seq_len * per_token + 4 * 3 * chunk_size * vocab
    rows = [
        ("student params (sharded)", params / world),
        ("student grads (sharded)", grads / world),
        ("AdamW state (sharded, fp32)", optim / world),
        (
            f"teacher + reference ({'sharded' if shard_frozen else 'replicated'})",
            frozen / world if shard_frozen else frozen,
        ),
        ("activations (estimate)", act),
    ]
    if world > 1 and gathered_sampling:  # an hf sampler runs the gathered student; vLLM keeps its own copy
        rows.append(("student gathered for sampling", params))
    lines = [f"memory plan per rank ({world} processes):" if world > 1 else "memory plan (one process):"]
    lines += [f"  {name:34s} {human_bytes(b):>10s}" for name, b in rows]
    per = "(layers d + 12 d + 3 d_ff), checkpointing" if checkpointing else "layers * (12 d + 3 d_ff)"
    lines.append(
        f"  activations ~ {elem} B * micro_batch * seq_len * {per} + 4 B * 3 * chunk * V "
        f"(micro_batch={micro_batch}, seq_len={seq_len}, layers={layers}, d={d}, d_ff={inter}, "
        f"chunk={chunk_size}, V={vocab})"
    )
    return "\n".join(lines)
