"""Multi-process data parallel training (DDP over gloo, 2 CPU processes launched by `accelerate launch` or
torchrun, run by the Trainer through accelerate):
masks identical on every rank, masked weights zero, pruning state saved once into the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from test_training_common import make_trainer, masked_params
    from hf_prune import PruningCallback, PruningConfig

    out, method = sys.argv[1], sys.argv[2]
    cfg = PruningConfig(method=method, sparsity=0.6, start_step=0, end_step=6, update_every=2, movement_l1=1e-3)
    cb = PruningCallback(cfg, verbose=False)
    trainer = make_trainer("llama", out, [cb], ddp_backend="gloo", max_steps=8, save_strategy="steps", save_steps=4,
                           gradient_accumulation_steps=2, max_grad_norm=1.0)
    trainer.train()
    rank = trainer.args.process_index
    params = masked_params(cb)
    tensors = {{f"mask/{{n}}": m.to(torch.uint8) for n, (w, m) in params.items()}}
    tensors.update({{f"weight/{{n}}": w.contiguous() for n, (w, m) in params.items()}})
    save_file(tensors, f"{{out}}/rank{{rank}}.safetensors")
    leaks = sum(int(torch.count_nonzero(w[~m])) for w, m in params.values())
    info = dict(rank=rank, world_size=trainer.args.world_size, history=cb.history, leaks=leaks,
                distributed=torch.distributed.is_initialized(),
                backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)
    json.dump(info, open(f"{{out}}/rank{{rank}}.json", "w"))
""")


LAUNCHERS = {
    # `accelerate launch --cpu` starts multi-CPU jobs through mpirun (not installed here); `--multi_gpu` starts the
    # processes with torchrun, and with use_cpu=True the Trainer's accelerate state runs DDP over gloo on CPU.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, launcher", [("gmp", "accelerate"), ("movement", "torchrun")])
def test_ddp_two_processes_identical_masks(tmp_path, method: str, launcher: str) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, *LAUNCHERS[launcher], str(script), str(tmp_path), method]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2] and all(i["distributed"] for i in infos)
    assert infos[0]["backend"] == "gloo"
    assert infos[0]["history"] == infos[1]["history"] and infos[0]["leaks"] == infos[1]["leaks"] == 0
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
    masks = [v for k, v in r0.items() if k.startswith("mask/")]
    kept = sum(int(m.sum()) for m in masks)
    assert 1 - kept / sum(m.numel() for m in masks) == pytest.approx(0.6, abs=2e-3)
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / "hf_prune_masks.safetensors").is_file() and (ckpt / "hf_prune_state.json").is_file()
