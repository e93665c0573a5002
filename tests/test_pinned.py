"""The numbers of a seeded `train` are pinned: a refactor must not move them.

How, on any x86-64 CPU (issue 24, and again on an Intel Xeon with AVX-512 and AMX):
the CPU kernels round by the ISA they are picked for, oneDNN's by `ONEDNN_MAX_CPU_ISA`,
ATen's own vectorised ones by `ATEN_CPU_CAPABILITY` (measured on an AMD EPYC with AVX-512:
the pin fails natively and with only ATen capped at AVX2, passes with oneDNN capped at
AVX2, and fails again with ATen at its unvectorised DEFAULT). Capping the ISA was not
enough: on an Intel Xeon (AVX-512, AMX) the pin written on the EPYC failed with both caps,
because most of the CPU convolutions here are im2col + MKL SGEMM (MKL_VERBOSE=1 shows 756
SGEMM calls against 52 oneDNN convolutions in the pinned run), and MKL dispatches by CPU
vendor and model, not by the caps (MKL_ENABLE_INSTRUCTIONS=AVX2 moved the numbers, still
off the pin). So the pin runs `train` in its own process on kernels that are the same
instructions on every x86-64 CPU with AVX2: ATen capped at AVX2, MKL in its
conditional-numerical-reproducibility branch COMPATIBLE (`MKL_CBWR`: SSE2 without the
approximate rcpps/rsqrtps, the one branch MKL documents as the same on Intel and non-Intel
CPUs), oneDNN switched off (torch.backends.mkldnn.enabled = False; its blocking follows
the CPU's cache sizes) so its convolutions go to MKL too, numpy's OpenBLAS at its Haswell
kernels, and one thread (`train`'s default). A CPU without AVX2 skips (a cap lowers the
ISA, never raises it). The pin's tolerance is as before (rel 1e-6), not a loosened one. A
golden file per CPU would only be checked on the CPUs the writer's machine has; a float64
path would pin code that trials never run.
What must hold at the machine's own (native) ISA is checked without pinning numbers:
the same seed gives bit-identical results twice in one process, and a lone network is
bit for bit its repeat in a pack. `make test` runs this file natively, then again with
this process capped at AVX2 too (`make test-isa`).

tests/golden/train_pin.json was rewritten by issue 24 (split convs on the CPU change the
rounding of packs; models/packed.py `set_convs`) and again when the pin's kernels became
MKL COMPATIBLE without oneDNN (the code's numbers did not change, the pin's kernels did) with `python tests/test_pinned.py
--write`; regenerate it only for a change that means to alter the numbers, and say so
in the commit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "train_pin.json"
ARGS = ["--image", "camera", "--image", "moon", "--size", "32", "--noise-mode", "ddpm_resample",
        "--timestep", "80", "--iterations", "6", "--report-every", "3", "--repeats", "2",
        "--seed", "3", "--quiet",
        "--stop-rule", "eswmv"]  # the rule the pin was made with (the default became holdout since)
NEW_KEYS = {"forwards"}  # keys added since the pin, not numbers it pinned
SKIP = ("seconds", "config", "machine")  # timings, the echoed config and the machine are not numbers of the seed
HERE = ["--device", "cpu"]  # the pin is of CPU kernels: on a machine with a GPU too
PIN_ISA = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1",
           "MKL_CBWR": "COMPATIBLE", "OPENBLAS_CORETYPE": "Haswell"}
# run_study.main in a process with oneDNN off (there is no environment variable for it)
PIN_MAIN = ("import sys, torch; torch.backends.mkldnn.enabled = False; import run_study; "
            "sys.exit(run_study.main(sys.argv[1:]))")


def pinned(result: dict) -> dict:
    return {k: v for k, v in result.items() if not any(s in k for s in SKIP)}


def flat(d, prefix=""):
    """(path, number) pairs of a nested result, lists by index."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {prefix: d}
    return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}/{key}").items()}


def train_at_pin_isa(out: Path) -> dict:
    """`train ARGS` in a fresh process on the pin's kernels (the env vars are read once,
    when torch and MKL load, so they cannot be set in this one)."""
    cmd = [sys.executable, "-c", PIN_MAIN, "train", *ARGS, *HERE, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **PIN_ISA}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "result.json").read_text())


def train_here(out: Path, args: list[str]) -> dict:
    import run_study  # here, so that `python tests/test_pinned.py --write` needs no sys.path
    assert run_study.main(["train", *args, *HERE, "--out", str(out)]) == 0
    return json.loads((out / "result.json").read_text())


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the pin is written for AVX2 kernels and this CPU has no AVX2 (an "
                    "ISA cap can lower the ISA, never raise it)")
def test_seeded_train_matches_its_pin(tmp_path):
    result = train_at_pin_isa(tmp_path)
    assert result["machine"]["cpu_isa"] == "AVX2"  # the caps took
    want, got = flat(json.loads(GOLDEN.read_text())), flat(pinned(result))
    # Metrics added since the pin are new keys (ES-WMV's, issue 13; `forwards`, issue 20);
    # every pinned one stays.
    new = {k for k in set(got) - set(want) if "autostop" not in k and k.rsplit("/", 1)[-1] not in NEW_KEYS}
    assert set(want) <= set(got) and not new, new
    for k, v in want.items():
        assert got[k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-6, abs=1e-9)), k


def test_seeded_train_is_exact_at_this_machines_isa(tmp_path):
    """At whatever ISA this process runs (native, or capped by `make test-isa`)."""
    first = train_here(tmp_path / "a", ARGS)
    assert pinned(train_here(tmp_path / "b", ARGS)) == pinned(first)  # bit for bit
    # Repeat 1 of each image (seed 3 + 1, packed with repeat 0) is the lone network of seed 4.
    lone = list(ARGS)
    lone[lone.index("--repeats") + 1], lone[lone.index("--seed") + 1] = "1", "4"
    alone = train_here(tmp_path / "lone", lone)["networks"]
    repeats = [n for n in first["networks"] if n["repeat"] == 1]
    assert len(repeats) == len(alone) and all(n["seed"] == 4 for n in alone)
    for packed, mine in zip(repeats, alone, strict=True):
        assert (packed["image"], packed["metrics"]) == (mine["image"], mine["metrics"])

if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(pinned(train_at_pin_isa(Path(d))), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
