"""Play speed in score mode: ours incremental vs ours re-prefilling vs transformers, same states.

    python -m benchmarks.play                        # 8 test games, 32 steps, windows of 8
    python -m benchmarks.play --games 4 --window 4 --engines ours torch:bfloat16

Every engine scores every valid action of the same game states with the default SmolLM2 model:
the states come from one recorded play of test games 0..G-1 (compact prompts, full history) by
a seeded random policy that never eats or cooks, so that every game lasts the whole --steps.
  * ours incremental: the games in lockstep, each step one `score_continuations` call that
    prefills only the new history text and scores the candidates against the cached history
    (int8 base + zero LoRA, float32, as the main job plays);
  * ours re-prefill: the same call on an empty cache with each game's whole prompt;
  * transformers + torch (float32, bfloat16): each game's per-step prompt encoded once and its
    `past_key_values` reused by all its candidates in one batched forward.
Reported: seconds per game step over the first and the last --window steps (ours incremental
after a warm-up pass of the same steps, so no compile is timed; a step of re-prefill that
compiled is timed again), compiled programs, peak RSS (each engine in its own subprocess), and
how far each engine's candidate scores of game 0's last step are from the first engine's.
Each engine's result is saved to --out (keyed by games, steps, window and seed) as it finishes;
a rerun with the same settings skips the engines saved there, so an interrupted run loses only
the engine it was in.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

NEVER = ("eat", "cook", "prepare")  # actions that could end a game before --steps


def record_states(games: int, steps: int, seed: int) -> dict:
    """Token ids of every state: per game, per step the new history text, tail and candidates."""
    from jaxrl_llm import text
    from jaxrl_llm.envs.textworld import (ACTION_SUFFIX, OBSERVATION_BLOCK, GameConfig,
                                          TextWorldBatch, prompt_pieces, step_tail)
    from jaxrl_llm.model.loading import default_model_path, gguf_tokenizer

    tokenizer = gguf_tokenizer(default_model_path())
    rng = np.random.default_rng(seed)
    record = [dict(context=[], tail=[], candidates=[]) for _ in range(games)]
    with TextWorldBatch(GameConfig(step_limit=steps), games) as batch:
        episodes = batch.reset(list(range(games)), "test")
        new = [text.encode_pieces(tokenizer, prompt_pieces(e)) for e in episodes]
        for _ in range(steps):
            actions = []
            for game, e in enumerate(episodes):
                if e.done:
                    raise RuntimeError(f"test game {game} ended before step {steps}")
                tail = step_tail(e, "compact")
                record[game]["context"].append(new[game])
                record[game]["tail"].append(text.encode_tail(tokenizer, tail))
                record[game]["candidates"].append(
                    [text.encode_action(tokenizer, tail, a) for a in e.valid_actions])
                allowed = [a for a in e.valid_actions if not a.startswith(NEVER)]
                actions.append(str(rng.choice(allowed)))
            episodes = batch.step(actions)
            new = [text.encode_pieces(tokenizer, [
                ACTION_SUFFIX.format(a), OBSERVATION_BLOCK.format(e.num_steps, e.observations[-1])])
                for a, e in zip(actions, episodes)]
    return dict(games=record, final_history=int(np.mean(
        [sum(map(len, g["context"])) for g in record])))


def run_ours(states: dict, window: int, incremental: bool) -> dict:
    from flax import nnx

    from jaxrl_llm.generation import DecodeState, compile_count, score_continuations
    from jaxrl_llm.model import load_model
    from jaxrl_llm.model.lora import LoraConfig, apply_lora
    from jaxrl_llm.padding import bucket_length, pad_candidates, pad_right

    _, model, _ = load_model(quantize="int8")
    apply_lora(model, LoraConfig(rank=8, alpha=32), nnx.Rngs(0))
    games = states["games"]
    steps = len(games[0]["tail"])
    measured = [t for t in range(steps) if t < window or t >= steps - window]

    def step_inputs(t, whole):
        prefix = [sum(g["context"][:t + 1], []) if whole else g["context"][t] for g in games]
        return ([p + g["tail"][t] for p, g in zip(prefix, games)],
                pad_candidates([g["candidates"][t] for g in games]), [len(p) for p in prefix])

    last = {}

    def score(state, t, whole):
        prefix, cands, keep = step_inputs(t, whole)
        (scores, _), state = score_continuations(model, state, *pad_right(prefix), *cands,
                                                 keep=keep)
        last["scores"] = np.asarray(scores[0, :len(games[0]["candidates"][t])]).tolist()
        return state

    times = {}
    if incremental:
        for timed in (False, True):  # the first pass compiles every program the second needs
            state = DecodeState.empty(model.config, len(games), 8192)
            for t in range(steps):
                start = time.time()
                state = score(state, t, False)
                if timed:
                    times[t] = time.time() - start
            programs = compile_count()
    else:
        for t in measured:
            for _ in range(2):  # a step that compiled is timed again
                before, start = compile_count(), time.time()
                total = max(sum(map(len, g["context"][:t + 1])) + len(g["tail"][t])
                            + sum(map(len, g["candidates"][t])) for g in games)
                score(DecodeState.empty(model.config, len(games), bucket_length(total)), t, True)
                times[t] = time.time() - start
                if compile_count() == before:
                    break
        programs = compile_count()
    return dict(times=[times[t] / len(games) for t in measured], programs=programs,
                scores=last["scores"])


def run_torch(states: dict, window: int, dtype: str) -> dict:
    import torch
    import transformers

    from jaxrl_llm.model import default_model_path

    torch.set_num_threads(os.cpu_count())
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path),
        dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).eval()
    games = states["games"]
    steps = len(games[0]["tail"])
    times = []
    for t in [t for t in range(steps) if t < window or t >= steps - window]:
        start = time.time()
        for g in games:
            prompt = sum(g["context"][:t + 1], []) + g["tail"][t]
            cands = g["candidates"][t]
            with torch.no_grad():
                out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                past.batch_repeat_interleave(len(cands))
                width = max(map(len, cands))
                ids = torch.zeros((len(cands), width), dtype=torch.long)
                mask = torch.zeros((len(cands), len(prompt) + width), dtype=torch.long)
                mask[:, :len(prompt)] = 1
                for c, a in enumerate(cands):
                    ids[c, :len(a)], mask[c, len(prompt):len(prompt) + len(a)] = \
                        torch.tensor(a), 1
                logits = model(ids, past_key_values=past, attention_mask=mask).logits
                # Candidate token 0 is predicted by the prompt's last position.
                logits = torch.cat([out.logits[:, -1:].expand(len(cands), 1, -1),
                                    logits[:, :-1]], 1).float()
                logprobs = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
                scores = (logprobs * mask[:, len(prompt):]).sum(1)
                if g is games[0]:
                    first = scores.tolist()
        times.append((time.time() - start) / len(games))
    return dict(times=times, programs=0, scores=first)


def child(args) -> None:
    with open(args.states) as f:
        states = json.load(f)
    engine = args.engine
    result = (run_torch(states, args.window, engine.split(":")[1]) if engine.startswith("torch")
              else run_ours(states, args.window, engine == "ours"))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(result))


ENGINES = ("ours", "ours:re-prefill", "torch:float32", "torch:bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games", type=int, default=8, help="test games 0..G-1 in lockstep")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--window", type=int, default=8,
                        help="steps timed at the start and at the end of the games")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--seed", type=int, default=0, help="of the random policy")
    parser.add_argument("--out", default="runs/benchmarks/play.json",
                        help="engine results, saved as each finishes and reused by a rerun")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--states", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)
    if args.games < 1 or not 1 <= args.window <= args.steps // 2:
        parser.error("--games must be >= 1 and --window in [1, --steps / 2]")
    # One entry per setting in --out: a run with other settings never overwrites saved ones.
    setting = f"games={args.games} steps={args.steps} window={args.window} seed={args.seed}"
    saved = {}
    try:
        if os.path.exists(args.out):
            with open(args.out) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except (OSError, ValueError) as error:
        parser.error(f"--out {args.out}: not a results file of this benchmark ({error})")
    results = saved.setdefault(setting, {})
    states = record_states(args.games, args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "states.json")
        with open(path, "w") as f:
            json.dump(states, f)
        for engine in args.engines:
            if engine in results:
                print(f"{engine}: saved in {args.out}", flush=True)
                continue
            print(f"running {engine} ...", flush=True)
            out = subprocess.run([sys.executable, "-m", "benchmarks.play", "--engine", engine,
                                  "--states", path, "--window", str(args.window)],
                                 capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{engine} failed:\n{out.stderr[-3000:]}")
            results[engine] = json.loads(line[len("RESULT "):])
            with open(args.out, "w") as f:
                json.dump(saved, f, indent=1)
    report({e: results[e] for e in args.engines}, args, states["final_history"])


def report(results: dict, args, final_history: int) -> None:
    w = args.window
    print(f"\n{args.games} games, {args.steps} steps, history ~{final_history} tokens at the end")
    print(f"{'engine':<18}{f's/step 1-{w}':>14}{f's/step {args.steps - w + 1}-{args.steps}':>16}"
          f"{'late/early':>12}{'programs':>10}{'peak RSS GB':>13}{'max |d score|':>15}")
    means = {}
    for engine, r in results.items():
        early, late = np.mean(r["times"][:w]), np.mean(r["times"][w:])
        means[engine] = (early, late)
        # Game 0's candidate scores at the last step against the first engine's.
        diff = np.max(np.abs(np.subtract(r["scores"], next(iter(results.values()))["scores"])))
        print(f"{engine:<18}{early:>14.3f}{late:>16.3f}{late / early:>12.2f}{r['programs']:>10}"
              f"{r['peak_rss_gb']:>13.2f}{diff:>15.2e}")
    if "ours" in means:
        ours = means["ours"]
        parts = []
        if "ours:re-prefill" in means:
            parts.append(f"incremental vs re-prefill: {means['ours:re-prefill'][1] / ours[1]:.1f}x")
        torch_best = [np.mean(means[e]) for e in means if e.startswith("torch")]
        if torch_best:
            parts.append(f"vs torch best: {min(torch_best) / np.mean(ours):.1f}x")
        print(", ".join(parts))


if __name__ == "__main__":
    main()
