"""Dependency declarations (pyproject.toml, Makefile) against what nemovl_trt/ actually imports.

The imports are read with `ast` (top-level, function-level, ``if TYPE_CHECKING:`` blocks, and the constant
module names given to ``importlib.import_module`` / ``require_gpu``), mapped to distributions with
``importlib.metadata.packages_distributions()`` plus `IMPORT_TO_DIST` for modules that are not installed
here (the GPU stack) or whose top-level name is shared, and compared with [project.dependencies] and
[project.optional-dependencies].
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nemovl_trt"

# Import name (or dotted prefix) -> distribution, where packages_distributions() cannot tell: the GPU
# stack is not installed on the CPU machines, and `google` is a namespace several distributions share.
IMPORT_TO_DIST = {
    "tensorrt": "tensorrt",
    "tensorrt_llm": "tensorrt-llm",
    "modelopt": "nvidia-modelopt",
    "google.protobuf": "protobuf",
    "pytriton": "nvidia-pytriton",
    "decord": "decord",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "torchcodec": "torchcodec",
}
# Modules that no distribution provides: the runtime puts them there.
RUNTIME_PROVIDED = {
    "triton_python_backend_utils": "injected by Triton's Python backend into the stub process",
}
# Base dependencies that nemovl_trt/ never imports, with the reason each is still needed.
NOT_IMPORTED_ALLOWED = {
    "onnx": "torch.onnx.export (TorchScript exporter, dynamo=False) imports it to write the vision ONNX "
            "(without it: OnnxExporterError 'Module onnx is not installed!'); recorded in the build manifest",
}
# Python files under nemovl_trt/ that nemovl_trt never imports: code shipped to run somewhere else. Their
# imports must be declared, but need not be lazy.
SHIPPED_NOT_IMPORTED = {
    "nemovl_trt/build/remote_code/": "read as text and copied into the TensorRT-LLM bundle, where transformers "
                                     "runs it (trust_remote_code)",
}
# Only installable inside NVIDIA's container (PyPI has stubs): must be in the `gpu` extra, never in base.
GPU_ONLY = {"tensorrt", "tensorrt-llm", "nvidia-modelopt"}
# No manylinux aarch64 wheel (checked with `pip download --only-binary=:all: --platform manylinux_2_28_aarch64
# ...`): never a hard dependency (GH200 / GB200 are aarch64).
NO_AARCH64_WHEELS = {"decord"}
# torch builds the base range must admit: the CPU wheel the Makefile installs, and the builds in NVIDIA's
# tritonserver:<yy.mm>-trtllm-python-py3 images (Triton compatibility matrix: 25.10 and 25.12).
TORCH_BUILDS = ["2.13.0", "2.13.0+cpu", "2.8.0a0+5228986c39.nv25.6", "2.9.0a0+145a3a7bda.nv25.10"]
# numpy versions the base range must admit: TensorRT-LLM <= 1.2 pins numpy<2 (NGC's pip constraint is
# 1.26.4); its later constraints.txt asks numpy>=2.0.0,<2.4.
NUMPY_BUILDS = ["1.26.4", "2.3.5"]

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_DYNAMIC_IMPORTERS = {"import_module", "require_gpu"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Import:
    module: str
    where: str  # path:line
    lazy: bool  # inside a function (or a TYPE_CHECKING block): not run when the module is imported


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, where, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append(Import(node.module, where, lazy))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in _DYNAMIC_IMPORTERS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                            and _MODULE_RE.fullmatch(arg.value):
                        found.append(Import(arg.value, where, lazy))
                        break
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(tree, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    out: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        out.extend(_imports_of(path))
    return tuple(out)


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def dist_of(module: str) -> str | None:
    """The distribution that provides `module`; None for the stdlib, first-party and runtime modules.
    Raises LookupError when it cannot be told."""
    top = module.split(".")[0]
    if top == "nemovl_trt" or top in sys.stdlib_module_names or top in RUNTIME_PROVIDED:
        return None
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in IMPORT_TO_DIST:
            return _norm(IMPORT_TO_DIST[".".join(parts[:n])])
    dists = sorted({_norm(d) for d in _packages_distributions().get(top, [])})
    if len(dists) != 1:
        raise LookupError(f"cannot map import {module!r} to one distribution (found {dists}); "
                          f"add it to IMPORT_TO_DIST in tests/test_dependencies.py")
    return dists[0]


@cache
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def base_reqs() -> dict[str, Requirement]:
    return {_norm(r.name): r for r in map(Requirement, project()["dependencies"])}


def extra_reqs() -> dict[str, dict[str, Requirement]]:
    return {extra: {_norm(r.name): r for r in map(Requirement, reqs)}
            for extra, reqs in project()["optional-dependencies"].items()}


def imported_dists() -> dict[str, list[Import]]:
    by_dist: dict[str, list[Import]] = {}
    for imp in all_imports():
        dist = dist_of(imp.module)
        if dist is not None:
            by_dist.setdefault(dist, []).append(imp)
    return by_dist


# ------------------------------------------------------------------------------------------------ tests
def test_the_import_walker_sees_top_level_function_level_and_dynamic_imports():
    mods = {(i.module, i.lazy) for i in all_imports()}
    assert ("torch", False) in mods  # e.g. nemovl_trt/model/norms.py
    assert ("decord", True) in mods  # nemovl_trt/preprocess/video.py, inside _decord_decode
    assert ("tensorrt", True) in mods  # require_gpu(target, "tensorrt", ...)
    assert ("tensorrt_llm", True) in mods
    assert any(m.startswith("modelopt") for m, _ in mods)


def test_every_third_party_import_is_declared():
    declared = set(base_reqs())
    for reqs in extra_reqs().values():
        declared |= set(reqs)
    missing = sorted(f"{imp.module} ({dist}) at {imp.where}"
                     for dist, imps in imported_dists().items() if dist not in declared for imp in imps)
    assert not missing, "imported by nemovl_trt/ but declared nowhere in pyproject.toml:\n" + "\n".join(missing)


@pytest.mark.parametrize("module, dist", [("grpc", "grpcio"), ("google.protobuf", "protobuf"),
                                          ("starlette", "starlette"), ("tritonclient", "tritonclient"),
                                          ("PIL", "pillow"), ("yaml", "pyyaml"), ("av", "av")])
def test_directly_imported_transitive_packages_are_declared_in_base(module, dist):
    assert dist_of(module) == dist
    assert dist in imported_dists(), f"{module} is no longer imported by nemovl_trt/: drop this case"
    assert dist in base_reqs(), f"nemovl_trt/ imports {module}: declare {dist} in [project.dependencies]"


def test_gpu_only_modules_are_in_the_gpu_extra_and_not_in_base():
    extras = extra_reqs()
    assert GPU_ONLY <= set(imported_dists()), "the GPU stack should be imported by the build / triton code"
    assert GPU_ONLY <= set(extras["gpu"])
    assert not GPU_ONLY & set(base_reqs())
    # transformers is imported by the GPU quantization path (ModelOpt), so the gpu extra declares it too
    assert "transformers" in imported_dists() and "transformers" in extras["gpu"]


def test_every_base_dependency_is_imported_or_allowed():
    imported = set(imported_dists())
    unused = sorted(set(base_reqs()) - imported - set(NOT_IMPORTED_ALLOWED))
    assert not unused, f"declared in [project.dependencies] but never imported by nemovl_trt/: {unused}"
    for dist in NOT_IMPORTED_ALLOWED:  # the allow-list stays honest
        assert dist in base_reqs(), f"{dist} is allow-listed but not a base dependency"
        assert dist not in imported, f"{dist} is imported now: remove it from NOT_IMPORTED_ALLOWED"


def test_onnxscript_is_not_declared():
    """The vision ONNX is exported with the TorchScript exporter (dynamo=False), which does not need
    onnxscript (tests/test_build_engines.py passes with it made unimportable)."""
    src = (PACKAGE / "build" / "onnx_export.py").read_text(encoding="utf-8")
    assert "dynamo=False" in src
    everywhere = set(base_reqs()).union(*extra_reqs().values())
    assert "onnxscript" not in everywhere


def _shipped(where: str) -> bool:
    return any(where.startswith(prefix) for prefix in SHIPPED_NOT_IMPORTED)


def test_optional_extra_modules_are_imported_lazily():
    base = set(base_reqs())
    eager = sorted(f"{imp.module} ({dist}) at {imp.where}" for dist, imps in imported_dists().items()
                   if dist not in base for imp in imps if not imp.lazy and not _shipped(imp.where))
    assert not eager, ("modules of optional extras imported at module top level (import them inside the "
                       "function that needs them):\n" + "\n".join(eager))


def test_shipped_code_is_not_imported_by_nemovl_trt():
    for prefix in SHIPPED_NOT_IMPORTED:
        assert (ROOT / prefix).is_dir(), f"{prefix} is gone: drop it from SHIPPED_NOT_IMPORTED"
        dotted = prefix.rstrip("/").replace("/", ".")
        importers = [f"{i.module} at {i.where}" for i in all_imports()
                     if (i.module == dotted or i.module.startswith(dotted + ".")) and not _shipped(i.where)]
        assert not importers, f"{dotted} is imported (its imports would run): {importers}"


def test_optional_packages_are_not_base_dependencies():
    base, extras = base_reqs(), extra_reqs()
    for dist, extra in [("decord", "decord"), ("nvidia-pytriton", "cpu"), ("openai", "client")]:
        assert dist not in base, f"{dist} must not be a hard dependency"
        assert dist in extras[extra], f"{dist} belongs in the {extra!r} extra"
    for dist in NO_AARCH64_WHEELS:
        assert dist not in base
        for reqs in extras.values():  # where it is listed, it is skipped on aarch64
            if dist in reqs:
                assert reqs[dist].marker is not None
                assert not reqs[dist].marker.evaluate({"platform_machine": "aarch64"})
                assert reqs[dist].marker.evaluate({"platform_machine": "x86_64"})


def test_openai_is_only_imported_by_client_code():
    users = {imp.where.split(":")[0] for imp in imported_dists().get("openai", [])}
    assert users <= {"nemovl_trt/demo.py", "nemovl_trt/training/commands.py", "nemovl_trt/training/evaluate.py"}


def test_dev_extra_is_a_full_test_environment():
    extras = extra_reqs()
    for extra in ("cpu", "client", "decord"):
        for name, req in extras[extra].items():
            assert name in extras["dev"], f"dev lacks {name} (from the {extra} extra)"
            assert str(extras["dev"][name]) == str(req), f"dev's {name} differs from the {extra} extra's"


def test_torch_is_a_range_that_admits_the_container_builds():
    torch = base_reqs()["torch"]
    assert not any(s.operator in ("==", "===") for s in torch.specifier), f"torch is pinned: {torch}"
    for v in TORCH_BUILDS:
        assert torch.specifier.contains(Version(v), prereleases=True), f"{torch} rejects torch {v}"


def test_numpy_range_admits_tensorrt_llm_pins_and_the_local_triton_keeps_numpy_1():
    numpy = base_reqs()["numpy"]
    for v in NUMPY_BUILDS:
        assert numpy.specifier.contains(v), f"{numpy} rejects numpy {v}"
    # the Python-backend stub bundled with nvidia-pytriton crashes with numpy 2
    assert not extra_reqs()["cpu"]["numpy"].specifier.contains("2.0.0")


def _setup_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_makefile_setup_installs_the_cpu_torch_before_the_project():
    recipe = _setup_recipe()
    torch_at = [i for i, line in enumerate(recipe) if "pip install" in line and "torch==2.13.0" in line]
    project_at = [i for i, line in enumerate(recipe) if "pip install" in line and " -e " in line]
    assert torch_at and project_at, recipe
    assert torch_at[0] < project_at[0]
    extras = set(re.search(r"\.\[([^\]]*)\]", recipe[project_at[0]]).group(1).split(","))
    assert {"cpu", "client", "dev"} <= extras  # make demo / make test need tritonserver and openai


# ------------------------------------------------------------------ behaviour when an extra is missing
def test_missing_decord_gives_invalid_video(monkeypatch):
    from nemovl_trt.preprocess import video as V
    from nemovl_trt.preprocess.errors import INVALID_VIDEO, PreprocessError

    calls = []
    fallback = V._decord_decode
    monkeypatch.setattr(V, "_decord_decode", lambda *a, **k: calls.append(a) or fallback(*a, **k))
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    with pytest.raises(PreprocessError) as e:
        V.decode_video(b"not a video at all", num_frames=8)  # PyAV cannot open it: the fallback is tried
    assert calls and e.value.code == INVALID_VIDEO


def test_missing_openai_gives_a_one_line_install_hint(monkeypatch):
    from click.testing import CliRunner

    from nemovl_trt.training.commands import eval_cmd
    from nemovl_trt.training.evaluate import evaluate

    monkeypatch.setitem(sys.modules, "openai", None)
    result = CliRunner().invoke(eval_cmd, ["--n", "1"])
    assert result.exit_code != 0
    assert "nemovl-trt[client]" in result.output and result.output.count("\n") <= 2, result.output
    with pytest.raises(ModuleNotFoundError, match=re.escape("nemovl-trt[client]")):
        evaluate("http://127.0.0.1:9", 1)
