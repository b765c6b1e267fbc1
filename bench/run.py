"""The benchmark: each part of bench/parts.py in turn, in this process, on one GPU; --rehearse runs the same code on
the CPU at toy sizes. After each part OUT/bench.json and OUT/bench.md are rewritten atomically; a part that raises
is recorded with its error and the next part runs. docs/benchmarks.md says how to read the figures.
"""
import sys

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.run ...`")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

from bench.parts import FULL, PARTS, REHEARSAL, Context, Part, parts_for  # noqa: E402
from operations.files import atomic_write  # noqa: E402

JSON_NAME, TABLE_NAME = "bench.json", "bench.md"
TRACEBACK_LINES = 30
PACKAGES = ("torch", "numpy", "timm", "diffusers", "accelerate", "scipy")
# Dense (no 2:4 sparsity) peaks in TFLOP/s from NVIDIA's data sheets: bf16 tensor cores, and plain fp32 (no TF32: the
# evaluator's Inception runs in it). The first entry whose substrings are all in the GPU's name wins.
PEAK_TFLOPS = [
    (("H100", "PCIE"), 756.0, 51.0),
    (("H800", "PCIE"), 756.0, 51.0),
    (("H100", "NVL"), None, None),      # another part: not tabulated here, give --peak-tflops
    (("H200", "NVL"), None, None),
    (("H100",), 989.0, 67.0),           # SXM
    (("H800",), 989.0, 67.0),
    (("H200",), 989.0, 67.0),           # GH200 too
    (("A100",), 312.0, 19.5),
]


def peak_tflops(gpu_name: str) -> Dict[str, Optional[float]]:
    """{'bf16': ..., 'fp32': ...} dense peaks for a CUDA device name, None where the name is not tabulated."""
    upper = gpu_name.upper()
    for keys, bf16, fp32 in PEAK_TFLOPS:
        if all(k in upper for k in keys):
            return {"bf16": bf16, "fp32": fp32}
    return {"bf16": None, "fp32": None}


def environment() -> Dict[str, Any]:
    cuda = torch.cuda.is_available()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"gpu": torch.cuda.get_device_name() if cuda else None, "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "packages": versions}


def run_part(part: Part, ctx: Any) -> Dict[str, Any]:
    """part.run(ctx) as a results entry: ok with its result, or failed with its error. GPU memory is freed after it."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        entry = {"status": "ok", "result": part.run(ctx)}
    except (Exception, SystemExit) as e:  # SystemExit: an entry point's refusal; any failure ends this part only
        entry = {"status": "failed", "error": {
            "type": type(e).__name__, "message": str(e),
            "traceback": traceback.format_exc().splitlines()[-TRACEBACK_LINES:]}}
    entry["elapsed_s"] = round(time.perf_counter() - start, 1)
    gc.collect()  # the failed part's frames are gone with its traceback: its tensors can go now
    if cuda:
        entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        torch.cuda.empty_cache()
    return entry


def run(parts: List[Part], ctx: Any, output: str, report: Dict[str, Any], budget_s: Optional[float],
        start: float) -> Dict[str, Any]:
    """Run `parts` in order into report["parts"], writing OUTPUT/bench.json and bench.md after each. A part starts
    only if its estimate fits in what is left of budget_s, counted from `start` (time.monotonic())."""
    report["parts"] = [{"name": p.name, "what": p.what, "estimate_s": p.estimate_s, "status": "pending"}
                       for p in parts]
    write(output, report)
    for i, (part, entry) in enumerate(zip(parts, report["parts"])):
        elapsed = time.monotonic() - start
        if budget_s is not None and elapsed + part.estimate_s > budget_s:
            entry.update(status="skipped", reason=f"estimated {part.estimate_s:.0f} s, {max(budget_s - elapsed, 0):.0f}"
                                                  f" s of --budget-s {budget_s:.0f} left")
        else:
            print(f"\n== {part.name} ({i + 1}/{len(parts)}): {part.what}; about {part.estimate_s:.0f} s", flush=True)
            entry.update(run_part(part, ctx))
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write(output, report)
        print(f"== {part.name}: {entry['status']} {entry.get('reason') or entry.get('error', {}).get('message', '')}",
              flush=True)
    return report


def write(output: str, report: Dict[str, Any]) -> None:
    text = json.dumps(report, indent=1, default=str)
    atomic_write(os.path.join(output, JSON_NAME), lambda f: f.write(text.encode()))
    table = markdown(report)
    atomic_write(os.path.join(output, TABLE_NAME), lambda f: f.write(table.encode()))


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _short(value: Any) -> Any:
    """`value` with its floats to 4 significant digits, for the tables."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return [_short(v) for v in value] if isinstance(value, list) else value


def markdown(report: Dict[str, Any]) -> str:
    env, peaks = report["environment"], report["peak_tflops"]
    lines = [f"# ERW benchmark, {report['date']}: {env['gpu'] or 'CPU'}{' (rehearsal)' if report['rehearse'] else ''}",
             "", f"torch {env['packages']['torch']}, CUDA {env['cuda']}, Python {env['python']}; peak bf16 "
             f"{_cell(peaks['bf16'])} / fp32 {_cell(peaks['fp32'])} TFLOP/s ({report['peak_source']}); "
             f"`{report['command']}`", "",
             "| part | case | status | s | GPU GiB | rate | GFLOP per item | TFLOP/s | MFU | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["parts"]:
        result = p.get("result") or {}
        notes = {"failed": lambda: f"{p['error']['type']}: {p['error']['message']}".splitlines()[0][:300],
                 "skipped": lambda: p["reason"]}.get(p["status"], lambda: "")().replace("|", "/")
        for case, row in (result.get("rows") or {"": {}}).items():
            gflop = row["flops_per_item"] / 1e9 if row.get("flops_per_item") else None
            rate = f"{row['rate']:.4g} {row['unit']}" if "rate" in row else "-"
            lines.append(f"| {p['name']} | {case} | {p['status']} | {_cell(p.get('elapsed_s'))} | "
                         f"{_cell(p.get('peak_gpu_memory_gib'))} | {rate} | {_cell(gflop, '{:.4g}')} | "
                         f"{_cell(row.get('tflops'), '{:.4g}')} | {_cell(row.get('mfu'), '{:.1%}')} | {notes} |")
        extra = {k: v for k, v in result.items() if k != "rows"}
        if extra:
            details = json.dumps(_short(extra), default=str).replace("|", "/")
            lines.append(f"| {p['name']} | details | | | | | | | | {details} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for bench.json and bench.md")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="wall clock from the start: a part whose estimate no longer fits is skipped")
    parser.add_argument("--only", nargs="+", metavar="PART", choices=[p.name for p in PARTS],
                        help=f"run only these parts, in the benchmark's order: {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same code on the CPU at toy sizes (SiT-Tiny/2, a tiny random teacher, 64 px)")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                        help="dense bf16 peak of this GPU for MFU (default: from its name, NVIDIA's data sheets)")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None, metavar="T",
                        help="plain fp32 peak, for the evaluator's MFU (default: from the GPU's name)")
    parser.add_argument("--compile", action="store_true", help="train with --compile (torch.compile)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="scratch folder, ~12 GB (default: a new temp folder, removed at the end)")
    return parser


def main(argv=None, parts: Optional[List[Part]] = None) -> int:
    """The command line, over `parts` (default: bench/parts.py's, at the scale --rehearse picks); exit status 1 when
    a part failed."""
    start = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible to torch; --rehearse runs the benchmark on the CPU at toy sizes")
    found = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else {"bf16": None, "fp32": None}
    peaks = {"bf16": args.peak_tflops or found["bf16"], "fp32": args.peak_tflops_fp32 or found["fp32"]}
    scale = REHEARSAL if args.rehearse else FULL
    parts = [p for p in (parts_for(args.rehearse) if parts is None else parts) if not args.only or p.name in args.only]
    work = args.work_dir or tempfile.mkdtemp(prefix="erw-bench-")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)]),
              "rehearse": args.rehearse, "budget_s": args.budget_s, "compile": args.compile,
              "environment": environment(), "peak_tflops": peaks,
              "peak_source": "--peak-tflops" if args.peak_tflops else "the GPU's name, NVIDIA's data sheets"
              if torch.cuda.is_available() else "no GPU",
              "settings": asdict(scale)}
    try:
        run(parts, Context(scale, work, peaks, args.compile), args.output, report, args.budget_s, start)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nResults: {os.path.join(args.output, JSON_NAME)}, table: {os.path.join(args.output, TABLE_NAME)}")
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
