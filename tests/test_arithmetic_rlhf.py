"""The arithmetic RLHF experiment: its task pieces, and the smoke preset end to end."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.arithmetic_rlhf import (RL_TRAINABLE, Config, build_model, main, parse_args,
                                         preference_pairs)
from experiments.arithmetic_task import (Problem, Task, WordTokenizer, answer_ids, corrupt,
                                         credit, exact_reward_fn, prompt_ids, sample_problems, series)
from jaxrl_llm.train import prompt_rl
from jaxrl_llm.train.step import OptimConfig, make_optimizer


def test_series_leave_out_terms_above_max_value():
    assert series(Problem(terms=5, start=3, difference=2), 100) == [3, 5, 7, 9, 11]
    assert series(Problem(terms=6, start=90, difference=5), 100) == [90, 95, 100]


def test_corruptions_are_wrong_and_in_vocabulary():
    config = Config.preset("smoke")
    tokenizer = WordTokenizer(config.max_value)
    rng = np.random.default_rng(0)
    for problem in sample_problems(rng, 200, config.task):
        answer = answer_ids(tokenizer, problem, config.max_value)
        wrong = corrupt(answer, tokenizer, rng, config.max_value)
        assert wrong != answer and wrong[-1] == tokenizer.eos_id
        assert tokenizer.encode(tokenizer.decode(wrong)) == wrong


def test_smoke_run_with_two_arms(tmp_path):
    run_dir = str(tmp_path / "run")
    results = main(Config.preset("smoke", run_dir=run_dir, kl_coefs=(0.0, 0.3)))
    assert set(results["arms"]) == {"ppo_kl0", "ppo_kl0.3"}
    for policy in [results["sft"]] + [a["rl"] for a in results["arms"].values()]:
        assert set(policy) == {"exact_greedy", "exact_sampled"}
        for name in ("exact_greedy", "exact_sampled"):
            r = policy[name]
            assert r["low"] <= r["rate"] <= r["high"]
    assert 0 <= results["reward_model_accuracy"] <= 1
    saved = json.load(open(os.path.join(run_dir, "results.json")))
    for key in ("greedy_exact_before", "greedy_exact_after"):
        rate, low, high = saved[key]
        assert low <= rate <= high
    assert saved["greedy_exact_after"] == saved["arms"]["ppo_kl0"]["greedy_exact_after"]
    for name in ("config.json", "metrics.jsonl", "results.json", "curves.png", "comparison.png",
                 "overoptimisation.png", "ppo_kl0/curves.png", "ppo_kl0.3/metrics.jsonl"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert {r["stage"] for r in records} == {"sft", "rm"}
    arms = [[json.loads(line) for line in open(os.path.join(run_dir, arm, "metrics.jsonl"))]
            for arm in ("ppo_kl0", "ppo_kl0.3")]
    last = arms[0][-1]
    for key in ("reward_mean", "true_reward_mean", "kl_ref", "entropy", "clip_fraction", "value_loss",
                "heldout_exact_sampled"):
        assert np.isfinite(last[key])
    # Same prompts and keys: the arms' first collections (before any update) are identical.
    assert arms[0][0]["reward_mean"] == arms[1][0]["reward_mean"]


def test_exact_reward_is_the_programs_verdict():
    tokenizer = WordTokenizer(100)
    problem = Problem(terms=3, start=5, difference=2)
    prompt = prompt_ids(tokenizer, problem, 0)
    reward = exact_reward_fn({tuple(prompt): answer_ids(tokenizer, problem, 100)})
    right = tokenizer.encode("5 7 9") + [tokenizer.eos_id]
    np.testing.assert_array_equal(
        reward([prompt] * 3, [right, right[:-1], tokenizer.encode("5 7 10") + [1]]), [1, 0, 0])


def test_credit_counts_the_leading_tokens_right():
    tokenizer = WordTokenizer(100)
    answer = tokenizer.encode("5 7 9") + [tokenizer.eos_id]
    assert credit(answer, answer) == 4
    assert credit(tokenizer.encode("5 7 10") + [1], answer) == 2
    assert credit(tokenizer.encode("5 7 9 11") + [1], answer) == 3  # EOS due, not given
    assert credit(tokenizer.encode("6 7 9") + [1], answer) == 0
    assert credit([], answer) == 0


def test_ranked_pairs_prefer_the_sample_with_more_credit():
    config = Config.preset("smoke")
    tokenizer = WordTokenizer(config.max_value)
    policy = build_model(tokenizer, config)  # untrained: its samples are wrong, in many ways
    problems = sample_problems(np.random.default_rng(0), 64, config.task)
    pairs = preference_pairs(policy, tokenizer, problems, config, np.random.default_rng(1),
                             jax.random.key(0), 64, ranked=1.0)
    answers = [answer_ids(tokenizer, p, config.max_value) for p in problems]
    response = lambda side, i: pairs[f"{side}_tokens"][i][pairs[f"{side}_response_mask"][i]]
    ranked = 0
    for i, answer in enumerate(answers):
        chosen, rejected = response("chosen", i).tolist(), response("rejected", i).tolist()
        assert credit(chosen, answer) > credit(rejected, answer)
        ranked += chosen != answer
    assert ranked > 0  # some pairs are two wrong samples, not the answer and a wrong one


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_rl_trains_only_the_final_norm(algorithm):
    config = Config.preset("smoke", rl_epochs=1)
    tokenizer = WordTokenizer(config.max_value)
    rl_config = config.rl_config(algorithm, 0.1)
    trainer = prompt_rl.make_trainer(build_model(tokenizer, config), rl_config, make_optimizer(
        OptimConfig(learning_rate=0.1)), trainable=RL_TRAINABLE[config.rl_trainable])
    state = trainer.init()
    before = nnx.state(prompt_rl.policy_lm(trainer.model(state)), nnx.Param)
    before = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
              jax.tree_util.tree_leaves_with_path(before)}
    prompts = [prompt_ids(tokenizer, p, 0) for p in
               sample_problems(np.random.default_rng(0), 4, config.task)]
    lengths = lambda _, responses: np.array([len(r) for r in responses], np.float32)
    state, _, _ = prompt_rl.iteration(trainer, state, trainer.model(trainer.init()), prompts,
                                      lengths, jax.random.key(0), 0.1, rl_config)
    after = nnx.state(prompt_rl.policy_lm(trainer.model(state)), nnx.Param)
    changed = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(after)
               if not np.array_equal(np.asarray(v), before[jax.tree_util.keystr(k)])}
    assert changed == {"['norm']['weight'].value"}, changed


def test_cli_errors():
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tpu"])
    with pytest.raises(ValueError, match="--reward must be 'model' or 'exact'"):
        parse_args(["--preset", "smoke", "--reward", "human"])
    with pytest.raises(ValueError, match="epochs must be 1 for rloo"):  # before any training
        parse_args(["--algorithms", "ppo", "rloo", "--rl-epochs", "4"])
    with pytest.raises(ValueError, match="--sft-learning-rate, --rm-learning-rate and "
                                         "--rl-learning-rate must be > 0"):
        parse_args(["--rl-learning-rate", "0"])
    with pytest.raises(ValueError, match="--algorithms and --kl-coefs each need"):
        Config(kl_coefs=())
    with pytest.raises(ValueError, match="max_terms .* must be >= min_terms"):
        parse_args(["--min-terms", "9", "--max-terms", "6"])
    with pytest.raises(ValueError, match="--rl-trainable must be one of final_norm, all"):
        parse_args(["--rl-trainable", "lora"])
    with pytest.raises(ValueError, match="--rm-kind must be one of"):
        parse_args(["--rm-kind", "oracle"])
    with pytest.raises(ValueError, match="--rm-policy-fraction must be in"):
        parse_args(["--rm-policy-fraction", "1.5"])
    with pytest.raises(ValueError, match="--rm-ranked-fraction must be in"):
        parse_args(["--rm-ranked-fraction", "-0.1"])
    with pytest.raises(ValueError, match="max_terms must be <= 15"):
        Task(max_terms=20)
