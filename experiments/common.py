"""What the experiment entry points share: a command line built from a config dataclass, and the
frozen base model (the default GGUF, a given path, or "tiny": a random byte-level model)."""

from __future__ import annotations

import argparse
import dataclasses

from flax import nnx

from jaxrl_llm.model import ModelConfig, Transformer, load_model
from jaxrl_llm.model.quant import quantize_model
from jaxrl_llm.text import ByteTokenizer


def config_parser(defaults, description: str, label: str = "default",
                  types: dict[str, type] | None = None) -> argparse.ArgumentParser:
    """One `--field-name` flag per field of the dataclass instance `defaults`.

    Booleans get `--x / --no-x`, tuples take several values (of their first element's type),
    fields whose default is None take `types[name]` (else str). Every flag defaults to None, so
    `config_overrides` returns only what was given; the help shows `label: <default>`.
    """
    types = types or {}
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(defaults):
        value, flag = getattr(defaults, field.name), f"--{field.name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{label}: {value}")
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]) if value else str, nargs="+",
                                default=None, help=f"{label}: {' '.join(map(str, value))}")
        else:
            kind = types.get(field.name, str) if value is None else type(value)
            parser.add_argument(flag, type=kind, default=None, help=f"{label}: {value}")
    return parser


def config_overrides(args: argparse.Namespace | dict) -> dict:
    """The flags that were given, lists as tuples (config fields are immutable)."""
    args = args if isinstance(args, dict) else vars(args)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}


def parse_preset_config(cls, presets, description: str, argv=None,
                        types: dict[str, type] | None = None):
    """`--preset NAME` (default "cpu", built by `cls.preset`) and one flag per field of the
    config class `cls`; the flags given override the preset."""
    parser = config_parser(cls(), description, label="cpu preset", types=types)
    parser.add_argument("--preset", default="cpu", choices=presets, help="base configuration")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    return cls.preset(preset, **config_overrides(args))


def load_base(model_path: str | None, quantize: str | None, seed: int,
              tiny_max_seq_len: int = ModelConfig.tiny().max_seq_len):
    """(frozen base model, tokenizer): `model_path` None is the default SmolLM2 GGUF, "tiny" a
    random byte-level model for smoke runs and tests (context `tiny_max_seq_len`)."""
    if model_path == "tiny":
        model = Transformer(ModelConfig.tiny(vocab_size=ByteTokenizer.vocab_size,
                                             max_seq_len=tiny_max_seq_len), rngs=nnx.Rngs(seed))
        return (quantize_model(model) if quantize else model), ByteTokenizer()
    _, model, tokenizer = load_model(model_path, quantize=quantize or None)
    return model, tokenizer
