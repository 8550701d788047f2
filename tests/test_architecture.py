"""The import rules of ARCHITECTURE.md, read from the tree: the worker stands alone, the core never reaches
back into the admin side, and channel adaptors know nothing of the gateway."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RULES = {  # package: packages it must never import
    "backends": {"relay", "channels", "admin"},
    "channels": {"relay", "admin"},
    "relay": {"admin"},
}


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_rules(package):
    broken = {f"{path.relative_to(ROOT)} imports {bad}" for path in (ROOT / package).rglob("*.py")
              for bad in _imports(path) & RULES[package]}
    assert not broken, sorted(broken)


def test_the_rule_check_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from admin import service\nimport relay.db\n")
    assert {"admin", "relay"} <= _imports(module)


def test_no_module_is_over_400_lines():
    packages = ("relay", "channels", "admin", "backends", "migrations", "bench", "tests")
    long = [f"{p.relative_to(ROOT)}: {n}" for package in packages
            for p in (ROOT / package).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def test_ruff_is_clean():
    """The style bar is checked where CI looks: ruff (pinned in the test extra) over the whole tree."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
