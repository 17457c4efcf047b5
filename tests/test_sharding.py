"""Sharding: on 8 simulated CPU devices, meshes (8,1,1), (2,4,1), (2,2,2) give the tokens and
losses of the one-device run, and weights / optimizer state are really split."""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_llm.sharding import MeshConfig, host_shard, param_spec


@pytest.fixture(scope="module")
def report():
    # A subprocess: the device count is fixed when JAX starts, and other tests keep one device.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "tests.multidevice_check"], env=env,
                         capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, out.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_sharded_generate_and_train_step_equal_one_device(report, mesh):
    r = report["meshes"][mesh]
    assert r["tokens_equal"]
    assert r["logprob_max_diff"] < 1e-4
    assert r["loss_max_rel_diff"] < 1e-5
    assert r["lora_max_diff"] < 1e-5


def test_weights_and_optimizer_state_are_split(report):
    data_only, fsdp, full = (report["meshes"][m] for m in ("8x1x1", "2x4x1", "2x2x2"))
    assert data_only["base_q_proj"][1] == 1  # data parallel: every device holds all weights
    assert data_only["kv_cache"] == ["(('data', 'fsdp'), None, None, None)", 8]
    assert fsdp["base_q_proj"] == ["('fsdp', 'tensor')", 4]
    assert full["base_q_proj"] == ["('fsdp', 'tensor')", 4]
    assert full["base_o_proj"] == ["('tensor', 'fsdp')", 4]
    assert full["embedding"] == ["('tensor', 'fsdp')", 4]
    assert full["frozen_q_proj"] == full["base_q_proj"]  # the trainer's copy too
    assert full["lora_a"] == full["adam_mu_lora_a"] == ["('fsdp', None)", 2]
    assert fsdp["adam_mu_lora_a"] == ["('fsdp', None)", 4]
    assert full["lora_b"] == ["(None, 'tensor')", 2]


def test_bad_mesh_and_batch_errors(report):
    assert "does not match the 8 devices" in report["errors"]["mesh"]
    assert "not divisible by the data-parallel size 8" in report["errors"]["batch"]


def test_mesh_config_and_rules_without_devices():
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1)
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)
    assert host_shard(list(range(8)), 1, 4) == [2, 3]
    with pytest.raises(ValueError, match="multiple of 4"):
        host_shard(list(range(6)), 0, 4)


class _Mesh:  # param_spec only reads axis sizes
    shape = {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("path, shape, expected", [
    ("layers.0.self_attn.k_proj.kernel", (576, 192), ("fsdp", "tensor")),
    ("layers.0.self_attn.k_proj.base.scale", (192,), ("tensor",)),
    ("layers.0.mlp.down_proj.lora_a", (1536, 8), ("tensor", None)),
    ("layers.0.mlp.down_proj.lora_b", (8, 576), (None, "fsdp")),
    ("layers.0.self_attn.k_proj.kernel", (576, 3), ("fsdp", None)),  # 3 heads: not split
    ("layers.0.input_layernorm.weight", (576,), ()),
    ("value_head.kernel", (576,), ()),
])
def test_partition_rules(path, shape, expected):
    assert tuple(param_spec(path, shape, _Mesh())) == expected
