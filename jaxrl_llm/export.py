"""Export trained adapters for the PyTorch world: PEFT LoRA format, or merged full weights.

`save_peft_adapter` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's key
names, so `peft.PeftModel.from_pretrained(base, path)` applies them to the same base model
(`loading.save_hf_dir` of the float base, or the original checkpoint). `save_merged` folds the
adapters into dequantized float kernels and writes a plain Hugging Face directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from jaxrl_llm.model.llama import Transformer
from jaxrl_llm.model.loading import save_hf_dir
from jaxrl_llm.model.lora import LoraConfig, lora_layers, merge_lora
from jaxrl_llm.model.quant import dequantize_model

_PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM -> LlamaModel


def save_peft_adapter(path: str, model: Transformer, lora_config: LoraConfig,
                      base_model_name_or_path: str = "") -> None:
    """Write `model`'s adapters in PEFT's on-disk LoRA format (lora_A `[r, in]`, B `[out, r]`)."""
    from safetensors.numpy import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export: attach them with apply_lora")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(layer.lora_a[...], np.float32).T)
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(layer.lora_b[...], np.float32).T)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora_config.rank,
                  lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                  target_modules=sorted(lora_config.targets), bias="none",
                  fan_in_fan_out=False, inference_mode=True, use_rslora=False,
                  base_model_name_or_path=base_model_name_or_path)
    if lora_config.layers is not None:
        config["layers_to_transform"] = list(lora_config.layers)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_peft_adapter(path: str, model: Transformer) -> Transformer:
    """Load PEFT adapter weights into a model that already has matching adapters attached."""
    from safetensors.numpy import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: expected a directory written by "
                                "save_peft_adapter (adapter_config.json + adapter_model.safetensors)")
    tensors = load_file(file)
    for name, layer in lora_layers(model).items():
        for attr, key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            full = f"{_PEFT_PREFIX}{name}.{key}.weight"
            if full not in tensors:
                raise ValueError(f"{file} has no tensor {full}: adapters of another model/config")
            variable = getattr(layer, attr)
            value = tensors[full].T
            if value.shape != variable.shape:
                raise ValueError(f"{full} has shape {value.T.shape}, the model expects "
                                 f"{variable.shape[::-1]}")
            variable[...] = value
    return model


def save_merged(path: str, model: Transformer, model_type: str = "llama") -> None:
    """Write base + adapters as one float Hugging Face model; the caller's model is untouched."""
    merged = dequantize_model(merge_lora(nnx.clone(model)))
    save_hf_dir(path, merged.config, merged, model_type=model_type)
