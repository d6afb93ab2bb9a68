"""The store at scale: 10,000 runs x 100 cases, then `history` for its device type and one more run recorded.

    python -m tests.store_scale [--store PATH] [--commits 2000] [--runs-per-commit 5] [--cases 100]

Fills a SQLite store through the schema's own SQL (the rows ``Store.record`` writes, inserted in bulk so that
filling takes a minute rather than an hour), then times ``python -m perf_tests history --device ...`` as a
process and ``Store.record`` of one more 100-case run. Not collected by pytest (docs/store.md has figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from perf_tests.records.results import run_from_doc
from perf_tests.records.store import Store
from tests.perf_json import MACHINE, benchmark


def names(cases: int) -> list[str]:
    kinds = ("unet_step", "txt2img")
    attn = ("original", "sdpa", "sdpa-math")
    return [f"test_{kinds[i % 2]}[tiny-{attn[i // 2 % 3]}-eager-bs{1 + i // 6}-fp32]" for i in range(cases)]


def fill(store: Store, commits: int, per_commit: int, cases: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    case_names = names(cases)
    extras = {n: json.dumps(benchmark(n, [0.1])["extra_info"], sort_keys=True) for n in case_names}
    machine = json.dumps(MACHINE, sort_keys=True)
    steps = rng.choice(commits, size=5, replace=False)
    run_id = 0
    for c in range(commits):
        level = 1 + 0.1 * (steps <= c).sum()
        runs, results = [], []
        for r in range(per_commit):
            run_id += 1
            runs.append(
                (
                    run_id,
                    f"key-{run_id}",
                    f"torch2-run{r}.json",
                    f"2026-01-01T00:00:{c:06d}",
                    f"{c:040x}",
                    f"{c:040x}",
                    0,
                    f"2026-01-01T{c:06d}",
                    "solo",
                    "cpu-intel-xeon-processor",
                    "cpu",
                    "torch2",
                    "a1b2c3d4e5f6",
                    machine,
                    1,
                    "[]",
                    "[]",
                )
            )
            common = rng.normal(0, 0.03)
            for i, n in enumerate(case_names):
                samples = (0.1 + 0.01 * i) * level * np.exp(common + rng.normal(0, 0.02, 10))
                results.append(
                    (
                        run_id,
                        n,
                        n.split("[")[0][5:],
                        "tiny",
                        "h",
                        float(np.median(samples)),
                        1,
                        json.dumps(samples.tolist()),
                        extras[n],
                    )
                )
        with store.transaction():
            store.conn.executemany(
                "INSERT INTO runs (id, run_key, source, started_at, git_commit, commit_sha, dirty, "
                "commit_time, mode,"
                " device_slug, device_type, env, machine_id, environment, complete, canary, canary_timeline, "
                "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '2026-01-01')",
                runs,
            )
            store.conn.executemany(
                "INSERT INTO results (run_id, name, kind, profile, definition_hash, median_s, iterations, "
                "samples,"
                " extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                results,
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, default=Path("/tmp/sd-perf-store-scale.sqlite"))
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--runs-per-commit", type=int, default=5)
    p.add_argument("--cases", type=int, default=100)
    args = p.parse_args()
    if not args.store.exists():
        t0 = time.perf_counter()
        with Store.open(args.store) as store:
            fill(store, args.commits, args.runs_per_commit, args.cases)
        print(f"filled {args.store} in {time.perf_counter() - t0:.0f} s")
    with Store.open(args.store) as store:
        print(
            f"{store.count()} runs, {store.count('results')} case results, "
            f"{args.store.stat().st_size / 2**20:.0f} MiB"
        )
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf_tests",
            "history",
            "--store",
            str(args.store),
            "--device",
            "cpu-intel-xeon-processor",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(f"history: {time.perf_counter() - t0:.2f} s as a process; {out.splitlines()[0]}")
    doc = json.loads(
        json.dumps(
            {
                "benchmarks": [benchmark(n, [0.1] * 10) for n in names(args.cases)],
                "machine_info": MACHINE,
                "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    )
    run = run_from_doc(doc, "torch2-run-new.json")
    with Store.open(args.store) as store:
        t0 = time.perf_counter()
        store.record(run)
        print(f"one {args.cases}-case run recorded in {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
