"""Steering on a tiny random Llama with SAEs trained on its own activations (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from switchsae.apps.steer import SteerConfig, Steering, prompt_ids, steer, steer_model
from switchsae.cli import main
from switchsae.config import SAEConfig
from switchsae.saes import build_sae
from switchsae.saes.io import load_sae, save_sae
from switchsae.sources.hooks import capture, patched
from switchsae.sources.models import load_model

PROMPT = "The history of the city began with"
FEATURE = 7
LARGE = 1e4  # a shift S/act_scale ~ 200, far above the norm of the activations at the hook (~0.1)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, tiny_cache):
    """A TopK SAE (256 latents, k = 4) trained 30 steps on the tiny cache."""
    run = tmp_path_factory.mktemp("steer") / "topk"
    main(["train", "--acts", str(tiny_cache), "--arch", "topk", "--width", "256", "--k", "4", "--steps", "30",
          "--batch-size", "256", "--normalize", "--out", str(run), "--quiet"])
    return run


@pytest.fixture(scope="module")
def lm(llama_dir):
    return load_model(str(llama_dir))


@pytest.fixture(scope="module", params=["topk", "switch"])
def sae(request, topk_run, switch_run):
    return load_sae({"topk": topk_run, "switch": switch_run}[request.param])


def steered_logits(lm, sae, settings: SteerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and steered logits ``[n, vocab]`` of the prompt (one forward pass each)."""
    model, tokenizer = lm
    ids = prompt_ids(tokenizer, PROMPT)
    clean = model(input_ids=ids).logits[0]
    with patched(model, sae.cfg.hook_name, Steering(sae, settings)):
        return clean, model(input_ids=ids).logits[0]


def logit_lens(model, sae, feature: int) -> torch.Tensor:
    """``W_U (γ ⊙ W_dec[J])``: the direction's logit lens through the final RMSNorm."""
    return model.lm_head.weight @ (model.model.norm.weight * sae.W_dec[feature].detach())


def boosted_tokens(model, sae, feature: int, n: int) -> torch.Tensor:
    """The ``n`` tokens the direction's logit lens boosts most."""
    return logit_lens(model, sae, feature).topk(n).indices


def test_scale_zero_gives_exactly_the_clean_logits(lm, sae):
    clean, steered = steered_logits(lm, sae, SteerConfig(feature=FEATURE, scale=0.0))
    assert torch.equal(clean, steered)
    result = steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(feature=FEATURE, scale=0.0,
                                                                          max_new_tokens=8))
    assert result.kl == 0 and result.baseline == result.steered and result.shift_norm == 0


def test_the_first_position_stays_clean_and_the_rest_move_by_the_direction(lm, sae):
    model, tokenizer = lm
    ids = prompt_ids(tokenizer, PROMPT)
    settings = SteerConfig(feature=FEATURE, scale=3.0)
    seen = []
    with patched(model, sae.cfg.hook_name, Steering(sae, settings)):
        with patched(model, sae.cfg.hook_name, lambda act: seen.append(act) or act):  # sees the steered act
            model(input_ids=ids)
    x, steered = capture(model, sae.cfg.hook_name, ids)[0], seen[0][0]
    assert torch.equal(steered[0], x[0])
    torch.testing.assert_close(steered[1:] - x[1:], (3.0 * sae.W_dec[FEATURE] / sae.cfg.act_scale).expand_as(x[1:]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature", [0, FEATURE, 200])
def test_a_large_scale_makes_the_features_boosted_tokens_the_top_ones(lm, sae, feature):
    """Once ``S W_dec[J]`` dominates the residual stream, the final RMSNorm maps it to
    ``γ ⊙ W_dec[J] √d / ‖W_dec[J]‖`` whatever the later layers add, so the logits are its logit lens."""
    model, _ = lm
    clean, steered = steered_logits(lm, sae, SteerConfig(feature=feature, scale=LARGE))
    boosted = set(boosted_tokens(model, sae, feature, 5).tolist())
    assert all(set(row.topk(5).indices.tolist()) == boosted for row in steered[1:])
    assert torch.equal(steered[0], clean[0])  # the first position is left clean
    mass = [logits[-1].softmax(-1)[list(boosted)].sum() for logits in (clean, steered)]
    assert mass[1] > mass[0]  # (the random model's logits are small: its distributions are near uniform)


def test_a_large_scale_changes_the_continuation(lm, sae):
    result = steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(feature=FEATURE, scale=LARGE,
                                                                          max_new_tokens=8))
    assert result.steered != result.baseline and result.kl > 0
    assert result.shift_norm == pytest.approx(LARGE * float(sae.W_dec[FEATURE].detach().norm()) / sae.cfg.act_scale, rel=1e-5)
    assert result.shift_norm > 1000 * result.act_norm
    assert result.gained[0].p_steered > result.gained[0].p_clean and result.lost[0].p_steered < result.lost[0].p_clean
    # near-uniform random-model distributions, where the clean logits weigh as much as the shift's: the
    # tokens that gained most are ones the direction's logit lens boosts more than the average token
    lens = logit_lens(lm[0], sae, FEATURE)
    assert lens[[g.token_id for g in result.gained]].mean() > lens.mean() + lens.std()


def test_forcing_the_routed_expert_changes_nothing_and_another_expert_changes_the_rest(lm, switch_run):
    model, tokenizer = lm
    sae = load_sae(switch_run)
    rows = capture(model, sae.cfg.hook_name, prompt_ids(tokenizer, PROMPT))[0, 1:]
    routed = sae(rows).extras["assignment"].probs.argmax(-1)
    expert = int(routed.mode().values)
    assert 0 < int((routed != expert).sum()) < len(routed)  # both kinds of token are in the prompt
    shift = Steering(sae, SteerConfig(expert=expert)).shift(rows).norm(dim=-1)
    assert bool((shift[routed == expert] < 1e-6).all()) and bool((shift[routed != expert] > 1e-3).all())
    result = steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(expert=expert, max_new_tokens=4))
    assert result.kl > 0  # by design: scale 0 with an expert swaps the other tokens' expert


