"""Triton `config.pbtxt` files, built as tritonclient's `ModelConfig` protobuf and written in protobuf text
format, so every generated file is checked by the same schema tritonserver parses it with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

DTYPES: dict[str, int] = {
    "BYTES": mc.TYPE_STRING, "BOOL": mc.TYPE_BOOL, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "BF16": mc.TYPE_BF16, "FP32": mc.TYPE_FP32,
}


class ConfigError(ValueError):
    """A config.pbtxt does not parse as a Triton ModelConfig."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input/output: Triton dtype name (e.g. "BYTES", "INT64"), dims (-1 = variable; without the
    batch dimension when the model batches), whether an input may be omitted, and what it means."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    meaning: str = ""
    optional: bool = False


def _fill_tensor(msg, spec: TensorSpec) -> None:
    msg.name = spec.name
    msg.data_type = DTYPES[spec.dtype]
    msg.dims.extend(spec.dims)


def model_config(name: str, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 backend: str | None = None, platform: str | None = None, max_batch_size: int = 0,
                 decoupled: bool = False, instance_count: int = 1, instance_kind: str = "KIND_CPU",
                 dynamic_batching_delay_us: int | None = None,
                 parameters: Mapping[str, str] | None = None,
                 default_model_filename: str | None = None) -> mc.ModelConfig:
    """Build a ModelConfig. `instance_kind` is "KIND_CPU" or "KIND_GPU"; `dynamic_batching_delay_us`
    enables dynamic batching with that queue delay (µs)."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    if default_model_filename:
        cfg.default_model_filename = default_model_filename
    for spec in inputs:
        t = cfg.input.add()
        _fill_tensor(t, spec)
        if spec.optional:
            t.optional = True
    for spec in outputs:
        _fill_tensor(cfg.output.add(), spec)
    group = cfg.instance_group.add()
    group.count = instance_count
    group.kind = mc.ModelInstanceGroup.Kind.Value(instance_kind)
    if dynamic_batching_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = dynamic_batching_delay_us
    if decoupled:
        cfg.model_transaction_policy.decoupled = True
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def to_text(cfg: mc.ModelConfig) -> str:
    """Protobuf text format of `cfg` (deterministic field order), validated by parsing it back."""
    text = text_format.MessageToString(cfg)
    if parse_config(text) != cfg:
        raise ConfigError(f"config of model {cfg.name!r} does not round-trip through text format.")
    return text


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text into a ModelConfig; raises ConfigError naming the problem."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"config.pbtxt does not parse as a Triton ModelConfig: {e}") from None


def parameters_of(cfg: mc.ModelConfig) -> dict[str, str]:
    """The `parameters` map as plain strings."""
    return {k: v.string_value for k, v in cfg.parameters.items()}
