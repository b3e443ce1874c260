"""The README's Python quick start, on synthetic activations."""
from __future__ import annotations

import torch

import switchsae as ss


def test_quick_start_round_trip(tmp_path, acts):
    source = ss.open_activations(_save(tmp_path, acts))
    cfg = ss.SAEConfig(arch="switch", d_model=source.d_model, width=64, k=4, n_experts=4)
    sae = ss.train(cfg, source, ss.TrainConfig(steps=5, batch_size=128, normalize=True), run_dir=tmp_path / "run",
                   progress=False)
    assert ss.evaluate(sae, source.eval_batches(256), progress=False)["l0"] <= 4
    loaded = ss.load_sae(tmp_path / "run")
    x = next(source.eval_batches(8))
    code = loaded.encode(x)
    assert code.values.shape == code.indices.shape == (8, 4)
    torch.testing.assert_close(loaded.decode(code), sae(x).x_hat)


def _save(tmp_path, acts):
    from safetensors.torch import save_file

    path = tmp_path / "acts.safetensors"
    save_file({"activations": acts}, str(path))
    return path
