"""Exact oracles for edgerlhf.ppo (CPU fp32; each value's provenance is in docs/ppo.md, "Test oracles")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from edgerlhf import ppo
from edgerlhf.config import PPOParams
from edgerlhf.errors import ConfigError

PAD, EOS, TARGET = 0, 1, 3


def t(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float64)


def tiny_tokenizer(pad_token: str = "t0") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(16)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token="t1", unk_token="t2")


def tiny_policy(params: PPOParams, seed: int = 0) -> ppo.PolicyWithValue:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=16, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return ppo.build_policy(GPT2LMHeadModel(config), params, ["c_attn", "c_proj", "c_fc"])


def toy_prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 16, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def count_target(query, query_mask, response, response_mask):
    return ((response == TARGET) & response_mask.bool()).sum(1).float()


def small_params(**overrides) -> PPOParams:
    base = {"total_episodes": 16, "batch_size": 8, "mini_batch_size": 2, "gradient_accumulation_steps": 2,
            "ppo_epochs": 2, "learning_rate": 3e-3, "response_length": 4, "temperature": 0.7,
            "logprob_chunk_size": 3, "lora_r": 4, "lora_alpha": 8, "score_norm_samples": 8, "init_kl_coef": 0.1,
            "eval_every": 1, "eval_prompts": 4}
    return PPOParams(**{**base, **overrides})


def run(params: PPOParams, seed: int = 0, **kw) -> ppo.PPOResult:
    return ppo.train_ppo(tiny_policy(params), tiny_tokenizer(), toy_prompts(), count_target, params, device="cpu",
                         seed=seed, progress=False, **kw)


# --------------------------------------------------------------------------- GAE


@pytest.mark.parametrize(
    ("lam", "adv"), [(0.5, [0.125, 0.25, 0.5]), (1.0, [0.5, 0.5, 0.5]), (0.95, [0.45125, 0.475, 0.5])])
def test_gae_gamma_one(lam, adv):
    a, g = ppo.gae(t(0, 0, 1), t(0.5, 0.5, 0.5), t(1, 1, 1), gamma=1.0, lam=lam)
    torch.testing.assert_close(a, torch.tensor([adv], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(g, a + 0.5)
    if lam == 0.5:
        torch.testing.assert_close(g, t(0.625, 0.75, 1.0))


def test_gae_discounted():
    a, g = ppo.gae(t(-0.1, 0.2, 1), t(0, 0.3, 0.6), t(1, 1, 1), gamma=0.9, lam=0.95)
    torch.testing.assert_close(a, t(0.83861, 0.782, 0.4), atol=1e-6, rtol=0)
    torch.testing.assert_close(g, a + t(0, 0.3, 0.6))


def test_gae_padded_row_equals_unpadded():
    r, v = t(-0.1, 0.2, 1), t(0, 0.3, 0.6)
    a, g = ppo.gae(r, v, t(1, 1, 1), gamma=0.9, lam=0.95)
    # garbage in the padded tail must change nothing, and pads come out 0
    rp, vp, mp = t(-0.1, 0.2, 1, 7, -3), t(0, 0.3, 0.6, 9, 4), t(1, 1, 1, 0, 0)
    ap, gp = ppo.gae(torch.cat([rp, rp]), torch.cat([vp, vp]), torch.cat([mp, mp]), gamma=0.9, lam=0.95)
    for row in range(2):
        torch.testing.assert_close(ap[row:row + 1, :3], a)
        torch.testing.assert_close(gp[row:row + 1, :3], g)
    assert ap[:, 3:].abs().sum() == 0 and gp[:, 3:].abs().sum() == 0


# --------------------------------------------------------------------------- whitening


def test_whiten_unbiased_biased_masked():
    x, ones = t(1, 2, 3, 4), t(1, 1, 1, 1)
    torch.testing.assert_close(ppo.masked_whiten(x, ones), t(-1.161895, -0.387298, 0.387298, 1.161895),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(ppo.masked_whiten(x, ones, unbiased=False),
                               t(-1.341641, -0.447214, 0.447214, 1.341641), atol=1e-6, rtol=0)
    w = ppo.masked_whiten(t(1, 2, 3, 100), t(1, 1, 1, 0))
    torch.testing.assert_close(w[:, :3], t(-1, 0, 1), atol=1e-6, rtol=0)
    assert w[0, 3] == 0
    # no mean shift: only the scale changes (reward whitening)
    s = ppo.masked_whiten(x, ones, shift_mean=False)
    torch.testing.assert_close(s - s.mean(), ppo.masked_whiten(x, ones), atol=1e-6, rtol=0)
    assert ppo.masked_mean(t(1, 2, float("inf")), t(1, 1, 0)) == 1.5


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimator_values():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k1"), torch.tensor([0.693147, -0.693147]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k3"), torch.tensor([0.193147, 0.306853]), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        ppo.kl_penalty(logp, ref, "k2")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimator_expectation(estimator):
    pi, pi_ref = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    expectation = (pi * ppo.kl_penalty(pi.log(), pi_ref.log(), estimator)).sum()
    true_kl = (pi * (pi / pi_ref).log()).sum()
    assert abs(expectation.item() - 0.143841) < 1e-6 and abs(true_kl.item() - 0.143841) < 1e-6


# --------------------------------------------------------------------------- losses


def test_clipped_policy_loss_values_and_gradients():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    logp_new = ratio.log().clone().requires_grad_(True)
    logp_old, mask = torch.zeros(1, 4), torch.ones(1, 4)
    expected = [-1.2, -0.5, 1.5, 0.8]
    for i, value in enumerate(expected):
        one = torch.zeros(1, 4)
        one[0, i] = 1
        loss, _, _ = ppo.clipped_policy_loss(logp_new, logp_old, adv, one, 0.2)
        assert abs(loss.item() - value) < 1e-6
    loss, clipfrac, approx_kl = ppo.clipped_policy_loss(logp_new, logp_old, adv, mask, 0.2)
    assert abs(loss.item() - 0.15) < 1e-6
    assert clipfrac.item() == 0.5
    assert abs(approx_kl.item() - ((ratio - 1) - ratio.log()).mean().item()) < 1e-6
    loss.backward()
    grad = logp_new.grad[0]
    assert grad[0] == 0 and grad[3] == 0  # clipped: (A>0, rho>1+eps) and (A<0, rho<1-eps)
    assert grad[1] != 0 and grad[2] != 0


def test_clipped_policy_loss_ignores_padding():
    logp_new = torch.tensor([[0.0, 500.0]], requires_grad=True)  # exp(500) overflows: must not leak as NaN
    loss, _, _ = ppo.clipped_policy_loss(logp_new, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
                                         0.2)
    loss.backward()
    assert loss.item() == -1.0 and torch.isfinite(logp_new.grad).all() and logp_new.grad[0, 1] == 0


def test_clipped_value_loss():
    for v, expected in ((0.5, 0.32), (0.1, 0.405)):
        loss, vf_clipfrac = ppo.clipped_value_loss(torch.tensor([[v]]), torch.zeros(1, 1), torch.ones(1, 1),
                                                   torch.ones(1, 1), 0.2)
        assert abs(loss.item() - expected) < 1e-6
        assert vf_clipfrac.item() == (1.0 if v == 0.5 else 0.0)


def test_adaptive_and_fixed_kl_controller():
    ctl = ppo.AdaptiveKLController(0.15, target=6, horizon=10000)
    ctl.update(12, 64)
    assert abs(ctl.value - 0.15 * math.exp(0.2 * 64 / 10000)) < 1e-12 and abs(ctl.value - 0.150192) < 1e-6
    low = ppo.AdaptiveKLController(0.15, target=6, horizon=10000)
    low.update(0.0, 64)
    assert abs(low.value - 0.15 * math.exp(-0.2 * 64 / 10000)) < 1e-12
    fixed = ppo.make_kl_controller(PPOParams(kl_control="fixed", init_kl_coef=0.3))
    fixed.update(100.0, 64)
    assert fixed.value == 0.3
    assert isinstance(ppo.make_kl_controller(PPOParams()), ppo.AdaptiveKLController)


def test_explained_variance():
    assert abs(ppo.explained_variance(t(1, 2, 3, 4), t(1, 2, 3, 3)) - 0.85) < 1e-9
    assert abs(ppo.explained_variance(t(1, 2, 3, 4, 50), t(1, 2, 3, 3, 0), t(1, 1, 1, 1, 0)) - 0.85) < 1e-9


# --------------------------------------------------------------------------- sequences and the reward index


def test_response_mask_from_positions_with_pad_equal_eos():
    # pad == eos (GPT-2): the real EOS stays in the mask, what follows it is cut
    resp, mask, has_eos = ppo.truncate_after_eos(torch.tensor([[5, 6, 1, 1], [5, 1, 7, 8], [5, 6, 7, 8]]),
                                                 eos_token_id=1, pad_token_id=1)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]
    assert resp.tolist() == [[5, 6, 1, 1], [5, 1, 1, 1], [5, 6, 7, 8]]


def test_reward_index_and_per_token_reward():
    # [pad, pad, q, q, r, r, EOS, pad] -> 6; no EOS [pad, pad, q, q, r, r, r, r] -> 7
    query_mask = torch.tensor([[0, 0, 1, 1]] * 2)
    _, response_mask, _ = ppo.truncate_after_eos(torch.tensor([[5, 6, EOS, 7], [5, 6, 7, 8]]), EOS, PAD)
    full = torch.cat([query_mask, response_mask], 1)
    assert ppo.last_valid_index(full).tolist() == [6, 7]
    # the score lands on the last valid response token, not one position late
    rewards = ppo.per_token_rewards(torch.tensor([5.0, 2.0]), torch.ones(2, 4), response_mask.float(), beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.1, 4.9, 0.0], [-0.1, -0.1, -0.1, 1.9]]))


class PositionRM(torch.nn.Module):
    """Fake RM: 100 * (token id at the last attended position) + that position."""

    def forward(self, input_ids, attention_mask):
        last = ppo.last_valid_index(attention_mask)
        token = input_ids[torch.arange(len(input_ids)), last]
        return type("Out", (), {"logits": (100 * token + last).float()[:, None]})()


def test_reward_model_score_on_repacked_input_ignores_left_padding():
    rm = PositionRM()
    score_fn = ppo.reward_model_score_fn(rm, pad_token_id=PAD)
    response = torch.tensor([[5, 6, EOS, PAD]])
    _, rmask, _ = ppo.truncate_after_eos(response, EOS, PAD)
    scores = []
    for left in (0, 2, 5):
        query, qmask = ppo.left_pad([[9, 10], [4] * (2 + left)], PAD)
        resp, rm_ = torch.cat([response, response]), torch.cat([rmask, rmask])
        scores.append(score_fn(query, qmask, resp, rm_)[0].item())
        ids, mask = ppo.repack_right_padded(query, qmask, resp, rm_, PAD)
        assert ids[0].tolist()[:5] == [9, 10, 5, 6, EOS] and mask[0].tolist()[:5] == [1] * 5
        assert score_fn(query, qmask, resp, rm_).tolist() == rm(ids, mask).logits[:, 0].tolist()
    assert scores == [100 * EOS + 4] * 3


def test_reward_model_score_matches_unpadded_sequence_classifier():
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=16, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                  num_labels=1, pad_token_id=PAD, eos_token_id=EOS)).eval()
    prompts, responses = [[9, 10, 11], [4, 5]], torch.tensor([[5, 6, EOS, 7], [12, 13, 14, 15]])
    response, rmask, _ = ppo.truncate_after_eos(responses, EOS, PAD)
    query, qmask = ppo.left_pad(prompts, PAD)
    batched = ppo.reward_model_score_fn(rm, PAD, chunk_size=1)(query, qmask, response, rmask)
    for i, prompt in enumerate(prompts):
        alone = torch.tensor([prompt + response[i][rmask[i].bool()].tolist()])
        torch.testing.assert_close(batched[i], rm(input_ids=alone).logits[0, 0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the model


def test_left_padding_with_position_ids_matches_unpadded():
    policy = tiny_policy(small_params())
    prompts, response = [[4, 5, 6, 7], [8, 9]], torch.tensor([[10, 3, EOS], [3, 11, 12]])
    _, rmask, has_eos = ppo.truncate_after_eos(response, EOS, PAD)
    query, qmask = ppo.left_pad(prompts, PAD)
    batch = ppo.Rollout(query, qmask, response, rmask, has_eos)
    logp, _, _ = ppo.rollout_logprobs_values(policy, batch, 0.7, chunk_size=2)
    for i, prompt in enumerate(prompts):
        q, qm = ppo.left_pad([prompt], PAD)
        one = ppo.Rollout(q, qm, response[i:i + 1], rmask[i:i + 1], has_eos[i:i + 1])
        lp1, _, _ = ppo.rollout_logprobs_values(policy, one, 0.7, chunk_size=1)
        torch.testing.assert_close(logp[i][rmask[i].bool()], lp1[0][rmask[i].bool()], atol=1e-5, rtol=0)


def test_reference_equals_policy_at_init_and_ratio_is_one():
    params = small_params(gradient_checkpointing=True)
    policy = tiny_policy(params)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    query, qmask = ppo.left_pad(toy_prompts(6), PAD)
    ppo.configure_sampling(policy, params, EOS, PAD)
    torch.manual_seed(0)
    ro = ppo.generate_responses(policy, query, qmask, EOS, PAD)
    logp, values, _ = ppo.rollout_logprobs_values(policy, ro, params.temperature, chunk_size=4)
    ref_logp, _, _ = ppo.rollout_logprobs_values(policy, ro, params.temperature, chunk_size=4, reference=True)
    assert torch.equal(logp, ref_logp)  # KL = 0 at initialisation (LoRA B = 0)
    assert values.abs().sum() == 0  # zero-initialised value head
    policy.train()  # train mode (gradient checkpointing on), micro-batch of 2 rows vs chunks of 4
    _, logp_train, _ = ppo.forward_response(policy, ro.input_ids[2:4], ro.attention_mask[2:4], ro.response[2:4],
                                            params.temperature)
    m = ro.response_mask[2:4].bool()
    assert (logp_train - logp[2:4])[m].abs().max().item() < 1e-5
    logp_train.sum().backward()  # non-reentrant checkpointing still gives LoRA gradients (B first: A's are 0 at B=0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_save_and_load_roundtrip(tmp_path):
    params = small_params()
    policy = tiny_policy(params)
    result = ppo.train_ppo(policy, tiny_tokenizer(), toy_prompts(), count_target, params, device="cpu", seed=0,
                           progress=False)
    ppo.save_policy(policy, tmp_path, score_stats=(result.score_mean, result.score_std))
    assert (tmp_path / "value_head.safetensors").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert ppo.load_score_stats(tmp_path) == (result.score_mean, result.score_std)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))
    loaded = ppo.load_policy(base, tmp_path).eval()
    assert loaded.value_head.weight.abs().sum() > 0  # the trained head, not a fresh zero one
    ids, mask = ppo.left_pad(toy_prompts(3), PAD)
    policy.eval()
    with torch.no_grad():
        for a, b in zip(policy(ids, mask), loaded(ids, mask), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the training loop


def test_first_update_kl_zero_and_ratio_one():
    history = run(small_params(gradient_checkpointing=True)).history
    assert history[0]["kl"] == 0.0
    assert all(h["ratio_dev_first"] < 1e-5 for h in history)  # rho == 1 before each update's first step
    expected_keys = {"score", "score_norm", "kl", "rlhf_reward", "entropy", "approx_kl", "clipfrac", "vf_clipfrac",
                     "value_loss", "policy_loss", "explained_variance", "beta", "lr", "response_tokens",
                     "no_eos_fraction"}
    assert expected_keys <= set(history[0]) and all(isinstance(v, float) for v in history[0].values())


def test_zero_learning_rate_gives_no_policy_change():
    history = run(small_params(learning_rate=0.0, total_episodes=24, ppo_epochs=3)).history
    for h in history:
        assert h["approx_kl"] < 1e-7 and h["clipfrac"] == 0.0
        assert abs(h["kl"]) < 1e-6


def test_same_seed_bit_identical_and_eval_does_not_perturb_training():
    params = small_params()

    def gold(prompts, responses):
        return [float(r.count("t3")) for r in responses]

    a = run(params, evaluator=ppo.Evaluator(gold, toy_prompts(4, seed=1), tiny_tokenizer(), seed=1))
    b = run(params, evaluator=ppo.Evaluator(gold, toy_prompts(4, seed=1), tiny_tokenizer(), seed=1))
    c = run(params)
    assert [repr(h) for h in a.history] == [repr(h) for h in b.history]
    assert [e["update"] for e in a.evals] == [0.0, 1.0, 2.0]  # update 0 = the SFT policy, before training
    assert {"gold", "proxy"} <= set(a.history[0])
    assert a.evals[1]["gold"] == a.history[0]["gold"]
    without_eval = [{k: v for k, v in h.items() if k not in ("gold", "proxy")} for h in a.history]
    assert [repr(h) for h in without_eval] == [repr(h) for h in c.history]
    assert a.episodes == 16 and a.updates == 2 and a.episodes_per_s > 0


def test_schedule_beta_penalty_and_normalisation():
    params = small_params(total_episodes=24, lr_schedule="linear", normalize_score=False, missing_eos_penalty=0.5,
                          kl_control="adaptive", init_kl_coef=0.2, target_kl=0.5, kl_horizon_fraction=0.5,
                          eval_every=0)
    r = run(params)
    h = r.history
    assert [x["lr"] for x in h] == pytest.approx([3e-3, 2e-3, 1e-3])
    for prev, cur in itertools.pairwise(h):
        err = min(max(prev["kl"] / 0.5 - 1, -0.2), 0.2)
        assert cur["beta"] == pytest.approx(prev["beta"] * math.exp(err * 8 / (0.5 * 24)))
    assert (r.score_mean, r.score_std) == (0.0, 1.0)
    for x in h:  # normalised score = raw - penalty * (no EOS)
        assert x["score_norm"] == pytest.approx(x["score"] - 0.5 * x["no_eos_fraction"])
        assert x["rlhf_reward"] == pytest.approx(x["score_norm"] - x["beta"] * x["kl"])
    measured = run(small_params(eval_every=0))
    assert measured.score_std > 0 and measured.score_mean >= 0


def test_invalid_batch_geometry_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple"):
        run(small_params(batch_size=6))
    with pytest.raises(ConfigError, match="response_length"):
        run(small_params(response_length=40))


def test_llama_architecture_and_pad_equal_eos():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))
    params = small_params(total_episodes=8, gradient_checkpointing=True, eval_every=0)
    policy = ppo.build_policy(model, params)  # no target modules: peft's defaults for the architecture
    history = ppo.train_ppo(policy, tiny_tokenizer(pad_token="t1"), toy_prompts(), count_target, params,
                            device="cpu", seed=0, progress=False).history
    assert history[0]["kl"] == 0.0 and history[0]["ratio_dev_first"] < 1e-5
    # pad == eos: masks come from positions, so a response that ended keeps its EOS (>= 1 token each)
    assert history[0]["response_tokens"] >= 1 and history[0]["no_eos_fraction"] < 1
