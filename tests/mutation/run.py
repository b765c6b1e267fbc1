"""Mutation testing: apply each one-line bug of tests/mutation/mutants.py to a copy of the tree, run the tests that
should catch it, and report which bugs survived (their tests stayed green).

    python -m tests.mutation.run                     # every mutant (see README "Developing" for the time it takes)
    python -m tests.mutation.run ema-weight-swapped  # some, by name
    python -m tests.mutation.run --file erw/trainer.py --json mutants.json
    python -m tests.mutation.run --list

The copy holds the files git tracks plus the untracked ones it does not ignore, so uncommitted work is what is
tested. Before any mutant, the tests named by the selected mutants run once on the unchanged copy: a test that
fails already would "kill" every mutant. Exit code 1 if a mutant survived, 0 if all were killed.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.mutation.mutants import MUTANTS, Mutant, apply  # noqa: E402

FAILED_TEST = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def copy_tree(dest: str) -> None:
    """The working tree's tracked and not-ignored untracked files, into dest."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):  # deleted in the working tree but still tracked
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def run_tests(tree: str, tests: Sequence[str], timeout: float) -> Dict[str, object]:
    """pytest -x on `tests` inside `tree`: {'passed': bool, 'failed': first failing node id or None, 'seconds'}."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"passed": False, "failed": f"timeout after {timeout:.0f} s", "seconds": timeout}
    found = FAILED_TEST.findall(proc.stdout)
    if proc.returncode == 0:
        failed = None
    elif found:
        failed = found[0]
    else:  # no test failed, yet pytest did not pass: a collection or import error, named by its last line
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        failed = f"exit {proc.returncode}: {lines[-1][:200] if lines else ''}"
    return {"passed": proc.returncode == 0, "failed": failed, "seconds": round(time.perf_counter() - start, 1)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--file", help="only the mutants of this file (repository-relative path)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unchanged tree")
    parser.add_argument("--json", help="write the results to this file")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    unknown = sorted(set(args.names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    selected: List[Mutant] = [m for m in MUTANTS if (not args.names or m.name in args.names)
                              and (not args.file or m.file == args.file)]
    if args.list:
        for m in selected:
            print(f"{m.name:40s} {m.file:32s} {m.bug}")
        return 0
    if not selected:
        parser.error("no mutant selected")

    tree = tempfile.mkdtemp(prefix="erw-mutants-")
    try:
        copy_tree(tree)
        originals = {}
        for m in selected:  # every mutant must apply before anything runs
            with open(os.path.join(tree, m.file)) as f:
                originals.setdefault(m.file, f.read())
            apply(m, originals[m.file])
        if not args.no_baseline:
            tests = sorted({t for m in selected for t in m.tests})
            print(f"baseline: {len(tests)} test(s) on the unchanged tree ...", flush=True)
            baseline = run_tests(tree, tests, args.timeout * 2)
            if not baseline["passed"]:
                print(f"baseline fails ({baseline['failed']}): fix the tests before mutating", file=sys.stderr)
                return 2
            print(f"baseline passed in {baseline['seconds']} s", flush=True)
        results = []
        bar = tqdm(selected, desc="mutants", unit="mutant", file=sys.stderr)
        for m in bar:
            bar.set_postfix_str(m.name)
            path = os.path.join(tree, m.file)
            with open(path, "w") as f:
                f.write(apply(m, originals[m.file]))
            try:
                outcome = run_tests(tree, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(originals[m.file])
            result = {"name": m.name, "file": m.file, "bug": m.bug, "killed": not outcome["passed"],
                      "by": outcome["failed"], "seconds": outcome["seconds"]}
            results.append(result)
            tqdm.write(f"{'killed  ' if result['killed'] else 'SURVIVED'} {m.name:40s} {outcome['seconds']:7.1f} s  "
                       f"{result['by'] or ''}")
        bar.close()
    finally:
        shutil.rmtree(tree, ignore_errors=True)

    survived = [r for r in results if not r["killed"]]
    total = sum(r["seconds"] for r in results)
    print(f"\n{len(results) - len(survived)} of {len(results)} mutants killed, {len(survived)} survived "
          f"({total / 60:.1f} min of tests)")
    for r in survived:
        print(f"  SURVIVED {r['name']}: {r['bug']} ({r['file']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
