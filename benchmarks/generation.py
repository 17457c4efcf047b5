"""Generation speed: ours (JAX, KV cache, buckets) vs transformers `generate` (torch CPU), same run.

    python -m benchmarks.generation                   # B = 1, 8, 32; 16 new tokens at T=1
    python -m benchmarks.generation --batch-sizes 8 --multi-turn-games 4

Prompts: gold paths of TextWorld cookingworld train games (seeds 0-49) in notebook 000's format
(max_history=11, as its SFT data). Every engine/dtype runs in its own subprocess so that the peak
RSS reported is its own. Reported per batch size: end-to-end tokens/s (new tokens / wall time),
prefill tokens/s (prompt tokens / time of a 1-token generate), decode tokens/s (the 15 further
tokens / the extra time), first-call (compile) time, peak RSS, and ours/torch-best ratios.
Multi-turn mode replays gold games step by step (the first train games whose gold path is at
least --multi-turn-steps long; full histories): incremental prefill (history in the cache, only
new text prefilled) vs re-prefilling the whole prompt each step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

NEW_TOKENS = 16


def prompts_and_tokenizer(num_seeds: int):
    from jaxrl_llm.data import expert_dataset
    from jaxrl_llm.envs.textworld import GameConfig
    from jaxrl_llm.model.loading import default_model_path, gguf_tokenizer

    path = default_model_path()
    tokenizer = gguf_tokenizer(path)
    data = expert_dataset(GameConfig(), range(num_seeds), "train", tokenizer, max_history=11,
                          cache_dir=".cache/benchmarks", progress=False)
    return data, tokenizer


def pick(data, batch_size: int, seed: int = 0) -> list[list[int]]:
    rows = np.random.default_rng(seed).choice(len(data), batch_size, replace=False)
    return sorted((data[int(i)]["prompt_ids"] for i in rows), key=len)  # grouped by length


def run_ours(args) -> dict:
    import jax

    from jaxrl_llm.generation import compile_count, generate
    from jaxrl_llm.padding import GROUP_ROWS, pad_right
    from jaxrl_llm.sampling import SamplingConfig
    from jaxrl_llm.model import load_model

    data, _ = prompts_and_tokenizer(args.seeds)
    _, model, _ = load_model(param_dtype=args.dtype)
    group_rows = GROUP_ROWS if args.group_rows is None else args.group_rows
    results = {}
    for batch_size in args.batch_sizes:
        prompts = pick(data, batch_size)
        timings = {}
        for new in (1, NEW_TOKENS):
            sampling = SamplingConfig(max_new_tokens=new)  # no stop ids: exactly `new` tokens
            start = time.time()
            generate(model, *pad_right(prompts), jax.random.key(0), sampling,
                     group_rows=group_rows).tokens.block_until_ready()
            first = time.time() - start
            start = time.time()
            generate(model, *pad_right(prompts), jax.random.key(1), sampling,
                     group_rows=group_rows).tokens.block_until_ready()
            timings[new] = (first, time.time() - start)
        results[batch_size] = summarize(prompts, timings)
    results["compiled_programs"] = compile_count()
    if args.multi_turn_games:
        results["multi_turn"] = multi_turn(model, args)
    return results


def multi_turn(model, args) -> dict:
    """Per-step time of incremental prefill vs full re-prefill, replaying gold games."""
    import jax

    from jaxrl_llm import text
    from jaxrl_llm.envs.textworld import (GameConfig, TextWorldBatch, prompt_pieces, step_tail)
    from jaxrl_llm.generation import DecodeState, extend, generate, generate_from
    from jaxrl_llm.padding import pad_right
    from jaxrl_llm.sampling import SamplingConfig
    from jaxrl_llm.model.loading import default_model_path, gguf_tokenizer

    path = default_model_path()
    tokenizer = gguf_tokenizer(path)
    games = args.multi_turn_games
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    with TextWorldBatch(GameConfig(step_limit=64), games) as batch:
        seeds = long_games(batch, args.multi_turn_steps)
        episodes = batch.reset(seeds, "train", gold=True)
        gold = [batch.gold_actions(i) for i in range(games)]
        steps = args.multi_turn_steps
        history = [text.encode_pieces(tokenizer, prompt_pieces(e)) for e in episodes]
        state = extend(model, DecodeState.empty(model.config, games, 4096), *pad_right(history))
        incremental, full, key = [], [], jax.random.key(0)
        for step in range(steps):
            tails = [text.encode_tail(tokenizer, step_tail(e)) for e in episodes]
            start = time.time()
            out, state = generate_from(model, state, *pad_right(tails), key, sampling)
            out.tokens.block_until_ready()
            incremental.append(time.time() - start)
            prompts = [h + t for h, t in zip(history, tails)]
            start = time.time()
            generate(model, *pad_right(prompts), key, sampling).tokens.block_until_ready()
            full.append(time.time() - start)
            episodes = batch.step([g[step] for g in gold])
            new = [text.encode_pieces(tokenizer, prompt_pieces(e)[-2:]) for e in episodes]
            start = time.time()
            state = extend(model, state, *pad_right(new))
            state.lengths.block_until_ready()
            incremental[-1] += time.time() - start
            history = [h + n for h, n in zip(history, new)]
    # The first steps compile new buckets on both sides: compare the second half.
    half = steps // 2
    return dict(games=games, seeds=seeds, steps=steps,
                final_prompt_tokens=int(np.mean([len(h) for h in history])),
                incremental_s_per_step=float(np.mean(incremental[half:])),
                full_s_per_step=float(np.mean(full[half:])))


def long_games(batch, steps: int) -> list[int]:
    """The first train seeds whose gold path has >= `steps` actions, one per game of `batch`."""
    seeds, start = [], 0
    while len(seeds) < batch.num_games:
        if start >= 10_000:
            raise ValueError(f"no {batch.num_games} train games with gold paths of {steps} steps "
                             "(they have 10-26): lower --multi-turn-steps")
        batch.reset(list(range(start, start + batch.num_games)), "train", gold=True)
        seeds += [start + i for i in range(batch.num_games)
                  if len(batch.gold_actions(i)) >= steps]
        start += batch.num_games
    return seeds[:batch.num_games]


def run_torch(args) -> dict:
    import torch
    import transformers

    from jaxrl_llm.model import default_model_path

    torch.set_num_threads(os.cpu_count())
    data, tokenizer = prompts_and_tokenizer(args.seeds)
    path = default_model_path()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
    results = {}
    for batch_size in args.batch_sizes:
        prompts = pick(data, batch_size)
        width = max(map(len, prompts))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding, as transformers expects
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        timings = {}
        for new in (1, NEW_TOKENS):  # torch compiles nothing: one timed run each
            start = time.time()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                               max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=tokenizer.pad_token_id)
            timings[new] = (time.time() - start,) * 2
        results[batch_size] = summarize(prompts, timings)
    return results


def summarize(prompts, timings) -> dict:
    batch_size = len(prompts)
    (_, t_1), (first_n, t_n) = timings[1], timings[NEW_TOKENS]
    return dict(prompt_tokens=int(sum(map(len, prompts))),
                tokens_per_s=batch_size * NEW_TOKENS / t_n,
                prefill_tokens_per_s=sum(map(len, prompts)) / t_1,
                # Noise (another process on the machine) can make t_n <= t_1: report nan then.
                decode_tokens_per_s=(batch_size * (NEW_TOKENS - 1) / (t_n - t_1)
                                     if t_n > t_1 else float("nan")),
                first_call_s=first_n, seconds=t_n)


def copy_bandwidth() -> float:
    """Bytes/s of a large memory copy (read + write counted once, as weights are only read)."""
    src = np.ones(256 * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return src.nbytes * 2 / best


def _timed(fn) -> float:
    start = time.time()
    fn()
    return time.time() - start


def child(args) -> None:
    result = run_ours(args) if args.engine == "ours" else run_torch(args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seeds", type=int, default=50, help="train seeds 0..N-1 for prompts")
    parser.add_argument("--multi-turn-games", type=int, default=8)
    parser.add_argument("--multi-turn-steps", type=int, default=20,
                        help="gold steps replayed (games with gold paths this long are picked; "
                             "the second half is timed, past the compiles of the first)")
    parser.add_argument("--engines", nargs="+", default=["ours:float32", "torch:float32",
                                                          "torch:bfloat16"])
    parser.add_argument("--group-rows", type=int, default=None,
                        help="ours: rows per length group of the prefill (>= B: no grouping; "
                             "default: the library's GROUP_ROWS)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)
    results = {}
    for spec in args.engines:
        engine, dtype = spec.split(":")
        command = [sys.executable, "-m", "benchmarks.generation", "--engine", engine, "--dtype",
                   dtype, "--seeds", str(args.seeds), "--multi-turn-games",
                   str(args.multi_turn_games if engine == "ours" else 0),
                   "--multi-turn-steps", str(args.multi_turn_steps),
                   *([] if args.group_rows is None else ["--group-rows", str(args.group_rows)]),
                   "--batch-sizes",
                   *map(str, args.batch_sizes)]
        print(f"running {spec} ...", flush=True)
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
        results[spec] = json.loads(line[len("RESULT "):])
    report(results, args)


def report(results: dict, args) -> None:
    bandwidth = copy_bandwidth()
    torch_specs = [s for s in results if s.startswith("torch")]
    print(f"\n{'engine':<16}{'B':>4}{'tok/s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'compile s':>11}{'peak RSS GB':>13}{'ours/torch best':>17}")
    for spec, result in results.items():
        for b in args.batch_sizes:
            r = result[str(b)]
            best = max((results[t][str(b)]["tokens_per_s"] for t in torch_specs), default=None)
            ratio = f"{r['tokens_per_s'] / best:.2f}x" if best and spec.startswith("ours") else ""
            print(f"{spec:<16}{b:>4}{r['tokens_per_s']:>9.1f}{r['prefill_tokens_per_s']:>15.0f}"
                  f"{r['decode_tokens_per_s']:>14.1f}{r['first_call_s']:>11.1f}"
                  f"{result['peak_rss_gb']:>13.2f}{ratio:>17}")
    ours = results.get("ours:float32")
    if ours:
        weights = 538_060_032  # float32 bytes of SmolLM2-135M (quant.parameter_bytes)
        steps_per_s = bandwidth / weights
        print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s -> roofline {steps_per_s:.0f} decode "
              f"steps/s for float32 weights")
        for b in args.batch_sizes:
            frac = ours[str(b)]["decode_tokens_per_s"] / b / steps_per_s
            print(f"  B={b}: decode at {100 * frac:.0f}% of the memory-bandwidth roofline")
        print(f"programs compiled by ours: {ours['compiled_programs']}")
        if "multi_turn" in ours:
            m = ours["multi_turn"]
            print(f"\nmulti-turn ({m['games']} games, {m['steps']} gold steps, final prompts "
                  f"~{m['final_prompt_tokens']} tokens): incremental {m['incremental_s_per_step']:.2f}"
                  f" s/step vs full re-prefill {m['full_s_per_step']:.2f} s/step = "
                  f"{m['full_s_per_step'] / m['incremental_s_per_step']:.1f}x")


if __name__ == "__main__":
    main()