def test_sampling_uses_one_seed_for_both_runs(lm, sae):
    def sample(seed: int, scale: float = 0.0):
        settings = SteerConfig(feature=FEATURE, scale=scale, max_new_tokens=8, temperature=1.0, seed=seed)
        return steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, settings)
    first = sample(0)
    assert first.steered == first.baseline == sample(0).baseline != sample(1).baseline
    assert sample(0, LARGE).steered != first.baseline


@pytest.mark.parametrize("settings, hook, message", [
    (dict(feature=256), None, "feature 256 is out of range: this SAE has latents 0..255."),
    (dict(feature=-1), None, "feature -1 is out of range"),
    (dict(feature=1, expert=4), None, "expert 4 is out of range: this SAE has experts 0..3."),
    (dict(feature=1), "blocks.9.hook_resid_post", "Layer 9 is out of range for LlamaForCausalLM"),
])
def test_bad_features_experts_and_hooks_are_refused(lm, switch_run, settings, hook, message):
    sae = load_sae(switch_run)
    with pytest.raises(ValueError, match=message.replace(".", "\\.")):
        steer_model(sae, *lm, hook or sae.cfg.hook_name, PROMPT, SteerConfig(**settings))


def test_an_expert_needs_a_switch_sae_and_widths_must_match(lm, topk_run):
    sae = load_sae(topk_run)
    with pytest.raises(ValueError, match="--expert needs a Switch SAE; this one is topk"):
        steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(expert=0))
    narrow = build_sae(SAEConfig(arch="topk", d_model=16, width=64, k=4))
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post of this model is 32 wide, but the SAE reads 16"):
        steer_model(narrow, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(feature=0))
    with pytest.raises(ValueError, match="The prompt is empty"):
        steer_model(sae, *lm, sae.cfg.hook_name, "", SteerConfig(feature=0))
    with pytest.raises(ValueError, match="none after the first drop_first=40 positions left clean"):
        steer_model(sae, *lm, sae.cfg.hook_name, PROMPT, SteerConfig(feature=0, drop_first=40))
    with pytest.raises(ValueError, match="Nothing to steer"):
        SteerConfig(scale=3.0)


def test_a_run_without_a_model_needs_one(tmp_path, topk_run, llama_dir):
    sae = load_sae(topk_run)
    sae.cfg = sae.cfg.replace(model_name="")
    save_sae(sae, tmp_path / "run")
    with pytest.raises(ValueError, match="names no model; pass one with --model"):
        steer(tmp_path / "run", PROMPT, SteerConfig(feature=0))
    assert steer(tmp_path / "run", PROMPT, SteerConfig(feature=0, max_new_tokens=2), model=str(llama_dir)).kl == 0


def test_cli_prints_both_continuations_and_the_shift_table(switch_run, capsys):
    main(["steer", str(switch_run), "--prompt", PROMPT, "--feature", str(FEATURE), "--scale", str(LARGE),
          "--expert", "1", "--max-new-tokens", "6", "--top", "3", "--quiet"])
    out = capsys.readouterr().out
    assert f"steering feature {FEATURE} x 10000, expert 1 at blocks.1.hook_resid_post: mean |x' - x| = " in out
    assert "baseline: '" in out and "steered:  '" in out and "KL(p_clean || p_steered)" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "|  | id | token | p_clean | p_steered | change |"
    assert [row.split(" | ")[0] for row in table[1:]] == ["| gained"] * 3 + ["| lost"] * 3


@pytest.mark.parametrize("flags, message", [
    (["--feature", "999"], "feature 999 is out of range"),
    (["--feature", "1", "--expert", "7"], "expert 7 is out of range"),
    (["--scale", "2"], "Nothing to steer"),
    (["--feature", "1", "--model", "/no/such/model"], "Cannot load model '/no/such/model'"),
])
def test_cli_bad_inputs_are_one_line_errors(switch_run, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", str(switch_run), "--prompt", PROMPT, "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("switchsae steer: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_cli_refuses_a_hook_the_model_lacks(tmp_path, switch_run, capsys):
    sae = load_sae(switch_run)
    sae.cfg = sae.cfg.replace(hook_name="blocks.9.hook_resid_post")
    save_sae(sae, tmp_path / "run")
    with pytest.raises(SystemExit):
        main(["steer", str(tmp_path / "run"), "--prompt", PROMPT, "--feature", "1", "--quiet"])
    assert capsys.readouterr().err == ("switchsae steer: error: Layer 9 is out of range for LlamaForCausalLM, "
                                       "which has layers 0 to 2.\n")
