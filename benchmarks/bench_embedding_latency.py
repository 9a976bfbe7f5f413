"""Re-profile a sentence-embedding run's engines in interleaved rounds: latency per sentence, student vs teacher.

    python benchmarks/bench_embedding_latency.py runs/minilm-shakespeare [--rounds 3] [--threads 2]

`edgekd run` profiles each engine once, one after the other; on a shared machine the load can change between
the teacher's and the student's turn. Here every round profiles every bundle of the run (each in its own
`python -m edgekd.runtime profile` process, as the run does), and the table reports per bundle the median over
rounds of the per-sentence latency (p50 of a batch / batch size), and the student/teacher ratios of those medians.
Writes benchmarks/results/<name>.{json,md} (--name, default embedding_latency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--target", default="x86-cpu-ort")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: the target's)")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="embedding_latency", help="output file stem")
    args = parser.parse_args()
    bundles = sorted(p for p in (args.run / "engines" / args.target).iterdir() if (p / "manifest.json").is_file())
    env = {**os.environ, "PYTHONPATH": str(common.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    per: dict[str, list[dict]] = {b.name: [] for b in bundles}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in bundles:
                out = Path(tmp) / f"{b.name}-{r}.json"
                cmd = [sys.executable, "-m", "edgekd.runtime", "profile", str(b), "--json", str(out),
                       "--batch", args.batch] + (["--threads", str(args.threads)] if args.threads else [])
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                per[b.name].append({**json.loads(out.read_text()), "loadavg": list(os.getloadavg())})
    batches = [int(x) for x in args.batch.split(",")]
    table = {}
    for name, results in per.items():
        table[name] = {"metrics": results[0]["metrics"], "threads": results[0]["threads"],
                       "size_bytes": results[0]["size_bytes"], "loadavg": [r["loadavg"] for r in results]}
        for b in batches:
            values = [next(x["p50"] / b for x in r["rows"] if x["batch"] == b) for r in results]
            table[name][f"batch{b}_ms"] = statistics.median(values)
            table[name][f"batch{b}_rounds"] = values
    teacher = next(n for n in table if n.startswith("teacher"))
    loads = [la[0] for t in table.values() for la in t["loadavg"]]
    result = {"command": common.command_line(), "environment": common.environment(threads=table[teacher]["threads"]),
              "run": str(args.run), "rounds": args.rounds, "bundles": table,
              "seconds": round(time.perf_counter() - started, 1)}
    notes = (f"onnxruntime threads {table[teacher]['threads']}; {args.rounds} rounds, every bundle profiled once per "
             "round in its own process; median over rounds of (p50 of a batch / batch size), batches of the bundle's "
             f"eval sentences padded to their longest. Load average (1 min) during the rounds: {min(loads):.1f}-"
             f"{max(loads):.1f}.")
    rows = []
    for name, t in table.items():
        m = t["metrics"]
        rows.append([name, f"{m['cosine']:.4f}", f"{m['retrieval_top1']:.3f}", f"{m['retrieval_top5']:.3f}",
                     f"{t['size_bytes'] / 2**20:.1f}"]
                    + [f"{t[f'batch{b}_ms']:.3f} ({t[f'batch{b}_ms'] / table[teacher][f'batch{b}_ms']:.3f}, "
                       f"{table[teacher][f'batch{b}_ms'] / t[f'batch{b}_ms']:.1f}x faster)" for b in batches])
    headers = ["engine", "cosine to teacher", "top-1", "top-5", "size MiB"] + [
        f"batch {b} ms/sentence (ratio to teacher)" for b in batches]
    md = "\n".join([common.header_markdown("Sentence-embedding engines: latency per sentence, interleaved rounds",
                                           result["command"], result["environment"], notes), "",
                    common.markdown_table(headers, rows, align="l" * len(headers)), "",
                    f"Total {result['seconds']:.0f} s."])
    common.write_results(args.out, args.name, result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
