"""FAKE tensorrt for the CPU tests — not TensorRT; it builds no engine. Every class, method, keyword and enum
member it offers is one recorded from TensorRT's Python bindings in tests/data/upstream/tensorrt.json;
calls are bound against the recorded signatures, so a renamed keyword or a removed flag fails on CPU.
`build_serialized_network` returns a JSON "plan" describing what was asked (flags, pools, profiles)."""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Any

from tests.upstream_contract import check_call, members

LIB = "tensorrt"


def _enum(name: str) -> type[enum.IntEnum]:
    return enum.IntEnum(name.rsplit(".", 1)[-1], {m: i for i, m in enumerate(members(LIB, name))})


NetworkDefinitionCreationFlag = _enum("tensorrt.NetworkDefinitionCreationFlag")
MemoryPoolType = _enum("tensorrt.MemoryPoolType")
BuilderFlag = _enum("tensorrt.BuilderFlag")
Severity = _enum("tensorrt.ILogger.Severity")


def _checked(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return dict(check_call(LIB, name, args, kwargs).arguments)


class Logger:
    WARNING, ERROR, INFO, VERBOSE, INTERNAL_ERROR = (Severity.WARNING, Severity.ERROR, Severity.INFO,
                                                    Severity.VERBOSE, Severity.INTERNAL_ERROR)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.min_severity = _checked("tensorrt.Logger", *args, **kwargs).get("min_severity", Severity.WARNING)


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.parsed_from: str | None = None


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, *args: Any, **kwargs: Any) -> None:
        a = _checked("tensorrt.IOptimizationProfile.set_shape", *args, **kwargs)
        lo, opt, hi = (tuple(a[k]) for k in ("min", "opt", "max"))
        if not (len(lo) == len(opt) == len(hi)) or any(not x <= y <= z for x, y, z in zip(lo, opt, hi, strict=True)):
            raise ValueError(f"set_shape: need min <= opt <= max, got {lo} {opt} {hi}")
        self.shapes[a["input"]] = (lo, opt, hi)


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fake-timing-cache"

    def serialize(self) -> bytes:
        _checked("tensorrt.ITimingCache.serialize")
        return self.data


class IBuilderConfig:
    def __init__(self) -> None:
        self.pools: dict[int, int] = {}
        self.flags_set: set[int] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.cache: ITimingCache | None = None

    def set_memory_pool_limit(self, *args: Any, **kwargs: Any) -> None:
        a = _checked("tensorrt.IBuilderConfig.set_memory_pool_limit", *args, **kwargs)
        self.pools[int(MemoryPoolType(a["pool"]))] = int(a["pool_size"])

    def set_flag(self, flag: Any) -> None:
        self.flags_set.add(int(BuilderFlag(flag)))

    def create_timing_cache(self, *args: Any, **kwargs: Any) -> ITimingCache:
        a = _checked("tensorrt.IBuilderConfig.create_timing_cache", *args, **kwargs)
        return ITimingCache(bytes(a["serialized_timing_cache"]))

    def set_timing_cache(self, *args: Any, **kwargs: Any) -> bool:
        a = _checked("tensorrt.IBuilderConfig.set_timing_cache", *args, **kwargs)
        self.cache = a["cache"]
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        _checked("tensorrt.IBuilderConfig.get_timing_cache")
        return self.cache

    def add_optimization_profile(self, *args: Any, **kwargs: Any) -> int:
        self.profiles.append(_checked("tensorrt.IBuilderConfig.add_optimization_profile", *args, **kwargs)["profile"])
        return len(self.profiles) - 1


class Builder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _checked("tensorrt.Builder", *args, **kwargs)

    def create_network(self, *args: Any, **kwargs: Any) -> INetworkDefinition:
        return INetworkDefinition(int(_checked("tensorrt.Builder.create_network", *args, **kwargs).get("flags", 0)))

    def create_builder_config(self) -> IBuilderConfig:
        _checked("tensorrt.Builder.create_builder_config")
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        _checked("tensorrt.Builder.create_optimization_profile")
        return IOptimizationProfile()

    def build_serialized_network(self, *args: Any, **kwargs: Any) -> bytes:
        a = _checked("tensorrt.Builder.build_serialized_network", *args, **kwargs)
        net, cfg = a["network"], a["config"]
        strongly_typed = bool(net.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        precision_flags = cfg.flags_set & {int(BuilderFlag.FP16), int(BuilderFlag.BF16), int(BuilderFlag.INT8)}
        if strongly_typed and precision_flags:
            raise RuntimeError("precision builder flags are not allowed on a strongly typed network")
        return json.dumps({"fake_plan": True, "onnx": net.parsed_from, "strongly_typed": strongly_typed,
                           "pools": cfg.pools, "profiles": [p.shapes for p in cfg.profiles]}).encode()


class OnnxParser:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.network = _checked("tensorrt.OnnxParser", *args, **kwargs)["network"]
        self._errors: list[str] = []

    def parse_from_file(self, *args: Any, **kwargs: Any) -> bool:
        path = Path(_checked("tensorrt.OnnxParser.parse_from_file", *args, **kwargs)["model"])
        if not path.is_file():
            self._errors.append(f"file not found: {path}")
            return False
        self.network.parsed_from = path.name
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, *args: Any, **kwargs: Any) -> str:
        return self._errors[int(_checked("tensorrt.OnnxParser.get_error", *args, **kwargs)["index"])]


def module() -> types.ModuleType:
    """The fake `tensorrt` module object."""
    m = types.ModuleType("tensorrt")
    m.__doc__ = "FAKE tensorrt (tests/fake_tensorrt.py)"
    m.__version__ = "fake"
    for obj in (Logger, Builder, OnnxParser, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag):
        setattr(m, obj.__name__, obj)
    return m
