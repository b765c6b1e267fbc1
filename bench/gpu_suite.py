"""One command on one GPU: the benchmarks, then the GPU tests, inside a hard time budget, every result kept.

    python3 -m bench.gpu_suite --output OUT --wheels .whl --work-dir /tmp/erw-gpu-suite   # ~8 minutes on one H100/H200
    python3 -m bench.gpu_suite --output OUT --wheels .whl --only profile    # torch.profiler table of the XL/2 step
    python -m bench.gpu_suite --rehearse --output OUT     # every part end to end on the CPU at toy sizes (a minute)
    python -m bench.gpu_suite --dry-run                   # the plan, estimates and FLOPs per image; no GPU

What the parts run is bench/gpu_parts.py. This file is the harness, built for a GPU lent for a few minutes, where
only one output folder comes back:

- Each part runs in a process of its own (bench/part_runner.py: forked after the imports, so they are paid once),
  with its own CUDA context: a sticky CUDA error, an out-of-memory kill or a hang ends that part only.
- The results file (OUTPUT/gpu-suite.json, with gpu-suite.md and the whole log gpu-suite.log beside it) is written
  atomically before each part starts and after it ends. Whatever stops the suite (a failed part, SIGTERM, a
  command timeout, a kill), the file holds every part that finished and says which parts are missing and why.
- The budget (--budget-s) is a bound on the wall clock from the start of this process, imports included. A part
  starts only if its estimate fits in what is left; at its own limit (twice its estimate, at least a minute more)
  or at the budget's end it gets SIGINT (pytest writes its JUnit XML then) and SIGKILL after a grace period.
- SIGTERM, SIGUSR1 or Ctrl-C stop the running part that way, write the results and exit with 75 (EX_TEMPFAIL).
- Nothing goes inside the repository: the output folder is named on the command line, and the work folder (the demo
  data, checkpoints, the evaluator's 10 GB of synthetic samples) is a temp folder outside it, removed at the end.
- `--wheels DIR` installs the wheels there whose packages this Python lacks (the GPU machine's image has no
  diffusers) into the work folder, before anything imports them.

Exit code: 0 when no part failed (budget skips included), 1 when one did, 75 when stopped by a signal.
"""
import os
import time

IMPORTED_AT = time.time()  # before the heavy imports: the budget counts them
# torch.cuda.is_available() through NVML, not cuInit: libraries call it on import (diffusers does), and after cuInit
# a forked part could not use CUDA (bench/part_runner.py).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.gpu_suite ...`")

BUDGET_S = 480
RESERVE_S = 15               # kept free at the end of the budget for the last writes
GRACE_S = 20                 # between SIGINT and SIGKILL (pytest writes its XML, a loop leaves its step)
EXIT_STOPPED = 75            # EX_TEMPFAIL, as the trainer's preemption exit
LOG_CAP_BYTES = 15 * 2 ** 20  # one file back from the GPU machine holds at most 16 MiB
RESULTS_NAME, TABLE_NAME, LOG_NAME = "gpu-suite.json", "gpu-suite.md", "gpu-suite.log"


class SuiteStopped(BaseException):
    """Raised in the suite's main thread by SIGTERM, SIGUSR1 or SIGINT."""


def process_start_time() -> float:
    """time.time() at which this process started (Linux /proc), else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        started = boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED_AT
    # A clock or /proc that disagrees with time.time() (some sandboxes): fall back rather than trust it.
    return started if IMPORTED_AT - 600 < started <= IMPORTED_AT else IMPORTED_AT


def install_wheels(folder: str, site: str) -> Dict[str, List[str]]:
    """pip-install (no index, no dependencies) the wheels in `folder` whose distribution is not installed, into
    `site`, and put `site` first on this process's path (and PYTHONPATH, for subprocesses)."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise SystemExit(f"error: --wheels {folder}: no .whl files there")
    missing, present = [], []
    for wheel in wheels:
        name = os.path.basename(wheel).split("-")[0]
        try:
            present.append(f"{name} {metadata.version(name)} (kept)")
        except metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", site, *missing], check=True)
        sys.path.insert(0, site)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return {"installed": [os.path.basename(w) for w in missing], "present": present}


