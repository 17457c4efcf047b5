"""PEFT export: transformers + peft reproduce our adapted logits; merged weights load anywhere."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm.export import load_peft_adapter, save_merged, save_peft_adapter
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.loading import save_hf_dir
from jaxrl_llm.model.lora import LoraConfig, apply_lora, lora_layers
from jaxrl_llm.model.quant import quantize_model
from tests.test_lora import TOKENS, logits_of

LORA = LoraConfig(rank=4, alpha=32)


def adapted(quantize=False, lora=LORA):
    base = Transformer(ModelConfig.tiny(tie_embeddings=False), rngs=nnx.Rngs(0))
    model = nnx.clone(base)
    if quantize:
        quantize_model(model, embeddings=True)  # lm_head stays int8: no adapter on it
    apply_lora(model, lora, nnx.Rngs(1))
    for i, layer in enumerate(lora_layers(model).values()):  # make the adapters matter
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    return base, model


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(TOKENS)).logits.float().numpy()


@pytest.mark.parametrize("lora", [LORA, LoraConfig.top_layers(1, 2, rank=4, alpha=32)],
                         ids=["all_layers", "top_layer"])
def test_peft_loads_our_adapters(tmp_path, lora):
    import peft

    base, model = adapted(lora=lora)
    save_hf_dir(str(tmp_path / "base"), base.config, base)
    save_peft_adapter(str(tmp_path / "adapter"), model, lora)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                           dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ours = logits_of(model, TOKENS)
    assert np.abs(ours - logits_of(base, TOKENS)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4, rtol=1e-4)


def test_merged_int8_model_loads_in_transformers(tmp_path):
    _, model = adapted(quantize=True)
    ours = logits_of(model, TOKENS)
    save_merged(str(tmp_path / "merged"), model)
    assert lora_layers(model)  # the caller's model keeps its adapters
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                           dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(hf), ours, atol=1e-4, rtol=1e-4)


def test_peft_round_trip_and_errors(tmp_path):
    _, model = adapted()
    save_peft_adapter(str(tmp_path), model, LORA)
    _, fresh = adapted()
    for layer in lora_layers(fresh).values():
        layer.lora_b[...] = 0 * layer.lora_b[...]
    load_peft_adapter(str(tmp_path), fresh)
    np.testing.assert_array_equal(logits_of(fresh, TOKENS), logits_of(model, TOKENS))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(str(tmp_path / "x"), Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0)),
                          LORA)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        load_peft_adapter(str(tmp_path / "missing"), fresh)
