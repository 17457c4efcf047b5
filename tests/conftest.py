"""Test-wide settings: silent broadcasting is an error, and the real-model tests are marked."""

import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the SmolLM2-135M GGUF (slower)")
    config.addinivalue_line("markers", "textworld: starts TextWorld Express JVMs")


@pytest.fixture(scope="session")
def smollm2():
    """(config, model, tokenizer) of the default SmolLM2-135M-Instruct GGUF, float32."""
    from jaxrl_llm.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_torch():
    """The same GGUF loaded by transformers + torch (float32, CPU): the numerical oracle."""
    import torch
    import transformers

    from jaxrl_llm.model import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
