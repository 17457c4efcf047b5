"""Sharded vs single-device equality on 8 simulated CPU devices (run by tests/test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice_check

Prints one JSON line: per mesh, the largest differences from the one-device run and the
partition specs actually used.
"""

import json

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl_llm.generation import generate
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.lora import LoraConfig, apply_lora, lora_layers
from jaxrl_llm.model.quant import quantize_model
from jaxrl_llm.padding import pad_right
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.sharding import MeshConfig, make_mesh, shard_batch, shard_model
from jaxrl_llm.train.sft import SFTConfig, batches, completion_loss
from jaxrl_llm.train.step import Trainer

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
LORA_A = "layers.0.self_attn.q_proj.lora_a"


def policy() -> Transformer:
    model = quantize_model(Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0)), embeddings=True)
    apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(1))
    for i, layer in enumerate(lora_layers(model).values()):  # adapters that matter
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    return model


def sample(model, mesh):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in rng.integers(3, 30, 8)]
    out = generate(model, *pad_right(prompts), jax.random.key(0),
                   SamplingConfig(max_new_tokens=8, temperature=1.0), mesh=mesh)
    return np.asarray(out.tokens), np.asarray(out.logprobs)


def train(model, mesh, steps=2):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, n).tolist() for n in rng.integers(5, 40, 16)]
    completions = [rng.integers(3, 256, n).tolist() for n in rng.integers(1, 6, 16)]
    trainer = Trainer(model, optax.adam(1e-2), completion_loss, mesh=mesh)
    state, losses = trainer.init(), []
    for batch in list(batches(prompts, completions, SFTConfig(batch_size=8,
                                                              micro_batch_size=8), 0))[:steps]:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, np.array(losses)


def spec(x) -> list:
    """`[partition spec, number of distinct pieces the array is cut into]`."""
    return [str(tuple(x.sharding.spec)), len({str(s.index) for s in x.addressable_shards})]


def cache_of(model, mesh):
    from jaxrl_llm.generation import DecodeState
    return DecodeState.empty(model.config, 8, 64, mesh).cache.keys[0]


def main() -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tokens, logprobs = sample(policy(), one)
    _, state, losses = train(policy(), one)
    lora = np.asarray(state.trainable[LORA_A.split(".")[0]][0]["self_attn"]["q_proj"]
                      ["lora_a"][...])
    report = {}
    for shape in MESHES:
        mesh = make_mesh(MeshConfig(*shape))
        model = shard_model(policy(), mesh)
        sharded_tokens, sharded_logprobs = sample(model, mesh)
        trainer, sharded_state, sharded_losses = train(policy(), mesh)
        q_proj = sharded_state.trainable["layers"][0]["self_attn"]["q_proj"]
        mu = sharded_state.opt_state[0].mu["layers"][0]["self_attn"]["q_proj"]["lora_a"][...]
        report["x".join(map(str, shape))] = dict(
            tokens_equal=bool((sharded_tokens == tokens).all()),
            logprob_max_diff=float(np.abs(sharded_logprobs - logprobs).max()),
            loss_max_rel_diff=float(np.max(np.abs(sharded_losses - losses) / np.abs(losses))),
            lora_max_diff=float(np.abs(np.asarray(q_proj["lora_a"][...]) - lora).max()),
            base_q_proj=spec(model.layers[0].self_attn.q_proj.base.q[...]),
            base_o_proj=spec(model.layers[0].self_attn.o_proj.base.q[...]),
            embedding=spec(model.embed_tokens.q[...]),
            frozen_q_proj=spec(trainer.frozen["layers"][0]["self_attn"]["q_proj"]["base"]["q"][...]),
            lora_a=spec(q_proj["lora_a"][...]), lora_b=spec(q_proj["lora_b"][...]),
            adam_mu_lora_a=spec(mu), kv_cache=spec(cache_of(model, mesh)))
    errors = {}
    for name, fn in (("mesh", lambda: make_mesh(MeshConfig(3, 1, 1))),
                     ("batch", lambda: shard_batch(make_mesh(MeshConfig(4, 2, 1)),
                                                   np.zeros((6, 3))))):
        try:
            fn()
        except ValueError as error:
            errors[name] = str(error)
    print("RESULT " + json.dumps(dict(meshes=report, errors=errors)))


if __name__ == "__main__":
    main()
