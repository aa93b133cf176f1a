"""PPO at scale, checked on CPU: collectives on the backend's device, an fp32 LM head with a bounded error, one
whole update against an independent oracle (k3, whitened rewards, entropy bonus, value targets), the sampling
distribution, the first-step ratio check and a KL controller that moves at the real profile's length."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from edgerlhf import distributed, ppo, ppo_stage
from edgerlhf.config import PPOParams, parse_params
from edgerlhf.errors import ConfigError, EdgeRLHFError
from tests.conftest import ROOT
from tests.test_ppo_oracles import EOS, PAD, count_target, small_params, tiny_policy, tiny_tokenizer, toy_prompts

# --------------------------------------------------------------------------- collectives


def test_every_collective_runs_on_the_process_group_device(monkeypatch):
    """NCCL rejects CPU tensors: each collective must move its tensor to Processes.device (here `meta`, a device
    no tensor of the caller lives on) and bring the result back to the caller's device."""
    import accelerate.utils

    seen = []

    def fake(name, grow=1):
        def op(t, *args, **kwargs):
            seen.append((name, t.device))
            return torch.zeros((grow * t.shape[0], *t.shape[1:]), dtype=t.dtype)  # a CPU result, like NCCL's copy
        return op

    monkeypatch.setattr(accelerate.utils, "reduce", fake("reduce"))
    monkeypatch.setattr(accelerate.utils, "gather", fake("gather", grow=2))
    monkeypatch.setattr(accelerate.utils, "broadcast", fake("broadcast"))
    procs = distributed.Processes(rank=0, world_size=2, device=torch.device("meta"))
    x = torch.ones(3)
    assert procs.mean(x).device == x.device and procs.gather(x).shape == (6,) and procs.max(x).shape == (3,)
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    procs.all_reduce_gradients([w])
    procs.broadcast_parameters([w])
    stats = {"update": 1.0, "episodes": 64.0, "beta": 0.1, "lr": 1e-5, "kl": 0.5, "ratio_dev_first": 0.01}
    ppo.mean_over_processes(stats, procs)
    assert {name for name, _ in seen} == {"reduce", "gather", "broadcast"}
    assert all(device == torch.device("meta") for _, device in seen), seen


def test_ratio_dev_first_is_the_worst_process_not_the_mean(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "reduce", lambda t, reduction="mean": t * 0 + 1.0)
    monkeypatch.setattr(accelerate.utils, "gather", lambda t: torch.cat([t, t * 3]))
    procs = distributed.Processes(rank=0, world_size=2)
    out = ppo.mean_over_processes({"update": 2.0, "kl": 0.5, "ratio_dev_first": 0.01}, procs)
    assert out["update"] == 2.0 and out["kl"] == 1.0 and out["ratio_dev_first"] == pytest.approx(0.03)


