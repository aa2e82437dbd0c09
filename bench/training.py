"""Time and peak RSS of the training-half commands on a 7B-shaped checkpoint (LLaMA-2 7B shapes, bf16).

    python bench/training.py [WORK_DIR]      (default bench/.work/training; needs ~40 GB free)

Builds the synthetic 7B checkpoint (`synth.py`), expands it `--every 4` with digests (32 -> 40 layers;
the base is then deleted to save disk), and measures, each in its own process under `/usr/bin/time -v`:

- `merge-adapter` of a rank-16 fp32 LoRA adapter on all seven linear modules of the 8 new layers
  (plain LoRA, then DoRA), followed by `verify-frozen` of the merged model against the expanded one;
- `verify-frozen --report` of a "trained" folder holding the 8 new layers perturbed (the frozen tensors
  are absent, so the audit fails by design: the figure is the report's cost over the new layers).

Prints one JSON line per run (wall seconds, peak RSS in MB, exit code). The page cache is not dropped
(the machine is shared), so reads may be warm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth

NEW_LAYERS = list(range(4, 40, 5))
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def measure(label: str, *args: str, python: bool = False) -> dict[str, object]:
    """Run `llamapro ARGS` (or `python ARGS`) under /usr/bin/time -v; print and return the figures."""
    started = time.monotonic()
    command = [sys.executable, *args] if python else [sys.executable, "-m", "llamapro_cli", *args]
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result = {
        "run": label,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
        "exit": proc.returncode,
    }
    print(json.dumps(result), flush=True)
    return result


def make_adapter(pro: Path, dest: Path, *, dora: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from llamapro_cli.checkpoint import Checkpoint

    ckpt = Checkpoint.open(pro)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in NEW_LAYERS:
        for module in LINEAR:
            out, inp = ckpt.info(f"model.layers.{layer}.{module}.weight").shape
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(16, inp, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 16, generator=gen) * 0.01
            if dora:
                tensors[f"{key}.lora_magnitude_vector"] = torch.rand(out, generator=gen) + 0.5
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "use_dora": dora,
        "target_modules": [m.split(".")[1] for m in LINEAR],
        "layers_to_transform": NEW_LAYERS,
    }
    (dest / "adapter_config.json").write_text(json.dumps(config))


def make_trained(pro: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.lora import as_tensor

    ckpt = Checkpoint.open(pro)
    tensors = {}
    for name in ckpt.weight_map:
        if any(name.startswith(f"model.layers.{i}.") for i in NEW_LAYERS):
            info = ckpt.info(name)
            value = as_tensor(bytearray(ckpt.read_bytes(name)), info.dtype, info.shape)
            tensors[name] = (value.float() + 1e-3).to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    from llamapro_cli.expand import expand

    work = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / ".work" / "training")
    work.mkdir(parents=True, exist_ok=True)
    pro = work / "pro-7b"
    if not (pro / "llamapro.json").is_file():
        base = synth.generate(synth.SHAPES["7b"], work)
        expand(base, pro, every=4, digests=True)
        shutil.rmtree(base)
    measure("python -c 'import torch' (baseline)", "-c", "import torch", python=True)
    for dora in (False, True):
        adapter, merged = work / f"adapter-{'dora' if dora else 'lora'}", work / "merged"
        make_adapter(pro, adapter, dora=dora)
        shutil.rmtree(merged, ignore_errors=True)
        label = f"merge-adapter ({'DoRA' if dora else 'LoRA'} r=16, 56 modules)"
        args = ["--model", str(pro), "--adapter", str(adapter), "--out", str(merged), "-q", "--json"]
        measure(label, "merge-adapter", *args)
        measure("verify-frozen merged", "verify-frozen", "--map", str(pro), "--trained", str(merged))
        shutil.rmtree(merged)
    trained = work / "trained-new-layers"
    if not trained.is_dir():
        make_trained(pro, trained)
    args = ["--map", str(pro), "--trained", str(trained), "--report", "-q", "--json"]
    measure("verify-frozen --report (8 new layers)", "verify-frozen", *args)


if __name__ == "__main__":
    main()
