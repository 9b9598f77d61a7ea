"""Build every built-in toy model from its recipe and ship the weights in the package (stableopd/models/toy_weights).

Run it after changing a recipe, its data generator or a base recipe: tests/test_shipped_models.py fails until
the shipped weights are the current recipes' output again. Each model builds in a fresh cache, in its own
process, on one thread, with `STABLEOPD_BUILD_TOYS=1` and torch's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`),
which x86-64 CPUs with AVX2 or AVX-512 both run, so the rebuild test can compare bytes on either.

Command: python tools/ship_toy_weights.py [NAME ...]      (about 8 minutes for all four on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stableopd.models.toy import SHIPPED, TOY_FAMILY, file_sha256, shipped_manifest

CAPABILITY = "avx2"
# builds the toy models named on its command line, in order; prints their directories as a JSON list
BUILD = (
    "import json, sys; from stableopd.models.loading import resolve_model_path; "
    "print(json.dumps([resolve_model_path(n) for n in sys.argv[1:]]))"
)


def build_env(cache: Path) -> dict[str, str]:
    """The environment a shipped build runs in; the rebuild test uses the same one."""
    return {
        **os.environ,
        "STABLEOPD_CACHE": str(cache),
        "STABLEOPD_BUILD_TOYS": "1",
        "ATEN_CPU_CAPABILITY": CAPABILITY,
        "OMP_NUM_THREADS": "1",
    }


def build(name: str, cache: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-c", BUILD, name], env=build_env(cache), check=True, capture_output=True, text=True
    )
    return Path(json.loads(out.stdout.splitlines()[-1])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(TOY_FAMILY)}")
    args = ap.parse_args()
    unknown = set(args.names) - set(TOY_FAMILY)
    if unknown:
        ap.error(f"not a built-in toy model: {', '.join(sorted(unknown))}")
    manifest = shipped_manifest()
    SHIPPED.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names or TOY_FAMILY:
            built = build(name, Path(tmp))
            info = json.loads((built / "toy_build.json").read_text())
            if info["cpu_capability"] != CAPABILITY.upper():
                sys.exit(
                    f"{name} built with {info['cpu_capability']} kernels, not {CAPABILITY.upper()}: "
                    "this CPU cannot run them"
                )
            target = SHIPPED / f"{name}.safetensors"
            shutil.copyfile(built / "model.safetensors", target)
            manifest[name] = {
                key: info[key] for key in ("torch", "cpu_capability", "final_sft_loss", "build_seconds")
            }
            manifest[name].update(recipe_key=built.name.rsplit("-", 1)[1], sha256=file_sha256(target))
            print(
                f"{name}: {target.stat().st_size} bytes, sha256 {manifest[name]['sha256'][:12]}, "
                f"{info['build_seconds']} s",
                flush=True,
            )
    (SHIPPED / "manifest.json").write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