def select_parts(parts, only: Optional[List[str]], skip: List[str]):
    """The parts to run, in PARTS order: all (the optional ones run when time is left), or those named by --only
    (parts or groups), less --skip; env always, and data when a chosen part reads the demo data."""
    names = {p.name for p in parts}
    groups = {p.group for p in parts}
    for name in (only or []) + skip:
        if name not in names | groups:
            raise SystemExit(f"error: unknown part '{name}'; parts: {', '.join(p.name for p in parts)}; groups: "
                             f"{', '.join(sorted(groups))}")
    chosen = [p for p in parts if (only is None or p.name in only or p.group in only)
              and p.name not in skip and p.group not in skip]
    return [p for p in parts if p in chosen or p.name == "env"
            or (p.name == "data" and any(c.needs_data for c in chosen))]


class Log:
    """Everything the suite and its parts print: to the console and to OUTPUT/gpu-suite.log (capped)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.written = 0

    def __call__(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.written < LOG_CAP_BYTES:
            self.file.write(text if self.written + len(text) < LOG_CAP_BYTES else
                            text[:LOG_CAP_BYTES - self.written] + "\n[log cut at 15 MiB]\n")
            self.written += len(text)

    def close(self) -> None:
        self.file.close()


class Results:
    """OUTPUT/gpu-suite.json and its table OUTPUT/gpu-suite.md, rewritten atomically at every change."""

    def __init__(self, output: str, report: Dict[str, Any]):
        self.path, self.table_path = os.path.join(output, RESULTS_NAME), os.path.join(output, TABLE_NAME)
        self.report = report

    def write(self) -> None:
        from erw.files import atomic_write
        self.report["missing"] = missing_parts(self.report)
        self.report["derived"] = derived(self.report)
        self.report["elapsed_s"] = round(time.time() - self.report["started_at"], 1)
        text = json.dumps(self.report, indent=1, default=str)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        write_table(self.table_path, self.report)


def write_table(path: str, report: Dict[str, Any]) -> None:
    """The markdown table beside the JSON; a table that cannot be drawn says why and costs no result."""
    from erw.files import atomic_write
    try:
        text = markdown_report(report)
    except Exception as e:
        text = f"The table could not be drawn ({type(e).__name__}: {e}); the results are in {RESULTS_NAME}.\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def missing_parts(report: Dict[str, Any]) -> List[Dict[str, str]]:
    """Every planned part without a result, and why."""
    missing = []
    for p in report["parts"]:
        if p["status"] == "ok":
            continue
        why = p.get("reason") or p.get("error") or {
            "pending": "not reached", "running": "running when the results were last written (the suite was "
            "killed during this part)"}.get(p["status"], p["status"])
        if p.get("stopped"):
            why += f" (stopped: {p['stopped']})"
        missing.append({"part": p["name"], "status": p["status"], "why": why})
    return missing


def derived(report: Dict[str, Any]) -> Dict[str, Any]:
    """Ratios between parts: the Phase-1 step time over the Phase-2 step time (SiT-XL/2, real loop, teacher in)."""
    ok = {p["name"]: p["result"] for p in report["parts"] if p["status"] == "ok"}
    out = {}
    if "train-xl2-phase1" in ok and "train-xl2-phase2" in ok:
        out["xl2_phase1_over_phase2_step_time"] = round(
            ok["train-xl2-phase2"]["images_per_sec"] / ok["train-xl2-phase1"]["images_per_sec"], 3)
    return out


def _note(p: Dict[str, Any], r: Dict[str, Any]) -> str:
    if p["status"] != "ok":
        return (p.get("reason") or p.get("error") or p["status"]).replace("|", "/")[:200]
    if p["name"] == "tests":
        return r.get("summary", "")
    if "synced_images_per_sec" in r:
        return f"synced {r['synced_images_per_sec']} img/s; windows {r['images_per_sec_by_window']}"
    if "model_rows_per_sample" in r:
        return f"{r['model_rows_per_sample']:.0f} model rows per sample"
    if "cached_over_live" in r:
        return (f"Phase-1 step {r['live_teacher_step_s']} s with the live teacher, {r['cached_tokens_step_s']} s from "
                f"cached tokens: x{r['cached_over_live']}")
    if "evaluate_s" in r:
        return f"evaluate() {r['evaluate_s']} s end to end ({r['end_to_end_samples_per_sec']} samples/s)"
    if "first_batch_one_off_s" in r:
        return "; ".join(f"{k[len('estimate_'):-2].replace('_', ' on ')}: {v} s" for k, v in r.items()
                         if k.startswith("estimate_")) + (f" (metrics {r['metrics_seconds']} s, first batch "
                                                          f"+{r['first_batch_one_off_s']} s)")
    if "total_ms_per_step" in r:
        return f"profile: {r['table']}"
    if "gpu" in r:
        return f"{r['gpu']}, torch {r['torch']}, CUDA {r['cuda']}"
    return ""


def markdown_report(report: Dict[str, Any]) -> str:
    lines = [f"# GPU suite, {report['date']}: {report['suite']['status']}", "",
             "| part | status | time s (est.) | images/s | GFLOP/image | TFLOP/s | MFU | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for p in report["parts"]:
        r = p.get("result") or {}
        rows = [(f"{p['name']} {case}", c) for case, c in r["cases"].items()] if "cases" in r else [(p["name"], r)]
        for name, row in rows:
            mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "-"
            gflop = f"{row['flops_per_image'] / 1e9:.1f}" if row.get("flops_per_image") else "-"
            lines.append(f"| {name} | {p['status']} | {p.get('elapsed_s', '-')} ({p['estimate_s']:.0f}) | "
                         f"{row.get('images_per_sec', '-')} | {gflop} | {row.get('achieved_tflops', '-')} | {mfu} | "
                         f"{_note(p, row)} |")
    tests = next((p.get("result") for p in report["parts"] if p["name"] == "tests" and p.get("result")), None)
    if tests:
        lines += ["", "| GPU test | status | s | failure |", "|---|---|---|---|"]
        for t in tests.get("tests", []):
            failure = t.get("message", "").splitlines()[0][:200].replace("|", "/") if t.get("message") else ""
            lines.append(f"| {t['test']} | {t['status'][:80]} | {t['seconds']} | {failure} |")
    for key, value in report.get("derived", {}).items():
        lines.append(f"\n{key}: {value}")
    if report.get("missing"):
        lines += ["", "Missing: " + "; ".join(f"{m['part']} ({m['why'][:160]})" for m in report["missing"])]
    return "\n".join(lines) + "\n"


def print_plan(parts, budget: float, rehearse: bool) -> None:
    from bench import gpu_parts
    scale = gpu_parts.REHEARSAL if rehearse else gpu_parts.FULL
    print(f"Plan ({'rehearsal on the CPU, ' if rehearse else ''}budget {budget:.0f} s from process start; "
          "estimates for one H100/H200 with cold caches, not measured yet):")
    total = 0.0
    for p in parts:
        total += p.estimate(rehearse)
        fits = "" if total <= budget - RESERVE_S else "  <- past the budget: skipped unless time is left"
        settings = ", ".join(f"{k}={v}" for k, v in p.resolved(scale).items())
        print(f"  {p.name:26s} ~{p.estimate(rehearse):4.0f} s, stopped at {p.limit(rehearse):4.0f} s "
              f"(cumulative {total:4.0f} s){' optional' if p.optional else ''}{fits}\n      {p.what}"
              + (f"\n      {settings}" if settings else ""))
        if p.group == "tests":
            from tests import test_gpu  # its conftest settings stay in this printing process
            print("      in this order; a test that would end past the tests' share of the budget is skipped:")
            for name, estimate, what in test_gpu.plan():
                print(f"        {name:48s} ~{estimate:3.0f} s  {what}")
    print("\nFLOPs per image (multiply-add = 2 FLOPs; training step = 3 x SiT forward + teacher forward; "
          "bench/flops.py):")
    for name, row in gpu_parts.flop_table(scale).items():
        print(f"  {name:62s} {row['per_image'] / 1e9:9.1f} GFLOP  (forward {row['forward'] / 1e9:.1f})")


def run_suite(parts, args, output: str, work: str, log: Callable[[str], None], start: float) -> int:
    """Run `parts` in order under the budget; the results file is kept up to date throughout."""
    from bench import gpu_parts, part_runner
    scale = gpu_parts.REHEARSAL if args.rehearse else gpu_parts.FULL
    deadline = start + args.budget_s
    report = {
        "date": datetime.date.today().isoformat(), "started_at": start,
        "suite": {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "status": "running",
                  "rehearse": args.rehearse, "budget_s": args.budget_s, "host": socket.gethostname(),
                  "python": platform.python_version(), "output": output, "work_dir": work},
        "packages": gpu_parts.package_versions(),
        "parts": [{"name": p.name, "group": p.group, "what": p.what, "settings": p.resolved(scale),
                   "estimate_s": p.estimate(args.rehearse), "limit_s": p.limit(args.rehearse),
                   "optional": p.optional, "status": "pending"} for p in parts],
    }
    results = Results(output, report)
    if args.wheels:
        report["suite"]["wheels"] = install_wheels(args.wheels, os.path.join(work, "site-packages"))
    # Compiled kernels: shared by the parts, kept out of the home folder (before the imports: torch reads these once).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(work, "inductor-cache"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(work, "triton-cache"))
    report["suite"]["preload_failures"] = gpu_parts.preload()
    results.write()
    data, no_gpu = None, None
    for i, (part, entry) in enumerate(zip(parts, report["parts"])):
        left = deadline - RESERVE_S - time.time()
        estimate = part.estimate(args.rehearse)
        if no_gpu:
            entry.update(status="not run", reason=no_gpu)
        elif part.needs_data and data is None:
            entry.update(status="not run", reason="needs the demo data, and the data part did not finish")
        elif estimate > left:
            entry.update(status="skipped", reason=f"~{estimate:.0f} s estimated, {max(left, 0):.0f} s of the budget "
                                                  f"left (raise --budget-s or run --only {part.name})")
        else:
            limit = min(part.limit(args.rehearse), left - GRACE_S)
            later = sum(p.estimate(args.rehearse) for p in parts[i + 1:] if not p.optional)
            part_work = tempfile.mkdtemp(prefix=f"{part.name}-", dir=work)
            ctx = gpu_parts.Context(scale=scale, work=part_work, shared=work, output=output,
                                    deadline=time.time() + limit, later_estimate_s=later, data=data,
                                    peak_override={"bf16": args.peak_tflops, "fp32": args.peak_tflops_fp32},
                                    rehearse=args.rehearse)
            spawn = None
            if args.isolation == "spawn" or (args.isolation == "auto" and part_runner.cuda_driver_loaded()):
                context_file = os.path.join(part_work, "context.json")
                with open(context_file, "w") as f:
                    json.dump(gpu_parts.context_to_json(ctx), f)
                spawn = [sys.executable, "-m", "bench.gpu_parts", "--part", part.name, "--context", context_file,
                         "--result", os.path.join(part_work, "result.json")]
            entry.update(status="running", started_s=round(time.time() - start, 1),
                         isolation="spawn" if spawn else "fork")
            results.write()
            log(f"\n=== {part.name}: {part.what} (~{estimate:.0f} s estimated, stopped at {limit:.0f} s)\n")
            try:
                outcome = part_runner.run_part(part.run, (ctx, part), limit_s=limit, grace_s=GRACE_S,
                                               result_path=os.path.join(part_work, "result.json"), emit=log,
                                               spawn=spawn, spawn_cwd=REPO_ROOT)
            except SuiteStopped as e:
                if hasattr(e, "outcome"):
                    entry.update(e.outcome.as_dict())
                entry.update(status="interrupted", stopped=f"the suite was stopped by {e}")
                results.write()
                raise
            else:
                if outcome.result is None and part.salvage is not None:
                    outcome.result = part.salvage(ctx)
            finally:
                shutil.rmtree(part_work, ignore_errors=True)
                for leftover in glob.glob(os.path.join(gpu_parts.SHM, gpu_parts.shm_prefix(os.getpid()) + "*")):
                    shutil.rmtree(leftover, ignore_errors=True)
            entry.update(outcome.as_dict())
            if part.name == "data" and outcome.status == "ok":
                data = outcome.result["data_dir"]
            if part.name == "env" and outcome.status != "ok" and "no CUDA GPU" in (outcome.error or ""):
                no_gpu = f"env found no CUDA GPU ({outcome.error})"
        log(f"=== {part.name}: {entry['status']} after {entry.get('elapsed_s', 0)} s (suite at "
            f"{time.time() - start:.0f} s of {args.budget_s:.0f}) {entry.get('reason') or entry.get('error') or ''}\n")
        results.write()
    failed = [p["name"] for p in report["parts"] if p["status"] in ("failed", "killed", "interrupted")]
    report["suite"]["status"] = f"finished; failed: {', '.join(failed)}" if failed else "finished"
    results.write()
    with open(results.table_path) as f:
        log("\n" + f.read())
    log(f"Results: {results.path} (table: {results.table_path}, log: {os.path.join(output, LOG_NAME)})\n")
    return 1 if failed else 0


def main(argv=None, started_at: Optional[float] = None) -> int:
    """The command line; `started_at` (time.time()) is when the budget's clock starts, by default this process's
    start."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="folder for the results (gpu-suite.json, .md, .log, gpu-tests.xml, the "
                                         "profile table); required unless --dry-run")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder outside the repository (default: a new temp folder, removed at the end)")
    parser.add_argument("--wheels", default=None, help="folder of wheels to install where their package is missing")
    parser.add_argument("--only", nargs="+", metavar="PART", default=None,
                        help="run only these parts or groups (setup, bench, tests, profile); env, and data where "
                             "needed, are added")
    parser.add_argument("--skip", nargs="+", metavar="PART", default=[], help="leave out these parts or groups")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"wall-clock bound of the whole suite from process start (default {BUDGET_S})")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of this GPU in TFLOP/s for MFU (default: from the GPU name: H100 SXM "
                             "989, H100 PCIe 756, H200 989, A100 312)")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None,
                        help="plain fp32 peak for the evaluator's MFU (default: from the GPU name)")
    parser.add_argument("--rehearse", action="store_true",
                        help="every part, optional ones included, on the CPU at toy sizes (bench/gpu_parts.py "
                             "REHEARSAL): the GPU command's code end to end, before GPU minutes are spent on it")
    parser.add_argument("--isolation", choices=("auto", "fork", "spawn"), default="auto",
                        help="how each part gets its process: fork (after the imports, paid once), spawn (a fresh "
                             "interpreter per part), auto (fork unless this process has loaded the CUDA driver)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs per image; no GPU needed")
    args = parser.parse_args(argv)
    start = started_at if started_at is not None else process_start_time()
    from bench import gpu_parts
    parts = select_parts(gpu_parts.PARTS, args.only, args.skip)
    if args.dry_run:
        print_plan(parts, args.budget_s, args.rehearse)
        return 0
    if not args.output:
        parser.error("--output DIR is required: the folder the results, the log and the tables go to")
    output = os.path.abspath(args.output)
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="erw-gpu-suite-"))
    if os.path.commonpath([work, REPO_ROOT]) == REPO_ROOT:
        parser.error(f"--work-dir {work} is inside the repository; the suite writes gigabytes there (checkpoints, "
                     "50K synthetic samples): give a folder outside it, e.g. /tmp/erw-gpu-suite")
    os.makedirs(output, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    log = Log(os.path.join(output, LOG_NAME))

    def stop(signum, frame):
        for sig in previous:  # once: a second signal must not interrupt the stopping (SIGKILL still ends it all)
            signal.signal(sig, signal.SIG_IGN)
        raise SuiteStopped(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, stop)
    code = 1
    try:
        code = run_suite(parts, args, output, work, log, start)
    except SuiteStopped as e:
        code = EXIT_STOPPED
        _record_stop(output, f"stopped by {e}", log)
    except BaseException as e:
        _record_stop(output, f"the suite itself failed: {type(e).__name__}: {e}", log)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        log.close()
    return code


def _record_stop(output: str, why: str, log: Callable[[str], None]) -> None:
    """Mark the suite and its parts that had not ended as stopped, in the results file on disk."""
    from erw.files import atomic_write
    path = os.path.join(output, RESULTS_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        report = json.load(f)
    for p in report["parts"]:
        if p["status"] == "pending":
            p.update(status="not run", reason=f"the suite was {why}")
        elif p["status"] == "running":
            p.update(status="interrupted", stopped=f"the suite was {why}")
    report["suite"]["status"] = why
    report["missing"] = missing_parts(report)
    report["elapsed_s"] = round(time.time() - report["started_at"], 1)
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1, default=str).encode()))
    write_table(os.path.join(output, TABLE_NAME), report)
    log(f"\nSuite {why}; results so far: {path}\n")


if __name__ == "__main__":
    sys.exit(main())
