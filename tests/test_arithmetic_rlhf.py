"""The arithmetic RLHF experiment: its task pieces, and the smoke preset end to end."""

import json
import os

import numpy as np
import pytest

from experiments.arithmetic_rlhf import (Config, Problem, WordTokenizer, answer_ids, corrupt,
                                         main, parse_args, sample_problems, series)


def test_series_leave_out_terms_above_max_value():
    assert series(Problem(terms=5, start=3, difference=2), 100) == [3, 5, 7, 9, 11]
    assert series(Problem(terms=6, start=90, difference=5), 100) == [90, 95, 100]


def test_corruptions_are_wrong_and_in_vocabulary():
    config = Config.preset("smoke")
    tokenizer = WordTokenizer(config.max_value)
    rng = np.random.default_rng(0)
    for problem in sample_problems(rng, 200, config):
        answer = answer_ids(tokenizer, problem, config.max_value)
        wrong = corrupt(answer, tokenizer, rng, config)
        assert wrong != answer and wrong[-1] == tokenizer.eos_id
        assert tokenizer.encode(tokenizer.decode(wrong)) == wrong


def test_smoke_run(tmp_path):
    run_dir = str(tmp_path / "run")
    results = main(Config.preset("smoke", run_dir=run_dir))
    for policy in ("sft", "rl"):
        assert set(results[policy]) == {"exact_greedy", "exact_sampled"}
    assert 0 <= results["reward_model_heldout_accuracy"] <= 1
    for name in ("config.json", "metrics.jsonl", "results.json"):
        assert os.path.exists(os.path.join(run_dir, name))
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert {r["stage"] for r in records} == {"sft", "rm", "rl"}
    last = [r for r in records if r["stage"] == "rl"][-1]
    for key in ("reward_mean", "kl_ref", "entropy", "clip_fraction", "value_loss",
                "heldout_exact_sampled"):
        assert np.isfinite(last[key])


def test_cli_errors():
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tpu"])
    with pytest.raises(ValueError, match="--reward must be 'model' or 'exact'"):
        parse_args(["--preset", "smoke", "--reward", "human"])
    with pytest.raises(ValueError, match="epochs must be 1 for rloo"):  # before any training
        parse_args(["--algorithm", "rloo", "--rl-epochs", "4"])
