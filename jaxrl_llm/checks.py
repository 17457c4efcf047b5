"""Validation shared by the configuration dataclasses: one message format for the same mistake."""

from __future__ import annotations


def _field(config, name: str, cli: bool) -> str:
    return f"--{name.replace('_', '-')}" if cli else f"{type(config).__name__}.{name}"


def require_at_least_one(config, names, cli: bool = False) -> None:
    """Raise if any of the integer fields `names` of `config` is below 1.

    `cli=True` names them as command-line flags (`--num-envs`), for experiment configs.
    """
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{_field(config, name, cli)} must be >= 1, got {value}")


def require_micro_batches(config, batch_name: str) -> None:
    """Raise unless `config.<batch_name>` is a multiple of `config.micro_batch_size`."""
    batch, micro = getattr(config, batch_name), config.micro_batch_size
    if batch % micro:
        raise ValueError(f"{_field(config, batch_name, False)}={batch} must be a multiple of "
                         f"micro_batch_size={micro}")

