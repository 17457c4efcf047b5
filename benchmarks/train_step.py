"""LoRA train step on 8 TextWorld (prompt + action) examples: ours vs torch + transformers + peft.

    python -m benchmarks.train_step

Examples: gold-path steps of TextWorld train games in notebook 000's format (max_history=11, as
its SFT data), LoRA r=4, alpha=32 on all linear layers, loss on the action tokens. Each variant
runs in its own subprocess (peak RSS is its own) and times the mean of 3 steps after one warm-up
step (which includes compilation for ours). Real tokens/s counts prompt + action tokens that are
not padding. Reported: real tokens/s, peak RSS, and ours / torch-best ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.generation import prompts_and_tokenizer

STEPS = 3
EXAMPLES = 8


def examples(seeds: int):
    data, tokenizer = prompts_and_tokenizer(seeds)
    rows = np.random.default_rng(0).choice(len(data), EXAMPLES, replace=False)
    prompts = [data[int(i)]["prompt_ids"] for i in rows]
    actions = [data[int(i)]["action_ids"] for i in rows]
    return prompts, actions, tokenizer


def run_ours(args) -> dict:
    import functools

    import jax
    from flax import nnx

    from jaxrl_llm.model import load_model
    from jaxrl_llm.model.lora import LoraConfig, apply_lora
    from jaxrl_llm.train.sft import SFTConfig, batches, completion_loss
    from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

    prompts, actions, tokenizer = examples(args.seeds)
    _, model, _ = load_model(quantize=None if args.base == "float32" else args.base)
    apply_lora(model, LoraConfig(rank=4, alpha=32), nnx.Rngs(0))
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=5e-5)),
                      functools.partial(completion_loss, remat=args.remat))
    config = SFTConfig(batch_size=EXAMPLES, micro_batch_size=args.micro_batch,
                       completion_len=16, remat=args.remat)
    batch = next(batches(prompts, actions, config, 0, pad_id=tokenizer.eos_token_id))
    state = trainer.init()
    state, metrics = trainer.step(state, batch)  # compile + warm-up
    jax.block_until_ready(metrics)
    start = time.time()
    for _ in range(STEPS):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    return dict(seconds_per_step=(time.time() - start) / STEPS,
                real_tokens=sum(map(len, prompts)) + sum(map(len, actions)))


def run_torch(args) -> dict:
    import os

    import peft
    import torch
    import transformers

    from jaxrl_llm.model import default_model_path

    torch.set_num_threads(os.cpu_count())
    prompts, actions, tokenizer = examples(args.seeds)
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    if args.remat:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    sequences = [p + a for p, a in zip(prompts, actions)]

    def step():
        optimizer.zero_grad()
        for start in range(0, EXAMPLES, args.micro_batch):
            group = range(start, start + args.micro_batch)
            width = max(len(sequences[i]) for i in group)
            ids = torch.full((len(group), width), tokenizer.eos_token_id)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            labels = torch.full((len(group), width), -100)
            for row, i in enumerate(group):
                n, a = len(sequences[i]), len(actions[i])
                ids[row, :n], mask[row, :n] = torch.tensor(sequences[i]), 1
                labels[row, n - a:n] = torch.tensor(actions[i])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss * len(group) / EXAMPLES).backward()
        optimizer.step()

    step()
    start = time.time()
    for _ in range(STEPS):
        step()
    return dict(seconds_per_step=(time.time() - start) / STEPS,
                real_tokens=sum(map(len, sequences)))


VARIANTS = {  # name: (engine, base, micro_batch, remat)
    "torch fp32, batch 8, checkpointing": ("torch", "float32", 8, True),
    "torch fp32, 8 micro-batches of 1": ("torch", "float32", 1, False),
    "ours int8, 8 micro-batches of 1": ("ours", "int8", 1, False),
    "ours int8, 8 micro-batches of 1, remat": ("ours", "int8", 1, True),
    "ours int8, 4 micro-batches of 2": ("ours", "int8", 2, False),
    "ours int8, 4 micro-batches of 2, remat": ("ours", "int8", 2, True),
    "ours int8, 2 micro-batches of 4, remat": ("ours", "int8", 4, True),
    "ours fp32, 8 micro-batches of 1, remat": ("ours", "float32", 1, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, base, micro_batch, remat = VARIANTS[args.child]
        args.base, args.micro_batch, args.remat = base, micro_batch, remat
        result = run_ours(args) if engine == "ours" else run_torch(args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for name in args.variants:
        print(f"running {name} ...", flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--child", name,
                              "--seeds", str(args.seeds)], capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"  failed: {out.stderr.strip().splitlines()[-1] if out.stderr else '?'}")
            continue
        results[name] = json.loads(line[len("RESULT "):])
    torch_runs = [r for n, r in results.items() if n.startswith("torch")]
    best_speed = max((r["real_tokens"] / r["seconds_per_step"] for r in torch_runs), default=0)
    best_rss = min((r["peak_rss_gb"] for r in torch_runs), default=0)
    print(f"\n{'variant':<42}{'s/step':>8}{'real tok/s':>12}{'peak RSS GB':>13}"
          f"{'speed vs torch best':>21}{'RSS vs torch best':>19}")
    for name, r in results.items():
        speed = r["real_tokens"] / r["seconds_per_step"]
        vs = (f"{speed / best_speed:.2f}x", f"{r['peak_rss_gb'] / best_rss:.2f}x") if (
            best_speed and name.startswith("ours")) else ("", "")
        print(f"{name:<42}{r['seconds_per_step']:>8.1f}{speed:>12.0f}{r['peak_rss_gb']:>13.2f}"
              f"{vs[0]:>21}{vs[1]:>19}")


if __name__ == "__main__":
    main()
