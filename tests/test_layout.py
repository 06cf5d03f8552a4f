"""The code's shape (DESIGN.md, Layout / Tuning / Names), checked so that it stays."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCT = ["csrc", "kernels", "geokern"]
SOURCE = {".py", ".cu", ".cuh", ".cpp", ".h"}
MAX_LINES = 600
# families whose CUDA kernels are still to come, with the issue that brings them (their ops
# refuse backend='cuda' with that number)
CUDA_PENDING = {"ultrametric": "#18", "hypercomplex_attention": "#20", "lior": "#21", "contrastive": "#22"}
# where a GEOKERN_* variable may be read: the process-wide switches (read once, in _backend)
# and the build variables (setup.py)
ENV_READERS = {"geokern/_backend.py", "setup.py"}
ENV_READ = re.compile(r"os\.environ|os\.getenv|getenv\s*\(|environ\[")


def _files(*roots):
    for root in roots:
        for p in sorted((ROOT / root).rglob("*")):
            if p.suffix in SOURCE and "__pycache__" not in p.parts:
                yield p


def _rel(p):
    return p.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", [_rel(p) for p in _files(*PRODUCT)])
def test_product_file_is_short(path):
    n = len((ROOT / path).read_text().splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines (at most {MAX_LINES}: split it by kernel, DESIGN.md Layout)"


def test_no_environment_read_in_kernels_csrc_or_ops():
    """Tuning knobs are op arguments (they reach torch.compile's graph and the schema); the
    environment is read only for the process-wide switches in geokern/_backend.py."""
    offenders = []
    for p in _files("kernels", "csrc", "geokern/ops"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ENV_READ.search(line):
                offenders.append(f"{_rel(p)}:{i}: {line.strip()}")
    assert not offenders, "environment read where only arguments may steer:\n" + "\n".join(offenders)


def test_geokern_variables_read_in_one_place():
    offenders = []
    for p in list(_files(*PRODUCT)) + [ROOT / "setup.py"]:
        if _rel(p) in ENV_READERS:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "GEOKERN_" in line and ENV_READ.search(line):
                offenders.append(f"{_rel(p)}:{i}: {line.strip()}")
    assert not offenders, "GEOKERN_* read outside geokern/_backend.py and setup.py:\n" + "\n".join(offenders)


def test_no_family_module_shares_an_op_name():
    """`geokern.ops.<family>` would be shadowed by a public function of the same name."""
    import geokern
    import geokern.ops

    families = [p.stem for p in (ROOT / "geokern" / "ops").glob("*.py") if not p.stem.startswith("_")]
    clash = [f for f in families if f in geokern.ops.__all__]
    assert not clash, f"op family modules named like one of their ops: {clash}"
    assert not [f for f in families if f in geokern.__all__], "a family shadowed in the geokern namespace"


def test_every_family_has_each_layer():
    """One op's pieces are found by name alone: reference, kernels, csrc, ops, bench, tests."""
    families = sorted(p.stem for p in (ROOT / "geokern" / "ops").glob("*.py") if not p.stem.startswith("_"))
    missing = []
    for f in families:
        for want in (f"geokern/reference/{f}.py", f"geokern/bench/{f}.py"):
            if not (ROOT / want).exists():
                missing.append(want)
        if not ((ROOT / "kernels" / f"{f}.py").exists() or (ROOT / "kernels" / f / "__init__.py").exists()):
            missing.append(f"kernels/{f}.py or kernels/{f}/")
        if not list((ROOT / "csrc" / f).glob("*.cu")) and f not in CUDA_PENDING:
            missing.append(f"csrc/{f}/ (a folder with a .cu)")
        if not list((ROOT / "tests").glob(f"test_{f}*.py")):
            missing.append(f"tests/test_{f}*.py")
    assert not missing, f"missing layers: {missing}"


def test_every_graph_capture_test_is_marked_capturable():
    """memcheck runs without the caching allocator, where a capture fails and poisons its process
    (every later test of it then fails too): each test that captures a CUDA graph says so."""
    import ast

    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.get_source_segment(src, node) or ""
                marks = {ast.unparse(d) for d in node.decorator_list}
                if re.search(r"cuda\.graph\(|CUDAGraph\(", body) and "capturable" not in marks:
                    bad.append(f"{_rel(path)}::{node.name}")
    assert not bad, f"capture a CUDA graph without @capturable: {bad}"
