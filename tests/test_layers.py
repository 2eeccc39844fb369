"""The import arrow points one way: ``dipro`` (loader, model, training, tracking) may use
``data_sharding`` (raw files -> Parquet -> shards), never the reverse (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):  # every import, also the lazy ones inside functions
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_data_sharding_never_imports_dipro():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "data_sharding").rglob("*.py"))
        for line, module in _imported_modules(path)
        if module == "dipro" or module.startswith("dipro.")
    ]
    assert not offenders, "data_sharding must not import dipro:\n" + "\n".join(offenders)


def test_the_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dipro.config import Config\n    import dipro.model\n", encoding="utf-8")
    assert [m for _, m in _imported_modules(probe)] == ["dipro.config", "dipro.model"]
