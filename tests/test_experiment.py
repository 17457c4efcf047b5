"""The main job end to end on the smoke preset (tiny random model, real games), with resume."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest

from experiments import textworld_ppo
from experiments.textworld_ppo import PRESETS, Config, main, parse_args
from jaxrl_llm.metrics import read_jsonl

pytestmark = pytest.mark.textworld


TIMINGS = {"wall_time", "env_steps_per_s", "iteration_seconds"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def test_smoke_run_killed_and_resumed_equals_the_run_that_never_stopped(tmp_path):
    unbroken_dir = str(tmp_path / "unbroken")
    main(Config.preset("smoke", run_dir=unbroken_dir, ppo_iterations=3))
    # The same run, killed (SIGKILL) while PPO iteration 2 is under way, then rerun.
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.textworld_ppo", "--preset", "smoke", "--run-dir",
         run_dir, "--ppo-iterations", "3"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 600
    while not any(r.get("iteration") == 1 for r in _records(run_dir)):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(2.0)
    process.kill()
    process.wait()
    assert not os.path.exists(os.path.join(run_dir, "eval.json"))  # it died before the end
    first = main(Config.preset("smoke", run_dir=run_dir, ppo_iterations=3))
    assert set(first) >= {"zero_shot", "sft", "ppo"}
    assert set(first["wall_time_s"]) == {"eval_zero_shot", "sft", "sft_training", "eval_sft",
                                         "ppo", "eval_ppo"}
    assert first["compiled_play_programs"] > 0
    records = _records(run_dir)
    assert [r["iteration"] for r in records if r["stage"] == "ppo"] == [1, 2, 3]
    # Game seeds, sampling and shuffles come from the checkpointed key, and work logged after
    # the last checkpoint is rewound: every record is the unbroken run's, number for number.
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]
    assert strip(records) == strip(_records(unbroken_dir))
    with open(os.path.join(unbroken_dir, "eval.json")) as f:
        assert json.load(f)["ppo"] == first["ppo"]
    sft_steps = [r for r in records if r["stage"] == "sft"]
    epochs = Config.preset("smoke").sft_epochs
    assert sft_steps and {r["epoch"] for r in sft_steps} == set(range(epochs))
    assert len({r["step"] for r in sft_steps}) == len(sft_steps)  # SFT ran once
    # The SFT evaluation recorded before the kill was reused by the rerun.
    kept = sorted(os.listdir(os.path.join(run_dir, "eval")))
    assert [name.split("-")[0] for name in kept] == [
        "eval_ppo_score", "eval_sft_score", "eval_zero_shot_score"]
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000
    # The eval CLI loads the saved SFT adapters (no trainer, no data): the same weights, so it
    # finds the main job's record and plays nothing.
    from experiments import textworld_eval

    table = textworld_eval.main(["--policies", "sft", "--games", "2", "--step-limits", "4",
                                 "--run-dir", run_dir])
    assert sorted(os.listdir(os.path.join(run_dir, "eval"))) == kept
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert table["sft (score)"] == json.load(f)["sft"]
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert "limit_4" in json.load(f)["ppo"]
    for key in ("kl_ref", "entropy", "clip_fraction", "approx_kl", "explained_variance",
                "value_loss", "policy_loss", "env_steps_per_s", "iteration_seconds"):
        assert key in records[-1]
    # Score-mode collection acts among the valid actions only; SFT logs its early signal.
    ppo = [r for r in records if r["stage"] == "ppo"]
    assert all(r["valid_action_rate"] == 1.0 and r["candidates"] > 1 for r in ppo)
    dev = [r for r in records if r["stage"] == "sft_dev"]
    assert dev and 0 <= dev[-1]["action_accuracy"] <= 1 and dev[-1]["steps"] > 0
    # ... per gold verb too: the verbs' steps and hits add up to the whole.
    verbs = [k.split("/")[1] for k in dev[-1] if k.startswith("steps/")]
    assert "look" in verbs and sum(dev[-1][f"steps/{v}"] for v in verbs) == dev[-1]["steps"]
    assert sum(dev[-1][f"accuracy/{v}"] * dev[-1][f"steps/{v}"] for v in verbs) == \
        pytest.approx(dev[-1]["action_accuracy"] * dev[-1]["steps"])


def test_sft_killed_mid_epoch_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch):
    # 2 games x ~20 steps in batches of 4: ~10 SFT steps an epoch, a checkpoint every 3.
    flags = dict(ppo_iterations=0, zero_shot_eval=False, sft_epochs=2, sft_checkpoint_every=3)
    unbroken_dir, run_dir = str(tmp_path / "unbroken"), str(tmp_path / "run")
    main(Config.preset("smoke", run_dir=unbroken_dir, **flags))
    step, calls = textworld_ppo.Trainer.step, []

    def killed_at_step_five(self, state, batch):
        calls.append(None)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return step(self, state, batch)

    monkeypatch.setattr(textworld_ppo.Trainer, "step", killed_at_step_five)
    with pytest.raises(RuntimeError, match="killed"):
        main(Config.preset("smoke", run_dir=run_dir, **flags))
    monkeypatch.undo()
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    # Other training settings on the same run dir are refused before the model loads.
    with monkeypatch.context() as patch:
        patch.setattr(textworld_ppo, "load_policy", lambda *_: pytest.fail("model loaded"))
        for changed, said in ((dict(prompt_style="inventory"),
                               "--prompt-style locate (now inventory)"),
                              (dict(sft_learning_rate=1e-3), "--sft-learning-rate")):
            with pytest.raises(ValueError, match="holds sft_progress checkpoints trained with "
                                                 + re.escape(said) + ".*new --run-dir"):
                main(Config.preset("smoke", run_dir=run_dir, **flags, **changed))
    resumed = main(Config.preset("smoke", run_dir=run_dir, **flags))
    records = _records(run_dir)
    sft_steps = [r["step"] for r in records if r["stage"] == "sft"]
    assert sft_steps == list(range(1, len(sft_steps) + 1)) and len(sft_steps) > 10
    # Step 4, logged after the checkpoint at 3, was rewound and trained again: the same numbers.
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]
    assert strip(records) == strip(_records(unbroken_dir))
    with open(os.path.join(unbroken_dir, "eval.json")) as f:
        assert json.load(f)["sft"] == resumed["sft"]
    assert "ppo" not in resumed  # no PPO iteration: the SFT policy is not played twice
    textworld_ppo.check_resumable(Config.preset("smoke", run_dir=run_dir, **flags, eval_games=4,
                                                sft_micro_batch_size=2, eval_sample=True))
    with pytest.raises(ValueError, match="holds sft checkpoints trained with --sft-noise 0.2"):
        textworld_ppo.check_resumable(Config.preset("smoke", run_dir=run_dir, **flags,
                                                    sft_noise=0.5))


def test_cli_errors():
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tpu"])
    for flag in ("--num-envs", "--ppo-games"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 1"):
            parse_args(["--preset", "smoke", flag, "0"])
    with pytest.raises(ValueError, match=r"--ppo-games \(4\) must be a multiple of --ppo-group"):
        parse_args(["--ppo-games", "4", "--ppo-group", "3"])
    with pytest.raises(ValueError, match="--ppo-advantage rloo needs --ppo-group >= 2"):
        parse_args(["--ppo-advantage", "rloo"])
    with pytest.raises(ValueError, match="--eval-step-limits must be one or more limits >= 1"):
        Config.preset("smoke", eval_step_limits=(16, 0))
    for flag in ("--prompt-style", "--agent-mode", "--collect-mode", "--sft-loss",
                 "--ppo-advantage"):
        with pytest.raises(ValueError, match=f"{flag} must be one of"):
            parse_args(["--preset", "smoke", flag, "chat"])
    with pytest.raises(ValueError, match="--sft-noise must be in"):
        parse_args(["--preset", "smoke", "--sft-noise", "1.0"])
    with pytest.raises(ValueError, match="--quantize must be one of"):
        parse_args(["--quantize", "int4"])
    with pytest.raises(ValueError, match="--seed must be >= 0"):
        parse_args(["--seed", "-5"])
    with pytest.raises(ValueError, match="--lora-layers must be >= 0"):
        parse_args(["--lora-layers", "-1"])
    with pytest.raises(ValueError, match="--lora-layers 3 is more than the model's 2 layers"):
        textworld_ppo.load_policy(Config.preset("smoke", lora_layers=3))
    for flag in ("--ppo-iterations", "--ppo-top-k"):
        with pytest.raises(ValueError, match="--dev-games, --ppo-iterations and --ppo-top-k "
                                             "must be >= 0"):
            parse_args([flag, "-1"])
    # Sub-configs are validated with the run's config, before anything loads.
    with pytest.raises(ValueError, match="kl_in must be one of"):
        parse_args(["--kl-in", "both"])
    with pytest.raises(ValueError, match="learning_rate"):
        parse_args(["--ppo-learning-rate", "0"])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        parse_args(["--temperature", "0"])
    for flags, message in ((["--sft-learning-rate", "0"], "learning_rate must be > 0"),
                           (["--lora-alpha", "-1"], "alpha"),
                           (["--eval-every", "-1"], "--eval-every must be >= 0"),
                           (["--cache-len", "8"], "cache_len >= 64"),
                           (["--sft-batch-size", "3", "--sft-micro-batch-size", "2"],
                            "multiple of micro_batch_size"),
                           (["--ppo-epochs", "0"], "epochs must be >= 1"),
                           (["--kl-coef", "-1"], "kl_coef"),
                           (["--sft-negatives", "-1"], "--sft-negatives .* must be >= 0"),
                           (["--sft-checkpoint-every", "-1"], "--sft-checkpoint-every must")):
        with pytest.raises(ValueError, match=message):
            parse_args(flags)
    with pytest.raises(ValueError, match="--collect-mode generate needs --temperature 1"):
        parse_args(["--collect-mode", "generate", "--temperature", "0.7"])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sft-epochs SFT_EPOCHS passes over the SFT games (cpu preset: 1)" in text
    # A field documented by the comment block above it.
    assert "--cache-len CACHE_LEN KV-cache slots per game" in text
    assert text.count("(cpu preset:") == len(dataclasses.fields(Config))


def test_presets_are_valid_configs():
    configs = {name: Config.preset(name) for name in PRESETS}
    assert configs["cpu"] == Config()  # the no-flag run is the cpu preset
    assert configs["gpu"].eval_step_limits == (16, 32) and configs["gpu"].max_history is None


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(textworld_ppo, "main", interrupted)
    with pytest.raises(SystemExit, match=r"interrupted: rerun the same command \(--run-dir "
                                         f"{tmp_path}\\) to resume"):
        textworld_ppo.cli(["--preset", "smoke", "--run-dir", str(tmp_path)])
