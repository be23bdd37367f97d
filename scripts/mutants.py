"""Applies each mutant of scripts/mutants.toml to a copy of the tree and runs the tests that guard its
rule: a mutant the tests do not fail on (a survivor) is a rule nothing checks. The working tree is never
touched: the copy lives in a temporary directory, imported ahead of the editable install (PYTHONPATH).

    ./scripts/mutants                         every mutant
    ./scripts/mutants lock inbox              the mutants whose name contains one of these words
    ./scripts/mutants --changed-since REF     those whose file or tests changed since REF (all when REF
                                              is unknown, as in a shallow clone)
    ./scripts/mutants --check                 only check that every snippet matches its file once

The last line is `N killed, M survived`; the exit status is 0 only with no survivor and no error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "scripts" / "mutants.toml"
TIMEOUT_S = 900  # a mutant that hangs its tests this long counts as killed (it did not pass)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]

    def test_files(self) -> set[str]:
        return {t.split("::")[0] for t in self.tests if not t.startswith("-")}


def load(path: Path = LIST) -> list[Mutant]:
    with path.open("rb") as f:
        entries = tomllib.load(f)["mutant"]
    return [Mutant(e["name"], e["file"], e["original"], e["replacement"], tuple(e["tests"])) for e in entries]


def problems(mutants: list[Mutant], root: Path = ROOT) -> list[str]:
    """What is wrong with the list: a snippet not found exactly once, a duplicate name, no tests."""
    found = []
    names = [m.name for m in mutants]
    found += [f"{n}: named twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.file
        count = path.read_text().count(m.original) if path.is_file() else 0
        if count != 1:
            found.append(f"{m.name}: its snippet occurs {count} times in {m.file} (must be once)")
        if m.original == m.replacement:
            found.append(f"{m.name}: the replacement is the original")
        if not m.tests:
            found.append(f"{m.name}: no tests")
        found += [f"{m.name}: no test file {t}" for t in sorted(m.test_files()) if not (root / t).exists()]
    return found


def changed_since(ref: str) -> set[str] | None:
    """The files changed between `ref` and the working tree; None when `ref` is unknown here."""
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=ROOT,
                           capture_output=True)
    if known.returncode != 0:
        return None
    diff = subprocess.run(["git", "diff", "--name-only", ref], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(diff.stdout.split())


def copy_tree(dest: Path) -> None:
    """The tracked and untracked (not ignored) files of the tree, as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def pytest_in(tree: Path, tests: list[str], basetemp: Path) -> int:
    """Run the tests in the copy (its modules first on the path); pytest's exit code, -1 on a timeout."""
    paths = [tree / "shared", *sorted(p for p in (tree / "services").iterdir() if p.is_dir()), tree]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
               *tests]
    try:
        return subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one of these")
    parser.add_argument("--changed-since", metavar="REF", help="only mutants whose file or tests changed since REF")
    parser.add_argument("--check", action="store_true", help="check the snippets, run nothing")
    args = parser.parse_args()

    mutants = load()
    wrong = problems(mutants)
    if wrong:
        print("\n".join(["mutants.toml is out of date:", *wrong]), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutants)} mutants, every snippet found once")
        return 0
    if args.words:
        mutants = [m for m in mutants if any(w.lower() in m.name.lower() for w in args.words)]
    if args.changed_since:
        changed = changed_since(args.changed_since)
        if changed is None:
            print(f"{args.changed_since} is unknown here: every mutant")
        else:
            mutants = [m for m in mutants if m.file in changed or m.test_files() & changed]
    if not mutants:
        print("0 killed, 0 survived")
        return 0

    started = time.monotonic()
    killed, survived, errors = 0, [], []
    with tempfile.TemporaryDirectory(prefix="cancelflow-mutants-") as scratch:
        tree = Path(scratch) / "tree"
        copy_tree(tree)
        tests = sorted({t for m in mutants for t in m.tests})
        if pytest_in(tree, tests, Path(scratch) / "baseline") != 0:
            print("the tests fail without any mutant: fix them first", file=sys.stderr)
            return 2
        for i, m in enumerate(mutants):
            target = tree / m.file
            original = target.read_text()
            target.write_text(original.replace(m.original, m.replacement, 1))
            try:
                t0 = time.monotonic()
                code = pytest_in(tree, list(m.tests), Path(scratch) / f"m{i}")
            finally:
                target.write_text(original)
            took = f"{time.monotonic() - t0:.0f}s"
            if code in (1, -1):
                killed += 1
                print(f"killed    {m.name} ({took}{', timed out' if code == -1 else ''})", flush=True)
            elif code == 0:
                survived.append(m.name)
                print(f"SURVIVED  {m.name} ({took}): {' '.join(m.tests)}", flush=True)
            else:
                errors.append(m.name)
                print(f"ERROR     {m.name}: pytest exit code {code}", flush=True)
    print(f"{len(mutants)} mutants in {time.monotonic() - started:.0f}s"
          + (f"; {len(errors)} could not run: {', '.join(errors)}" if errors else ""))
    print(f"{killed} killed, {len(survived)} survived")
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
