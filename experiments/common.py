"""What the experiment entry points share: a command line built from a config dataclass, and the
frozen base model (the default GGUF, a given path, or "tiny": a random byte-level model)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

from flax import nnx

from jaxrl_llm.model import ModelConfig, Transformer, load_model
from jaxrl_llm.model.quant import quantize_model
from jaxrl_llm.text import ByteTokenizer


def field_docs(cls) -> dict[str, str]:
    """Each field's documentation as written in the class: its trailing `# comment`, or else
    the comment lines just above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs, above = {}, []
    for line in inspect.getsourcelines(cls)[0]:
        line = line.strip()
        if line.startswith("#"):
            above.append(line.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:[^=]*=[^#]*(?:#\s*(.*))?$", line)
        if match and match.group(1) in names:
            docs[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return docs


def config_parser(defaults, description: str, label: str = "default",
                  types: dict[str, type] | None = None) -> argparse.ArgumentParser:
    """One `--field-name` flag per field of the dataclass instance `defaults`.

    Booleans get `--x / --no-x`, tuples take several values (of their first element's type),
    fields whose default is None take `types[name]` (else str). Every flag defaults to None, so
    `config_overrides` returns only what was given; the help shows the field's documentation
    (`field_docs`) and `(label: <default>)`.
    """
    types = types or {}
    docs = field_docs(type(defaults))
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(defaults):
        value, flag = getattr(defaults, field.name), f"--{field.name.replace('_', '-')}"
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        # argparse %-formats help strings.
        help_text = f"{docs.get(field.name, '')} ({label}: {shown})".strip().replace("%", "%%")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]) if value else str, nargs="+",
                                default=None, help=help_text)
        else:
            kind = types.get(field.name, str) if value is None else type(value)
            parser.add_argument(flag, type=kind, default=None, help=help_text)
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


def arm_grid(algorithms, kl_coefs) -> list[tuple[str, float]]:
    """Every (algorithm, KL coefficient) pair of `--algorithms` x `--kl-coefs`: one arm each."""
    if not algorithms or not kl_coefs:
        raise ValueError("--algorithms and --kl-coefs each need at least one value")
    return [(a, k) for a in algorithms for k in kl_coefs]


def arm_dir(algorithm: str, kl_coef: float) -> str:
    """An arm's subdirectory of the run directory, e.g. `ppo_kl0.1`."""
    return f"{algorithm}_kl{kl_coef:g}"


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
