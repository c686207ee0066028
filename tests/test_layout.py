"""The package's arrows, read from the source (no import needed): no import cycles between modules, each room
imports only downward, and the runtime libraries stay where the house rules put them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixpert_train", "mixpert_export")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved; `from a import b` gives a.b when
    a.b is a module of ours, else a)."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


SOURCES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {m: {i for i in imports(p) if i in SOURCES and i != m} for m, p in SOURCES.items()}


def reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in GRAPH[m]:
            if n == goal:
                return True
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return False


def test_no_module_imports_one_that_imports_it_back():
    """Package __init__ files that only re-export are skipped: importing a.b always runs a/__init__ first."""
    cycles = sorted(f"{a} <-> {b}" for a in GRAPH for b in GRAPH[a]
                    if not b.startswith(a + ".") and not a.startswith(b + ".") and reaches(b, a))
    assert not cycles, cycles


@pytest.mark.parametrize("room, never", [
    ("mixpert_train", ("mixpert_export", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy")),
    ("mixpert_export.bundle", ("mixpert_export.runtime", "mixpert_export.serving")),
    ("mixpert_export.runtime", ("mixpert_export.serving", "mixpert_export.bundle.build", "mixpert_export.bundle.int8",
                                "mixpert_export.bundle.quantize", "mixpert_export.bundle.validate")),
    ("mixpert_export.runtime.pipeline", ("torch", "onnxruntime", "tensorrt", "tensorrt_rtx",
                                         "mixpert_export.runtime.backends.torch",
                                         "mixpert_export.runtime.backends.onnxruntime",
                                         "mixpert_export.runtime.backends.tensorrt")),
    ("mixpert_export.runtime.backends", ("mixpert_export.runtime.pipeline",)),
    ("mixpert_export.serving", ("mixpert_export.bundle.build", "mixpert_export.bundle.int8",
                                "mixpert_export.bundle.quantize", "mixpert_export.bundle.validate",
                                "mixpert_export.bundle.onnx_export")),
])
def test_rooms_import_only_downward(room, never):
    bad = sorted(f"{m} imports {i}" for m, p in SOURCES.items() if m == room or m.startswith(room + ".")
                 for i in imports(p) if any(i == n or i.startswith(n + ".") for n in never))
    assert not bad, bad


def test_tensorrt_is_imported_in_one_module():
    """bundle.tensorrt_build imports `tensorrt` or else `tensorrt_rtx` by name, lazily; nothing else may."""
    dynamic = ("__import__(", "import_module(")
    others = {m: p.read_text() for m, p in SOURCES.items() if m != "mixpert_export.bundle.tensorrt_build"}
    users = sorted(m for m, text in others.items() if any(d in text for d in dynamic)
                   or {"tensorrt", "tensorrt_rtx"} & {i.split(".")[0] for i in imports(SOURCES[m])})
    assert not users, users
    assert any(d in SOURCES["mixpert_export.bundle.tensorrt_build"].read_text() for d in dynamic)


def test_every_room_says_what_it_owns_and_never_imports():
    for room in ("mixpert_train.families", "mixpert_export.bundle", "mixpert_export.runtime", "mixpert_export.serving"):
        doc = " ".join((ast.get_docstring(ast.parse(SOURCES[room].read_text())) or "").split())
        assert "Never imports" in doc, room


def test_old_public_imports_still_work():
    from mixpert_export.client import MixpertClient
    from mixpert_export.pipeline import ImageResult, MixpertPipeline
    from mixpert_export.runtime.pipeline import MixpertPipeline as New
    from mixpert_export.serving.client import MixpertClient as NewClient

    assert MixpertPipeline is New and MixpertClient is NewClient and ImageResult.__module__.endswith("runtime.pipeline")
