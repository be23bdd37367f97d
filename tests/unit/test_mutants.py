"""scripts/mutants.toml stays in step with the code: every mutant's snippet occurs exactly once in its file
(a file changed under it is an error, never a mutant silently skipped), and its tests exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
assert _spec is not None and _spec.loader is not None
mutants = sys.modules["mutants"] = importlib.util.module_from_spec(_spec)  # a script, not a package
_spec.loader.exec_module(mutants)


def test_every_snippet_matches_its_file_once() -> None:
    listed = mutants.load()
    assert len(listed) >= 20
    assert mutants.problems(listed) == []


def test_a_snippet_that_no_longer_matches_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "rule.py").write_text("limit = 3\nlimit = 3\n")
    (tmp_path / "test_rule.py").write_text("")
    twice = mutants.Mutant("twice", "rule.py", "limit = 3", "limit = 4", ("test_rule.py",))
    gone = mutants.Mutant("gone", "rule.py", "limit = 5", "limit = 4", ("test_rule.py",))
    assert [p.split(":")[0] for p in mutants.problems([twice, gone], tmp_path)] == ["twice", "gone"]
