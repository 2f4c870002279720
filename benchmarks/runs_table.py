"""The table of every committed training run: accuracy, seed, epochs, split, overrides, wall time, images/s.

    python benchmarks/runs_table.py                        # every results/<group>/<run>/results.json
    python benchmarks/runs_table.py cpu10long              # one group
    python benchmarks/runs_table.py --markdown > runs.md   # a markdown table

It reads only what ``python -m vhmn.train`` wrote (results.json) and prints, per run: the group, the run's
folder, model, parameters, data split (``data.subset``; "all" for the whole training set), the overrides of its
experiment config (``provenance.command``), seed, epochs done / planned, final and best test accuracy, training
wall time, median training images/s over its epochs, threads, device and commit. Then, per group, the mean ± std
over seeds of the runs that differ only by seed. Nothing is timed here: the wall times and images/s are the
runs' own records (runs that shared the machine with others are slower than alone).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def overrides(command: str | None) -> str:
    """The key=value overrides of a run's command, minus seed= (shown apart) and --out."""
    if not command:
        return ""
    words = command.split()[4:]  # python -m vhmn.train <experiment> key=value ... --out DIR
    kept = [w.removeprefix("model.") for i, w in enumerate(words)
            if "=" in w and not w.startswith("seed=") and (i == 0 or words[i - 1] != "--out")]
    return " ".join(kept)


def load(groups: list[str]) -> list[dict]:
    rows = []
    for path in sorted((ROOT / "results").glob("*/*/results.json")):
        group, run = path.parent.parent.name, path.parent.name
        if groups and group not in groups:
            continue
        r = json.loads(path.read_text())
        if r.get("schema") != "vhmn-results/1":
            continue
        ips = [e["images_per_s"] for e in r["epochs"] if e.get("images_per_s")]
        prov = r["provenance"]
        rows.append({
            "group": group, "run": run, "experiment": r["experiment"], "model": r["model"]["name"],
            "params_M": r["model"]["num_params"] / 1e6, "subset": r["data"]["subset"] or "all",
            "overrides": overrides(prov.get("command")), "seed": r["seed"], "status": r["status"],
            "epochs": f"{r['final']['epochs_done']}/{r['config']['epochs']}",
            "test_acc": r["final"].get("test_acc"), "best_acc": r["final"].get("best_test_acc"),
            "wall_min": r["wall_time_s"] / 60, "img_s": statistics.median(ips) if ips else None,
            "threads": r["config"].get("threads"), "device": prov.get("device"), "commit": (prov.get("git_commit") or "")[:7],
        })
    return rows


COLS = [("group", "{}"), ("run", "{}"), ("model", "{}"), ("params_M", "{:.2f}"), ("subset", "{}"), ("overrides", "{}"),
        ("seed", "{}"), ("epochs", "{}"), ("test_acc", "{:.2%}"), ("best_acc", "{:.2%}"), ("wall_min", "{:.1f}"),
        ("img_s", "{:.0f}"), ("threads", "{}"), ("device", "{}"), ("commit", "{}")]


def fmt(row: dict) -> list[str]:
    return ["—" if row[c] is None else f.format(row[c]) for c, f in COLS]


def seed_groups(rows: list[dict]) -> list[tuple[str, str, list[float]]]:
    """(group, run name without _s<seed>, accuracies) for runs that differ only by seed, ≥ 2 seeds."""
    by = defaultdict(list)
    for r in rows:
        base = re.sub(r"_s\d+$", "", r["run"])
        if r["test_acc"] is not None and r["status"] == "complete":
            by[(r["group"], base, r["subset"], r["overrides"], r["epochs"])].append(r["test_acc"])
    return [(k[0], k[1], v) for k, v in by.items() if len(v) >= 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help="result groups (folders of results/), e.g. cpu10long; default all")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = load(args.groups)
    if not rows:
        print(f"no results.json under results/{'{' + ','.join(args.groups) + '}' if args.groups else '*'}/*/")
        return 1
    table = [[c for c, _ in COLS]] + [fmt(r) for r in rows]
    if args.markdown:
        print("| " + " | ".join(table[0]) + " |\n|" + "---|" * len(COLS))
        for t in table[1:]:
            print("| " + " | ".join(t) + " |")
    else:
        widths = [max(len(t[i]) for t in table) for i in range(len(COLS))]
        for t in table:
            print("  ".join(x.ljust(w) for x, w in zip(t, widths)).rstrip())
    seeds = seed_groups(rows)
    if seeds:
        print("\nover seeds (runs that differ only by seed):")
        for group, base, accs in seeds:
            sd = statistics.stdev(accs)
            print(f"  {group}/{base}: {statistics.mean(accs):.2%} ± {sd:.2%} (n = {len(accs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
