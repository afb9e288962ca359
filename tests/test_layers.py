"""The layering contract (pyproject.toml [tool.importlinter]: imports point down only, no cycles
between a package's modules) holds, and only the KV cache writes its own fields."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlmnumba"
KV_CACHE = PACKAGE / "model" / "kv_cache.py"
CACHE_FIELDS = {"k", "v", "pos", "length", "_length"}  # what a KVCache's methods alone write


def test_import_contracts_hold():
    """`lint-imports` (import-linter, in the test extra) keeps every contract."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    p = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "0 broken" in p.stdout, p.stdout + p.stderr


def _targets(node):
    """Every expression an assignment statement writes to."""
    if isinstance(node, ast.Assign):
        stack = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        stack = [node.target]
    else:
        return
    while stack:
        t = stack.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            stack.extend(t.elts)
        elif isinstance(t, ast.Starred):
            stack.append(t.value)
        else:
            yield t


def _cache_writes(tree):
    """(line, text) of writes to x.k / x.v / x.pos / x.length, or into them (x.k[...] = ),
    where x is not `self` (a class writing fields of its own of those names)."""
    for node in ast.walk(tree):
        for t in _targets(node):
            base = t.value if isinstance(t, ast.Subscript) else t
            while isinstance(base, ast.Subscript):
                base = base.value
            if (isinstance(base, ast.Attribute) and base.attr in CACHE_FIELDS
                    and not (isinstance(base.value, ast.Name) and base.value.id == "self")):
                yield node.lineno, ast.unparse(t)


def test_only_the_kv_cache_writes_its_fields():
    found = [f"{path.relative_to(ROOT)}:{line}: {text}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != KV_CACHE
             for line, text in _cache_writes(ast.parse(path.read_text()))]
    assert found == []


def test_the_write_check_sees_each_kind_of_write():
    """The scan above would catch what the code did before the cache owned its writes."""
    code = ("c.k[:, :, a:b] = k\nc.v[0][1] = v\nc.pos[a:b] = p\ncache.length = n\n"
            "seg.cache.length += 1\nx, c.length = 1, 2\nok = c.k[0]\nc.truncate(3)\n"
            "self.pos = 0\nself.cache.k[0] = 1\n")
    assert sorted(line for line, _ in _cache_writes(ast.parse(code))) == [1, 2, 3, 4, 5, 6, 10]
