"""Time and peak memory of the fused chunked kernels (stableopd/core/kernels.py) against naive full-logit losses.

Purpose: check the issue's targets in one run. Losses (forward + backward, all tokens valid):
  logprobs  sum_t w_t * log p(y_t) with per-token weights (the OPD / SFT term), entropy as a detached metric
  kl        sum_t KL(student || ref) over the full vocabulary (the reference-KL term)
Implementations: `naive` materialises (N, V) logits and uses log_softmax; `fused` is the per-token API
(`linear_logprobs` / `linear_kl`, any upstream gradient, the backward recomputes each chunk's logits);
`fused_sum` is `linear_logprobs_sum` / `linear_kl_sum` (token weights known up front, gradients computed
in the forward sweep). liger-kernel's chunked JSD is timed too when it is importable (it is optional).

Method: every measured call (one forward + backward) runs in a fresh subprocess, after a warm-up on tiny
shapes. CPU peak memory = the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs right
before the call; ru_maxrss where that is unavailable) minus the resident set just before the call: inputs
and torch itself are excluded, every temporary and the gradients are counted. CUDA peak =
torch.cuda.max_memory_allocated() minus the allocation before the call. Time: wall clock and, on CPU, the
process's CPU time (user + sys over all threads) for the call. On a shared box the wall time depends on how
many cores the call happened to get; the CPU time is the steadier measure of work. Implementations
alternate over `--rounds` rounds; each keeps its best times and its largest peak.
Deviations: none; the paper has no kernels.

Command: python benchmarks/bench_kernels.py [--quick] [--rounds R] [--threads T] [--n N ...] [--chunks]
         [--device cpu|cuda [--d D] [--v V] [--dtype DT]] [--json FILE]
`--device` measures one table on that device only (no scaling, chunk sweep or second device); `--json`
appends one JSON object per measured row (loss, impl, n, d, v, device, dtype, time, cpu, peak, error) to FILE
as soon as it is measured (benchmarks/gpu_check.sh reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

MIB = 2**20


def build(loss: str, n: int, d: int, v: int, device: str, dtype: str) -> dict:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, dtype)

    def rand(*shape, scale=1.0, grad=False):  # allocated once at full size: no transient copies
        t = torch.randn(*shape, generator=g).mul_(scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    t = {"h": rand(n, d, grad=True), "w": rand(v, d, scale=d**-0.5 * 3, grad=True)}
    if loss == "logprobs":
        t["y"] = torch.randint(0, v, (n,), generator=g).to(device)
        t["tw"] = torch.randn(n, generator=g).to(device)
    else:
        t["h_r"], t["w_r"] = rand(n, d), rand(v, d, scale=d**-0.5 * 3)
        t["mask"] = torch.ones(n, dtype=torch.bool, device=device)
    return t


def run_loss(loss: str, impl: str, t: dict, chunk: int) -> None:
    import torch

    from stableopd.core import kernels as K

    if impl == "naive" and loss == "logprobs":
        logp = (t["h"] @ t["w"].T).float().log_softmax(-1)  # (N, V)
        lp = logp.gather(1, t["y"][:, None])[:, 0]
        with torch.no_grad():
            _ent = -(logp.exp() * logp).sum(-1)  # same metric the fused path returns
        total = (t["tw"] * lp).sum()
    elif impl == "naive" and loss == "jsd":  # TRL's convention: m = (1 - beta) p_s + beta p_t, beta 0.5
        ls = (t["h"] @ t["w"].T).float().log_softmax(-1)  # (N, V)
        with torch.no_grad():
            lt = (t["h_r"] @ t["w_r"].T).float().log_softmax(-1)  # (N, V)
        mix = torch.logaddexp(ls, lt) - math.log(2)
        total = (
            (0.5 * (lt.exp() * (lt - mix)).sum(-1) + 0.5 * (ls.exp() * (ls - mix)).sum(-1)) * t["mask"]
        ).sum()
    elif impl == "naive":
        ls = (t["h"] @ t["w"].T).float().log_softmax(-1)  # (N, V)
        with torch.no_grad():
            lr = (t["h_r"] @ t["w_r"].T).float().log_softmax(-1)  # (N, V)
        total = ((ls.exp() * (ls - lr)).sum(-1) * t["mask"]).sum()
    elif impl == "fused" and loss == "jsd":
        total = K.linear_jsd(t["h"], t["w"], t["h_r"], t["w_r"], t["mask"], beta=0.5, chunk_size=chunk).sum()
    elif impl == "fused_sum" and loss == "jsd":
        total = K.linear_jsd_sum(t["h"], t["w"], t["h_r"], t["w_r"], t["mask"], beta=0.5, chunk_size=chunk)[0]
    elif impl == "trl":  # TRL GKD's loss on materialised logits, as GKDTrainer.compute_loss calls it
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        student = (t["h"] @ t["w"].T)[None]  # (1, N, V)
        with torch.no_grad():
            teacher = (t["h_r"] @ t["w_r"].T)[None]  # (1, N, V)
        total = GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.5, reduction="sum")
    elif impl == "fused" and loss == "logprobs":
        lp, _ent = K.linear_logprobs(t["h"], t["w"], t["y"], chunk_size=chunk)
        total = (t["tw"] * lp).sum()
    elif impl == "fused":
        total = K.linear_kl(t["h"], t["w"], t["h_r"], t["w_r"], t["mask"], chunk_size=chunk).sum()
    elif impl == "fused_sum" and loss == "logprobs":
        total = K.linear_logprobs_sum(t["h"], t["w"], t["y"], t["tw"], chunk_size=chunk)[0]
    elif impl == "fused_sum":
        total = K.linear_kl_sum(t["h"], t["w"], t["h_r"], t["w_r"], t["mask"], chunk_size=chunk)[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta 1: Liger's reverse KL(student || teacher) for the kl loss; beta 0.5 for jsd (its default)
        fn = LigerFusedLinearJSDLoss(
            beta=0.5 if loss == "jsd" else 1.0, temperature=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0
        )  # the divergence alone, no cross-entropy term
        labels = torch.zeros(t["h"].shape[0], dtype=torch.long, device=t["h"].device)  # every token valid
        total = fn(t["h"], t["w"], t["h_r"], t["w_r"], labels)  # a token mean, not a sum: same cost
    else:
        raise ValueError(impl)
    total.backward()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _hwm(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # loads BLAS / kernels on tiny shapes only; Liger's torch.compile'd chunks compile for the real shape, once,
    # as in a training run
    compiled = spec["impl"] == "liger"
    n, v = (spec["n"], spec["v"]) if compiled else (8, 64)
    warm = build(spec["loss"], n, spec["d"], v, spec["device"], spec["dtype"])
    run_loss(spec["loss"], spec["impl"], warm, 8)
    del warm
    t = build(spec["loss"], spec["n"], spec["d"], spec["v"], spec["device"], spec["dtype"])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, reset_ok = _rss(), _hwm_reset()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        run_loss(spec["loss"], spec["impl"], t, spec["chunk"])
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    sync()
    out = {"time": time.perf_counter() - start}
    if cuda:
        return {**out, "peak": torch.cuda.max_memory_allocated() - base}
    return {**out, "cpu": _cpu_seconds() - cpu_start, "peak": _hwm(reset_ok) - base}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(loss, impl, n, d, v, args, device="cpu", dtype="float32") -> dict:
    spec = {
        "loss": loss,
        "impl": impl,
        "n": n,
        "d": d,
        "v": v,
        "device": device,
        "dtype": dtype,
        "chunk": args.chunk,
        "threads": args.threads,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rounds(loss, impls, n, d, v, args, rounds, **kw) -> dict:
    """Alternate the implementations `rounds` times; keep each one's best time and largest peak."""
    # liger has divergence losses only, TRL's GKD loss is the JSD
    impls = [
        i for i in impls if not (i == "liger" and loss == "logprobs") and not (i == "trl" and loss != "jsd")
    ]
    runs = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            runs[impl].append(measure(loss, impl, n, d, v, args, **kw))
    out = {}
    for impl, rs in runs.items():
        ok = [r for r in rs if "time" in r]
        out[impl] = {k: (max if k == "peak" else min)(r[k] for r in ok) for k in ok[0]} if ok else rs[0]
    return out


