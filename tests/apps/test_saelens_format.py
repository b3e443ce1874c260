"""The SAELens format without SAELens: export → import round trips, the files written, and the
errors for input we cannot convert. (Against a real SAELens: test_saelens_interop.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchsae.apps import saelens
from switchsae.apps.saelens import export_saelens, import_saelens
from switchsae.cli import main
from switchsae.config import ARCHS, SAEConfig
from switchsae.saes import build_sae
from switchsae.saes.io import load_sae, save_sae

D, M, K, SCALE = 16, 64, 4, 3.7


def trained_like(arch: str, encoder_bias: bool = False) -> torch.nn.Module:
    """An SAE with act_scale ≠ 1 and every weight moved off its initialisation (decoder rows kept unit norm)."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch=arch, d_model=D, width=M, k=K, n_experts=4 if arch == "switch" else 1,
                              act_scale=SCALE, hook_name="blocks.2.hook_resid_post", model_name="tiny",
                              encoder_bias=encoder_bias))
    x = batch()
    sae.init_from_data(x)
    sae(x)  # a training-mode forward sets BatchTopK's threshold
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.05 * torch.randn_like(param))
        if sae.unit_norm_decoder:  # as training keeps them
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae.eval()


def batch() -> torch.Tensor:
    return torch.randn(256, D, generator=torch.Generator().manual_seed(1)) / SCALE + 0.3


def outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        code = sae.encode(x)
        return code.to_dense(sae.cfg.width), sae.decode(code)


@pytest.mark.parametrize("arch, encoder_bias", [(arch, False) for arch in ARCHS] + [("topk", True), ("batchtopk", True)])
def test_export_then_import_gives_the_same_sae(arch, encoder_bias, tmp_path):
    sae = trained_like(arch, encoder_bias)
    save_sae(sae, tmp_path / "run")
    export_saelens(tmp_path / "run", tmp_path / "saelens")
    back = load_sae(import_saelens(tmp_path / "saelens", tmp_path / "back"))
    assert back.cfg.arch == ("jumprelu" if arch == "batchtopk" else arch)
    assert back.cfg.encoder_bias == (encoder_bias and arch == "topk")
    assert back.cfg.act_scale == 1 and back.cfg.hook_name == sae.cfg.hook_name
    x = batch()
    (z, x_hat), (z_back, x_hat_back) = outputs(sae, x), outputs(back, x)
    assert (z != 0).any()
    torch.testing.assert_close(z_back, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_back, x_hat, rtol=1e-5, atol=1e-5)


def test_cfg_json_and_weights_follow_saelens(tmp_path):
    save_sae(trained_like("topk"), tmp_path / "run")
    out = export_saelens(tmp_path / "run", tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input",
                                "normalize_activations", "rescale_acts_by_decoder_norm")} == {
        "architecture": "topk", "d_in": D, "d_sae": M, "k": K, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "rescale_acts_by_decoder_norm": False}
    assert cfg["metadata"]["sae_lens_version"] == "6.54.12"
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["model_name"]) == ("blocks.2.hook_resid_post", "tiny")
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "W_enc": (D, M), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.full((M,), 1 / SCALE))
    assert not (out / "sparsity.safetensors").exists(), "no --acts, no sparsity file"


def test_sparsity_is_log10_firing_density_on_held_out_rows(tmp_path):
    sae = trained_like("switch")
    save_sae(sae, tmp_path / "run")
    acts = torch.cat([torch.randn(900, D), batch()])  # the last 10% of rows (115) are held out
    save_file({"activations": acts}, str(tmp_path / "acts.safetensors"))
    out = export_saelens(tmp_path / "run", tmp_path / "saelens", acts=tmp_path / "acts.safetensors", batch_size=32)
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    held_out = acts[-115:]
    fired = (outputs(sae, held_out)[0] != 0).double().mean(0)
    torch.testing.assert_close(sparsity, torch.log10(fired + 1e-10).float())
    assert sparsity.shape == (M,) and -10 <= sparsity.min() and sparsity.max() <= 0


