"""The prompt-level text experiments (notebooks 002-004) end to end on a tiny random model, and
their command lines."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import sentiment_ppo, text_reinforce, text_rl, text_rloo


def test_two_arms_end_to_end(tmp_path, capsys):
    config = dataclasses.replace(
        text_rl.Config(), model_path="tiny", task="length", target_length=3,
        algorithms=("rloo", "ppo"), kl_coefs=(0.1,), iterations=2, prompts_per_iteration=2,
        num_samples=2, max_new_tokens=4, minibatch_size=4, micro_batch_size=4, eval_prompts=2,
        run_dir=str(tmp_path))
    results = text_rl.main(config)
    assert [(r["algorithm"], r["kl_coef"]) for r in results] == [("rloo", 0.1), ("ppo", 0.1)]
    for r in results:
        for stage in ("before", "after"):
            assert len(r[stage]["samples"]) == 2
            for key in ("reward", "kl_ref", "ref_logprob", "distinct_tokens", "length"):
                assert np.isfinite(r[stage][key]), (stage, key)
        # Before training the policy is its own reference.
        assert r["before"]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
        arm = os.path.join(str(tmp_path), f"{r['algorithm']}_kl0.1")
        records = [json.loads(line) for line in open(os.path.join(arm, "metrics.jsonl"))]
        assert [x["iteration"] for x in records] == [1, 2]
        assert os.path.getsize(os.path.join(arm, "curves.png")) > 1000
    assert "value_loss" in records[-1]  # ppo trains a critic
    assert os.path.getsize(os.path.join(str(tmp_path), "comparison.png")) > 1000
    saved = json.load(open(os.path.join(str(tmp_path), "results.json")))
    assert len(saved["arms"]) == 2
    assert "rloo kl=0.1" in capsys.readouterr().out


def test_entry_point_defaults():
    assert text_reinforce.DEFAULTS.kl_coefs == (0.0, 0.1)
    assert set(text_rloo.DEFAULTS.algorithms) == {"rloo", "reinforce", "grpo"}
    config = sentiment_ppo.parse_args(["--num-rollouts", "8", "--init-kl-coef", "0.05"]
                                      ).to_config()
    assert (config.algorithms, config.kl_coefs, config.prompts_per_iteration, config.top_k) == (
        ("ppo",), (0.05,), 8, 10)
    assert config.rl_config("ppo", 0.05).filtered  # top-k: old log-probs recomputed


@pytest.mark.parametrize("argv, message", [
    (["--task", "poetry"], "--task must be one of"),
    (["--algorithms", "rloo", "--num-samples", "1"], "num_samples must be >= 2 for rloo"),
    (["--eval-prompts", "60"], "--eval-prompts \\+ --prompts-per-iteration must be <="),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--learning-rate", "0"], "learning_rate must be > 0"),
    (["--lora-alpha", "-1"], "alpha must be > 0"),
])
def test_cli_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        text_rl.parse_args(text_rl.Config(), "", argv)


@pytest.mark.parametrize("argv, message", [
    (["--num-rollouts", "0"], "--num-rollouts must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--cliprange", "0"], "clip_eps must be > 0"),
])
def test_sentiment_cli_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        sentiment_ppo.parse_args(argv)
