"""Console entry points: `nemovl-build` (checkpoints, plans, engines, repositories) and `nemovl` (serving).

Commands live next to the code they drive (`<area>/commands.py`); this file only wires them into two
click groups, loading each module on first use so `--help` stays fast (torch is not imported for it).
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked (or listed)."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            module_name, attr = self._lazy[name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy={
    "make-checkpoint": "nemovl_trt.checkpoint.commands:make_checkpoint",
    "plan": "nemovl_trt.build.commands:plan",
    "engines": "nemovl_trt.build.commands:engines",
    "repo": "nemovl_trt.triton.commands:repo",
    "train-tiny": "nemovl_trt.training.commands:train_tiny",
})
@click.version_option(package_name="nemovl-trt")
def build_cli() -> None:
    """Build Nemotron Nano 12B v2 VL for a GPU target (or the cpu target): checkpoints, memory plans,
    engines and the Triton model repository."""


@click.group(cls=LazyGroup, lazy={
    "serve": "nemovl_trt.server.commands:serve",
    "serve-triton": "nemovl_trt.triton.commands:serve_triton",
    "generate": "nemovl_trt.model.commands:generate",
    "eval": "nemovl_trt.training.commands:eval_cmd",
})
@click.version_option(package_name="nemovl-trt")
def serve_cli() -> None:
    """Serve Nemotron Nano 12B v2 VL: tritonserver + the OpenAI-compatible API."""
