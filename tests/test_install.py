"""What a fresh install runs is what the code imports: every third-party module imported under crosspt/,
jobs/ and benchmarks/ comes from a distribution that `pyproject.toml` declares as a main dependency (an
undeclared one, one that only arrives through another package, or one declared only in the test extra would
be missing from a plain `pip install crosspt`). The check is deptry's, configured in pyproject.toml's [tool.deptry]."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def deptry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deptry", "crosspt", "jobs", "benchmarks", "--no-ansi", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_imported_module_is_declared():
    out = deptry()
    assert out.returncode == 0, out.stderr + out.stdout


def test_an_undeclared_import_fails_the_check(tmp_path):
    """The check can fail: pyproject.toml without its statsmodels line (the report's OLS) is refused,
    naming the module and where it is imported."""
    text = (REPO / "pyproject.toml").read_text()
    without = re.sub(r'^\s*"statsmodels[^"]*",\n', "", text, flags=re.M)
    assert without != text
    (tmp_path / "pyproject.toml").write_text(without)
    out = deptry("--config", str(tmp_path / "pyproject.toml"))
    said = out.stderr + out.stdout         # deptry writes its findings to stderr
    assert out.returncode != 0 and "search/report/stats.py" in said and "'statsmodels' imported but" in said, said


def test_scipy_is_declared_at_the_version_whose_api_the_report_calls():
    """permutation_test(..., rng=) exists from scipy 1.15 on; a main dependency below that installs a scipy
    whose call fails."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"scipy\b", d))
    low = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
    assert low >= (1, 15), spec


def test_no_lock_database_or_log_is_tracked():
    """Run outputs never enter the repository (mlflow.db.lock once did)."""
    import pytest

    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    bad = [f for f in out.stdout.splitlines() if re.search(r"\.(lock|db|sqlite|log)$", f)]
    assert not bad, bad
