"""Test-wide settings: silent broadcasting is an error, the real-model tests are marked, and
compiled programs are shared through one run's disk cache."""

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the SmolLM2-135M GGUF (slower)")
    config.addinivalue_line("markers", "textworld: starts TextWorld Express JVMs")
    # Tests build the same programs many times over (a Trainer or play per test, the smoke
    # runs in subprocesses): one disk cache per run, made by the first process and inherited
    # by xdist workers and subprocesses through the environment, spares the slow recompiles.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config.xla_cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
            prefix="jaxrl_llm_xla_")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    if hasattr(config, "xla_cache"):
        shutil.rmtree(config.xla_cache, ignore_errors=True)


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