def test_only_distributed_py_calls_collectives():
    """Every collective goes through distributed.Processes (which puts tensors on the backend's device)."""
    offenders = []
    for path in sorted((ROOT / "edgerlhf").glob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("accelerate.utils", "torch.distributed"):
                names = {a.name for a in node.names} & {"reduce", "gather", "broadcast", "gather_object",
                                                        "all_reduce", "all_gather", "barrier"}
                if names or node.module == "torch.distributed":
                    offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                    any(a.name == "distributed" for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed."):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


# --------------------------------------------------------------------------- the fp32 LM head


def big_logit_model(dtype: torch.dtype) -> GPT2LMHeadModel:
    """A tiny GPT-2 whose logits reach |90|, GPT-2's range, where bf16 rounds by 0.25-0.5."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2000, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       initializer_range=0.1, bos_token_id=EOS, eos_token_id=EOS))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(16)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_head_bounds_the_logprob_error_of_a_half_precision_model(dtype):
    policy = ppo.build_policy(big_logit_model(dtype), PPOParams(lora_r=4, lora_alpha=8), ["c_attn"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 2000, (4, 30), generator=g)
    response = ids[:, -12:]
    mask = torch.ones_like(ids)
    rollout = ppo.Rollout(ids[:, :-12], mask[:, :-12], response, mask[:, -12:], torch.ones(4, dtype=torch.bool))
    logp, _, _ = ppo.rollout_logprobs_values(policy, rollout, temperature=0.7, chunk_size=4)
    lm = ppo.causal_lm(policy.model)
    with torch.no_grad():  # the exact log-probs of this (half-precision) body: its hidden state, head in fp64
        hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -13:-1].double()
        exact = ppo.response_logprobs(hidden @ lm.get_output_embeddings().weight.double().T / 0.7, response)
        model_logits = lm(input_ids=ids, attention_mask=mask).logits[:, -13:-1].float()
    assert model_logits.abs().max() > 60
    ours = (logp.double() - exact).abs().max().item()
    theirs = (ppo.response_logprobs(model_logits / 0.7, response).double() - exact).abs().max().item()
    assert ours < 2e-4  # fp32 rounding of |logit| ~ 130 (after the temperature)
    assert theirs > 20 * ours  # what the model's own half-precision logits would have put into log rho


def test_a_lora_on_the_lm_head_is_refused():
    with pytest.raises(ConfigError, match="leave the output layer"):
        ppo.build_policy(big_logit_model(torch.float32), PPOParams(lora_r=4, lora_alpha=8), ["c_attn", "lm_head"])


# --------------------------------------------------------------------------- losses and advantages by hand


def test_value_targets_come_from_the_advantages_before_whitening():
    # score 1 at the last of 3 tokens, no KL, V = 0.5, gamma 1, lam 0.5: A = (0.125, 0.25, 0.5) (GAE oracle),
    # G = A + V = (0.625, 0.75, 1.0); the whitened A would give other targets
    mask = torch.ones(1, 3)
    logp = torch.zeros(1, 3)
    rollout = ppo.Rollout(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1), torch.ones(1, 3, dtype=torch.long),
                          mask, torch.ones(1, dtype=torch.bool))
    batch = ppo.Batch(rollout, mask, logp, logp, torch.full((1, 3), 0.5), logp, torch.ones(1), torch.ones(1))
    adv = ppo.compute_advantages(batch, beta=0.1, params=PPOParams(gamma=1.0, lam=0.5))
    torch.testing.assert_close(adv.returns, torch.tensor([[0.625, 0.75, 1.0]]))
    a = torch.tensor([0.125, 0.25, 0.5])
    torch.testing.assert_close(adv.advantages[0], (a - a.mean()) / torch.sqrt(a.var() + 1e-8))


def test_value_loss_gradient_by_hand():
    # L = 0.5 * mean_t max((V - G)^2, (Vc - G)^2), Vc = V_old + clip(V - V_old, +-0.2), over the 2 masked tokens.
    # t0: V=0.5, V_old=0, G=1 -> Vc=0.2: (Vc-G)^2 = 0.64 > 0.25, the clipped branch: dL/dV = 0 (Vc is constant)
    # t1: V=0.1, V_old=0, G=1 -> inside the clip: dL/dV = 0.5 * 2 (V - G) / 2 = -0.45
    # t2: padding: 0
    v = torch.tensor([[0.5, 0.1, 7.0]], requires_grad=True)
    loss, vf_clipfrac = ppo.clipped_value_loss(v, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1.0, 1.0, 0.0]]),
                                               0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -0.45, 0.0]]))
    assert vf_clipfrac.item() == 0.5


# --------------------------------------------------------------------------- one update against an oracle


def _masked_whiten(x: torch.Tensor, m: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    values = x[m]
    mean, var = values.mean(), values.var(unbiased=True)
    out = (x - mean) / torch.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    return torch.where(m, out, torch.zeros_like(out))


def oracle_gradients(policy, batch, params: PPOParams, beta: float, *, k3: bool, whiten: bool, entropy: bool,
                     raw_returns: bool) -> dict[str, torch.Tensor]:
    """The gradient of one PPO minibatch written out independently of edgerlhf.ppo's formulas (only the model's
    forward is shared). The flags switch each ingredient so the test can show it matters."""
    m = batch.mask.bool()
    logp_old, ref = batch.logp_old.double(), batch.ref_logp.double()
    log_r = ref - logp_old
    kl = torch.where(m, torch.exp(log_r) - 1 - log_r if k3 else -log_r, torch.zeros_like(log_r))
    rewards = -beta * kl
    for i in range(len(rewards)):
        rewards[i, int(m[i].nonzero().max())] += batch.score[i].double()
    if whiten:
        rewards = _masked_whiten(rewards, m, shift_mean=False)
    values_old = batch.values_old.double()
    adv = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        n, next_adv = int(m[i].sum()), 0.0
        for t in reversed(range(n)):
            next_value = values_old[i, t + 1] if t + 1 < n else 0.0
            delta = rewards[i, t] + params.gamma * next_value - values_old[i, t]
            next_adv = delta + params.gamma * params.lam * next_adv
            adv[i, t] = next_adv
    whitened = _masked_whiten(adv, m, shift_mean=True)
    returns = torch.where(m, (adv if raw_returns else whitened) + values_old, torch.zeros_like(adv))

    policy.train()
    policy.zero_grad(set_to_none=True)
    r = batch.rollout
    logits, values = policy(r.input_ids, r.attention_mask, n_last=r.response.shape[1] + 1)
    logits, values = logits[:, :-1].double() / params.temperature, values[:, :-1].double()
    log_probs = torch.log_softmax(logits, -1)
    logp = log_probs.gather(-1, r.response.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(torch.where(m, logp - logp_old, torch.zeros_like(logp)))
    pg = torch.max(-whitened * ratio, -whitened * ratio.clamp(1 - params.cliprange, 1 + params.cliprange))
    v_clipped = values_old + (values - values_old).clamp(-params.cliprange_value, params.cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    loss = pg[m].mean() + params.vf_coef * vf[m].mean()
    if entropy:
        loss = loss - params.ent_coef * (-(log_probs.exp() * log_probs).sum(-1))[m].mean()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_one_update_of_train_ppo_matches_the_oracle_with_k3_whitening_and_entropy(monkeypatch):
    params = small_params(total_episodes=6, batch_size=6, mini_batch_size=6, gradient_accumulation_steps=1,
                          ppo_epochs=1, kl_estimator="k3", whiten_rewards=True, ent_coef=0.5, vf_coef=0.7, gamma=0.9,
                          lam=0.8, init_kl_coef=0.3, max_grad_norm=1e6, normalize_score=False, eval_every=0)
    policy = tiny_policy(params)
    torch.manual_seed(1)
    with torch.no_grad():  # policy != reference (KL != 0) and a non-zero critic
        for p in policy.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in policy.named_parameters()}
    seen: dict = {}
    collect, step = ppo.collect_rollouts, torch.optim.AdamW.step

    def spy_collect(*args, **kwargs):
        seen["batch"] = collect(*args, **kwargs)
        return seen["batch"]

    def spy_step(self, *args, **kwargs):
        seen["grads"] = {names[id(p)]: p.grad.detach().clone() for g in self.param_groups for p in g["params"]}
        return step(self, *args, **kwargs)

    monkeypatch.setattr(ppo, "collect_rollouts", spy_collect)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    result = ppo.train_ppo(policy, tiny_tokenizer(), toy_prompts(), count_target, params, device="cpu", seed=0,
                           progress=False)
    assert result.updates == 1 and result.history[0]["kl"] > 0.05
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    batch, got = seen["batch"], seen["grads"]

    def distance(**flips) -> float:
        flags = {"k3": True, "whiten": True, "entropy": True, "raw_returns": True, **flips}
        want = oracle_gradients(policy, batch, params, 0.3, **flags)
        return max(((got[n].double() - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)).item()
                   for n in want)

    assert distance() < 1e-4
    # each ingredient moves the gradient far beyond that tolerance: leaving any out would fail the line above
    for flip in ("k3", "whiten", "entropy", "raw_returns"):
        assert distance(**{flip: False}) > 1e-2, flip


# --------------------------------------------------------------------------- sampling and the first-step check


def test_samples_come_from_softmax_of_logits_over_temperature(monkeypatch):
    """No logits processor but the temperature: a hub generation_config's repetition_penalty / top_k must not
    leak into PPO's sampling (its log-probs are those of softmax(logits / T))."""
    params = small_params(response_length=6, temperature=0.7)
    policy = tiny_policy(params)
    lm = ppo.causal_lm(policy.model)
    lm.generation_config.repetition_penalty, lm.generation_config.top_k = 1.5, 5
    ppo.configure_sampling(policy, params, EOS, PAD)
    seen = {}
    generate = policy.model.generate

    def spy(**kwargs):
        seen["out"] = generate(**kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        return seen["out"].sequences

    monkeypatch.setattr(policy.model, "generate", spy)
    query, query_mask = ppo.left_pad(toy_prompts(8), PAD)
    ppo.generate_responses(policy, query, query_mask, EOS, PAD)
    out = seen["out"]
    assert len(out.scores) >= 2
    for scores, logits in zip(out.scores, out.logits, strict=True):
        torch.testing.assert_close(scores, logits / 0.7)


def test_a_training_forward_that_differs_from_the_rollout_stops_the_run():
    params = small_params(total_episodes=8, eval_every=0)
    policy = tiny_policy(params)
    for module in policy.modules():  # dropout back on: train mode (the update) now differs from the rollout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    with pytest.raises(EdgeRLHFError, match=r"training forward differs from its rollout forward at update 1: "
                                            r"max \|log ratio\| before the first step is .* > 0.001 .*float32"):
        ppo.train_ppo(policy, tiny_tokenizer(), toy_prompts(), count_target, params, device="cpu", seed=0,
                      progress=False)


def test_ratio_tolerance_covers_every_compute_dtype():
    from edgerlhf.modeling import DTYPES

    assert set(DTYPES.values()) <= set(ppo.RATIO_DEV_TOLERANCE)
    assert ppo.RATIO_DEV_TOLERANCE[torch.float32] < ppo.RATIO_DEV_TOLERANCE[torch.float16] \
        < ppo.RATIO_DEV_TOLERANCE[torch.bfloat16] <= 0.5


# --------------------------------------------------------------------------- the KL controller at real scale


@pytest.mark.parametrize(("kl_over_target", "bound"), [(2.0, 2.0), (0.0, 0.5)])
def test_adaptive_beta_moves_within_a_run_of_the_real_profile(kl_over_target, bound):
    """At params.yaml's own settings (4096 episodes in batches of 32), a KL held at twice the target at least
    doubles beta by the end of the run, and a KL of 0 at least halves it."""
    params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).ppo
    assert params.kl_control == "adaptive"
    ctl = ppo.make_kl_controller(params)
    for _ in range(params.total_episodes // params.batch_size):
        ctl.update(kl_over_target * params.target_kl, params.batch_size)
    ratio = ctl.value / params.init_kl_coef
    assert ratio >= bound if kl_over_target > 1 else ratio <= bound


# --------------------------------------------------------------------------- what the stage writes


def test_every_per_update_stat_is_a_curve():
    stats = set(ppo.UPDATE_STATS) | {"ratio_dev_first", "skipped_steps", "update", "episodes", "beta", "lr"}
    rollout_keys = ("score", "score_norm", "kl", "rlhf_reward", "entropy", "explained_variance", "response_tokens",
                    "no_eos_fraction")
    assert stats | set(rollout_keys) == set(ppo_stage.PLOT_KEYS)
    source = Path(ppo.__file__).read_text()
    body = source[source.index("def rollout_stats"):source.index("# ======", source.index("def rollout_stats"))]
    assert {k for k in rollout_keys if f'"{k}"' in body} == set(rollout_keys)


def test_undefined_explained_variance_is_a_gap_not_a_zero():
    """In the metrics; in the live curve it is a step without a row (tests/test_live.py)."""
    history = [{"explained_variance": float("nan")}, {"explained_variance": 0.5}, {"explained_variance": 0.25},
               {"explained_variance": float("nan")}]
    assert ppo_stage.explained_variance_summary(history) == {
        "explained_variance_undefined_updates": 2, "explained_variance_mean": 0.375, "explained_variance_end": 0.25}
    with pytest.raises(ValueError):
        ppo_stage._finite(float("nan"))


@pytest.mark.parametrize("updates", [1, 2, 4])
def test_adaptive_beta_stays_positive_and_bounded_in_short_runs(updates):
    """A short run puts many episodes on one horizon (n / H = 1 / (fraction * updates)): the multiplicative
    controller never reaches 0, and the whole run moves beta by at most exp(0.2 / fraction) either way."""
    params = PPOParams(total_episodes=32 * updates, batch_size=32, kl_horizon_fraction=0.1, init_kl_coef=0.1)
    low, high = ppo.make_kl_controller(params), ppo.make_kl_controller(params)
    for _ in range(updates):
        low.update(0.0, 32)
        high.update(100.0, 32)
    assert low.value > 0 and low.value == pytest.approx(0.1 * math.exp(-2.0))
    assert high.value == pytest.approx(0.1 * math.exp(2.0))


def test_a_non_finite_loss_stops_every_process_together(monkeypatch):
    """The divergence is agreed through Processes.max before the gradient all-reduce: a lone raise in one process
    would leave the others waiting in the all-reduce (an NCCL hang)."""
    asked = []
    real_max = distributed.Processes.max

    def spy(self, values):
        asked.append(values.tolist())
        return real_max(self, values)

    monkeypatch.setattr(distributed.Processes, "max", spy)
    monkeypatch.setattr(ppo, "clipped_value_loss", lambda *a, **k: (torch.tensor(float("nan")), torch.tensor(0.0)))
    params = small_params(total_episodes=8, eval_every=0)
    with pytest.raises(EdgeRLHFError, match="PPO diverged: non-finite loss in optimizer step 1 of the update"):
        ppo.train_ppo(tiny_policy(params), tiny_tokenizer(), toy_prompts(), count_target, params, device="cpu",
                      seed=0, progress=False)
    assert asked == [[1.0]]


def test_a_lora_on_the_output_layer_fails_at_base_not_at_ppo():
    from edgerlhf import modeling

    model = big_logit_model(torch.float32)
    assert modeling.check_lora_targets(model, ["c_attn"], "the model") == ["c_attn"]
    with pytest.raises(ConfigError, match=r"lora.target_modules names the output layer \(lm_head\)"):
        modeling.check_lora_targets(model, ["c_attn", "lm_head"], "the model")