def fmt(r: dict, key: str, scale: float = 1.0) -> str:
    return f"{r[key] / scale:9.2f}" if key in r else f"{r.get('error', '-'):>9}"


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:6.2f}" if key in a and key in b and b[key] else "     -"


def table(title, rows_spec, d, v, args, device="cpu", dtype="float32", impls=("naive", "fused", "fused_sum")):
    json_out = getattr(args, "json", None)
    print(f"\n{title}")
    print(
        f"{'loss':9} {'impl':10} {'N':>6} {'wall s':>9} {'cpu s':>9} {'peak MiB':>9} {'wall/naive':>10} "
        f"{'cpu/naive':>9} {'mem/naive':>9}"
    )
    results = {}
    for loss, n in rows_spec:
        rs = measure_rounds(loss, impls, n, d, v, args, args.rounds, device=device, dtype=dtype)
        for impl, r in rs.items():
            results[(loss, impl, n)] = r
            print(
                f"{loss:9} {impl:10} {n:6d} {fmt(r, 'time')} {fmt(r, 'cpu')} {fmt(r, 'peak', MIB)} "
                f"{ratio(r, rs['naive'], 'time'):>10} {ratio(r, rs['naive'], 'cpu'):>9} "
                f"{ratio(r, rs['naive'], 'peak'):>9}",
                flush=True,
            )
            if json_out:
                row = {
                    "loss": loss,
                    "impl": impl,
                    "n": n,
                    "d": d,
                    "v": v,
                    "device": device,
                    "dtype": dtype,
                    **r,
                }
                with open(json_out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return results


def scaling(results, d, vs, ns, args):
    print(f"\nPeak memory vs N and V (d={d}); slope = extra KiB per token between N={ns[0]} and N={ns[1]}")
    print(
        f"{'loss':9} {'impl':10} {'V':>7} "
        + " ".join(f"{'MiB@' + str(n):>10}" for n in ns)
        + f" {'KiB/token':>10}"
    )
    for loss in ("logprobs", "kl"):
        for impl in ("naive", "fused"):
            for v in vs:
                rs = [results.get((loss, impl, n, v)) or measure(loss, impl, n, d, v, args) for n in ns]
                cells = " ".join(fmt(r, "peak", MIB).rjust(10) for r in rs)
                slope = (
                    (rs[1]["peak"] - rs[0]["peak"]) / (ns[1] - ns[0]) / 1024
                    if all("peak" in r for r in rs)
                    else 0
                )
                print(f"{loss:9} {impl:10} {v:7d} {cells} {slope:10.1f}", flush=True)


def chunk_sweep(args, n, d, v):
    print(f"\nChunk size sweep, fused per-token API, N={n} d={d} V={v}")
    for chunk in (64, 128, 256, 512, 1024):
        args.chunk = chunk
        cells = [
            measure_rounds(loss, ("fused",), n, d, v, args, args.rounds)["fused"]
            for loss in ("logprobs", "kl")
        ]
        print(
            f"chunk {chunk:5d}: "
            + "  ".join(
                f"{loss} cpu {fmt(r, 'cpu')} s {fmt(r, 'peak', MIB)} MiB"
                for loss, r in zip(("logprobs", "kl"), cells, strict=True)
            )
        )


def main() -> None:
    from stableopd.core.kernels import DEFAULT_CHUNK_SIZE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=1024 only, one round, small scaling sizes")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per case; best time is kept")
    p.add_argument("--n", type=int, nargs="+", help="token counts of the main table (default 1024 4096)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunks", action="store_true", help="also sweep chunk sizes at N=4096")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="only one table, on this device, at --d/--v/--dtype (default: the CPU table and "
        "scaling, then the CUDA table when a GPU is present)",
    )
    p.add_argument("--d", type=int, help="hidden size with --device (default 576 on cpu, 1536 on cuda)")
    p.add_argument("--v", type=int, help="vocabulary with --device (default 49152 on cpu, 151936 on cuda)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="input dtype with --device (default float32 on cpu, bfloat16 on cuda)",
    )
    p.add_argument("--json", metavar="FILE", help="also append each measured row to FILE as one JSON line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None and (args.d or args.v or args.dtype):
        p.error("--d, --v and --dtype go with --device")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    if args.quick:
        args.rounds = 1
    ns = tuple(args.n or ((1024,) if args.quick else (1024, 4096)))
    d, v = 576, 49152
    start = time.perf_counter()
    where, precision = f"{args.threads} CPU threads", "fp32"
    if args.device:
        cuda = args.device == "cuda"
        d, v = args.d or (1536 if cuda else d), args.v or (151936 if cuda else v)
        dtype = precision = args.dtype or ("bfloat16" if cuda else "float32")
        if cuda and torch.cuda.is_available():
            where = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {where}, chunk {args.chunk}, {precision}, best of {args.rounds}")
    impls = ("naive", "fused", "fused_sum")
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        impls += ("liger",)
    except Exception:  # noqa: BLE001 - optional; any import failure means "not available here"
        print("liger-kernel not importable: its row is skipped")
    if args.device:
        rows = [(loss, n) for n in ns for loss in ("logprobs", "kl")]
        table(
            f"{args.device.upper()}, d={d}, V={v}, {dtype} inputs",
            rows,
            d,
            v,
            args,
            device=args.device,
            dtype=dtype,
            impls=impls,
        )
        print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
        return
    res = table(
        f"CPU, d={d}, V={v}", [(loss, n) for n in ns for loss in ("logprobs", "kl")], d, v, args, impls=impls
    )
    for (loss, impl, n), r in list(res.items()):
        res[(loss, impl, n, v)] = r
    if 4096 in ns:
        for loss in ("logprobs", "kl"):
            f, s, nv = res[(loss, "fused", 4096)], res[(loss, "fused_sum", 4096)], res[(loss, "naive", 4096)]
            if all("cpu" in r for r in (f, s, nv)):
                print(
                    f"target N=4096 {loss} (need memory <= 0.125, time <= 1.10 of naive): "
                    + "; ".join(
                        f"{name} memory {r['peak'] / nv['peak']:.3f}, wall {r['time'] / nv['time']:.2f}, "
                        f"cpu {r['cpu'] / nv['cpu']:.2f}"
                        for name, r in (("fused", f), ("fused_sum", s))
                    )
                )
    if not args.n:
        scaling(res, d, (v // 4, v), (256, 1024) if args.quick else (1024, 4096), args)
    if args.chunks:
        chunk_sweep(args, 4096, d, v)
    if torch.cuda.is_available():
        table(
            "CUDA, Qwen-like d=1536, V=151936, bf16 inputs",
            [(loss, n) for n in (4096, 16384) for loss in ("logprobs", "kl")],
            1536,
            151936,
            args,
            device="cuda",
            dtype="bfloat16",
        )
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