def write_saelens(folder, cfg: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


TOPK_TENSORS = {"W_enc": torch.randn(D, M), "b_enc": torch.zeros(M), "W_dec": torch.randn(M, D), "b_dec": torch.randn(D)}
SWITCH_CFG = {"architecture": "switch", "d_in": D, "d_sae": M, "k": K, "n_experts": 4}
SWITCH_TENSORS = {**TOPK_TENSORS, "W_router": torch.randn(D, 4), "b_router": torch.randn(D)}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_a_topk_encoder_bias_imports_as_ours(arch, apply_b_dec_to_input, tmp_path):
    """``ReLU(TopK((x − b_dec·a) W_enc + b_enc))`` (``a = apply_b_dec_to_input``), ``x̂ = z W_dec + b_dec``,
    written out by hand (BatchTopK: every positive pre-activation above ``topk_threshold``)."""
    gen = torch.Generator().manual_seed(3)
    tensors = {"W_enc": torch.randn(D, M, generator=gen), "b_enc": torch.randn(M, generator=gen),
               "W_dec": torch.randn(M, D, generator=gen), "b_dec": torch.randn(D, generator=gen)}
    cfg = {"architecture": arch, "d_in": D, "d_sae": M, "k": K, "apply_b_dec_to_input": apply_b_dec_to_input}
    if arch == "batchtopk":
        tensors["topk_threshold"] = torch.tensor(1.5)
    sae = load_sae(import_saelens(write_saelens(tmp_path / "sl", cfg, tensors), tmp_path / "run"))
    assert sae.cfg.encoder_bias
    x = batch() * SCALE
    pre = (x - tensors["b_dec"] * apply_b_dec_to_input) @ tensors["W_enc"] + tensors["b_enc"]
    if arch == "topk":
        top = pre.topk(K, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:
        z = pre.relu() * (pre.relu() > 1.5)
    z_ours, x_hat_ours = outputs(sae, x)
    assert (z != 0).any()
    x_hat = z @ tensors["W_dec"] + tensors["b_dec"]
    for mine, want in ((z_ours, z), (x_hat_ours, x_hat)):  # float32 error relative to the largest value
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("cfg, tensors, message", [
    ({"architecture": "transcoder", "d_in": D, "d_sae": M}, TOPK_TENSORS, "SAELens architecture 'transcoder' is not supported"),
    ({**SWITCH_CFG}, {**SWITCH_TENSORS, "b_enc": torch.ones(M)}, "has an encoder bias (max |b_enc| = 1)"),
    ({**SWITCH_CFG, "apply_b_dec_to_input": False}, SWITCH_TENSORS, "from apply_b_dec_to_input=false"),
    ({"architecture": "topk", "d_in": D, "d_sae": M, "k": K, "normalize_activations": "layer_norm"}, TOPK_TENSORS,
     "normalize_activations='layer_norm' is not supported"),
    ({"architecture": "jumprelu", "d_in": D, "d_sae": M}, TOPK_TENSORS, "'threshold' is missing"),
    ({"architecture": "topk", "d_in": D, "d_sae": M, "k": K}, {**TOPK_TENSORS, "extra": torch.zeros(1)},
     "tensors switchsae does not know: ['extra']"),
    ({"architecture": "topk", "d_in": D + 1, "d_sae": M, "k": K}, TOPK_TENSORS, "W_enc has shape (64, 16), expected (64, 17)"),
])
def test_what_cannot_be_imported_is_refused_in_one_line(tmp_path, capsys, cfg, tensors, message):
    folder = write_saelens(tmp_path / "sl", cfg, tensors)
    with pytest.raises(ValueError) as err:
        import_saelens(folder, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(folder), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_files_and_settings_without_a_saelens_field_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        import_saelens(tmp_path, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="switchsae_cfg.json is missing"):
        export_saelens(tmp_path / "no-run", tmp_path / "out")
    save_sae(build_sae(SAEConfig(arch="relu", d_model=D, width=M, l1_coeff=1.0)), tmp_path / "run")
    monkeypatch.setattr(saelens, "EXPORTABLE_FIELDS", saelens.EXPORTABLE_FIELDS - {"l1_coeff"})
    with pytest.raises(ValueError, match=r"settings \{'l1_coeff': 1.0\} have no SAELens equivalent"):
        export_saelens(tmp_path / "run", tmp_path / "out")


def test_cli_export_import_never_overwrite_without_force(tmp_path, capsys):
    save_sae(trained_like("gated"), tmp_path / "run")
    main(["export", str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "sl")])
    assert "wrote saelens SAE folder" in capsys.readouterr().out
    (tmp_path / "sl" / "sparsity.safetensors").write_bytes(b"stale")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "sl")])
    assert "already holds cfg.json" in capsys.readouterr().err
    main(["export", str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "sl"), "--force"])
    assert not (tmp_path / "sl" / "sparsity.safetensors").exists(), "--force leaves nothing of the old SAE"
    main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "back")])
    with pytest.raises(SystemExit):
        main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "back")])
    assert "pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--format", "dictionary_learning", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'dictionary_learning'" in capsys.readouterr().err
