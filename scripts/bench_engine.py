#!/usr/bin/env python3
"""End-to-end engine benchmark: `pipeline` side by side with DVC and Snakemake.

Generates the same DAG of N trivial shell stages (each writes the md5 of its inputs into
its one output, so outputs stay 35 bytes whatever the shape: a plain `cat` would double
the size at every layer of the layered DAG and fill the disk) in three formats -- our TOML recipe, a `dvc.yaml`, a `Snakefile` -- each in its own
temporary directory, and times:

* full run   -- a cold run of every stage, sequential (`-j 1` / DVC is sequential /
                `--cores 1`), reported also per stage, and as the engine's overhead per
                stage on top of running the same commands with one `sh -c` each;
* no-op      -- a second run when everything is up to date
                (`pipeline run`, `dvc repro`, `snakemake --cores 1`);
* plan       -- what would run (`pipeline plan`, `dvc status`, `snakemake -n`).

The no-op rerun and the all-hit plan are then measured once more with `pipeline` and
Snakemake alternating, run for run (`--interleaved-rounds`), since the load of a shared
machine moves within minutes and each tool's block of runs above sees another load: the
ratios of that second table are the fair ones.

Wall times are medians; the median CPU time (user + system, of the process and its
children) is printed too, for `pipeline` and Snakemake, because on a shared machine the
wall time also counts the wait for a free core. Ratios are of wall times, and for Snakemake
also of CPU times (`cpu ratio`), which the load moves much less.

`pipeline`'s first command stores the resolved recipe in its cache (`<cache>/v1/recipes/`),
and the medians come after one warm-up run, so every measured `pipeline` command uses it:
`plan (cold)` is cold for the stage entries, not for the recipe. `--no-recipe-cache` empties
that store before every `pipeline` command, to time full recipe loads (and their store
writes) instead.

Shapes: chain (s0 -> s1 -> ...), fan (one root, N-2 children, one join), layered (about
sqrt(N) layers, each stage reading two stages of the layer above) -- the shapes of the
engine's criterion benches and end-to-end tests.

DVC and Snakemake are optional: give their executables with --dvc / --snakemake or put
them on PATH (e.g. `python3 -m venv /tmp/bv && /tmp/bv/bin/pip install dvc snakemake`);
without them their columns print n/a. They are only run for sizes <= --others-max (their
cold run of 1000 stages takes minutes each).

Output: a markdown table on stdout (progress on stderr).

    cargo build --release --no-default-features
    scripts/bench_engine.py --pipeline target/release/pipeline --dvc /tmp/bv/bin/dvc \
        --snakemake /tmp/bv/bin/snakemake
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = ("chain", "fan", "layered")


def name(i: int) -> str:
    return f"s{i:05d}"


def dag(shape: str, n: int) -> list[list[int]]:
    """deps[i] = indices of the stages stage i reads."""
    deps: list[list[int]] = [[] for _ in range(n)]
    if shape == "chain":
        for i in range(1, n):
            deps[i] = [i - 1]
    elif shape == "fan":
        for i in range(1, n - 1):
            deps[i] = [0]
        deps[n - 1] = list(range(1, n - 1))
    elif shape == "layered":
        width = math.ceil(math.sqrt(n))
        for i in range(width, n):
            start = (i // width - 1) * width
            a, b = start + i % width, start + (i + 1) % width
            deps[i] = [a] if a == b else [a, b]
    else:
        raise ValueError(shape)
    return deps


def inputs(deps: list[int]) -> list[str]:
    return [f"out/{name(d)}.txt" for d in deps] if deps else ["seed.txt"]


def write_ours(d: Path, deps: list[list[int]]) -> Path:
    lines = ['[experiment]\nname = "bench"\n']
    for i, ds in enumerate(deps):
        dep_list = ", ".join(f'"@{name(j)}"' for j in ds) if ds else '"seed.txt"'
        lines.append(
            f'[stages.{name(i)}]\nkind = "shell"\ndeps = [{dep_list}]\n'
            f'cmd = "cat ${{deps}} | md5sum > ${{outs}}"\nouts = ["out/{name(i)}.txt"]\n'
        )
    path = d / "recipe.toml"
    path.write_text("\n".join(lines))
    return path


def write_dvc(d: Path, deps: list[list[int]]) -> None:
    out = ["stages:"]
    for i, ds in enumerate(deps):
        ins = inputs(ds)
        out.append(f"  {name(i)}:")
        out.append(f"    cmd: cat {' '.join(ins)} | md5sum > out/{name(i)}.txt")
        out.append("    deps:")
        out.extend(f"      - {p}" for p in ins)
        out.append("    outs:")
        out.append(f"      - out/{name(i)}.txt")
    (d / "dvc.yaml").write_text("\n".join(out) + "\n")


def write_snakefile(d: Path, deps: list[list[int]]) -> None:
    n = len(deps)
    out = ["rule all:", "    input:"]
    out.extend(f'        "out/{name(i)}.txt",' for i in range(n))
    for i, ds in enumerate(deps):
        ins = ", ".join(f'"{p}"' for p in inputs(ds))
        out += [
            "",
            f"rule {name(i)}:",
            f"    input: {ins}",
            f'    output: "out/{name(i)}.txt"',
            '    shell: "cat {input} | md5sum > {output}"',
        ]
    (d / "Snakefile").write_text("\n".join(out) + "\n")


# CPU seconds (user + system) of the last command `timed` ran. On a shared machine the wall
# time includes waiting for a core, so the CPU time is reported next to it for our tool.
LAST_CPU = [0.0]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# Set by --no-recipe-cache: the resolved-recipe store to empty before each `pipeline` command.
CLEAR_BEFORE: list[Path] = []


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    for d in CLEAR_BEFORE:
        shutil.rmtree(d, ignore_errors=True)
    c = children_cpu()
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    LAST_CPU[0] = children_cpu() - c
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
    return dt


def median_of(reps: int, cmd: list[str], cwd: Path, env: dict | None = None,
              cpu: list[float] | None = None) -> float:
    """Median wall time of `reps` runs after one warm-up; `cpu` (if given) receives the
    median CPU time of the same runs."""
    timed(cmd, cwd, env)  # warm the page cache and the stat caches
    walls, cpus = [], []
    for _ in range(reps):
        walls.append(timed(cmd, cwd, env))
        cpus.append(LAST_CPU[0])
    if cpu is not None:
        cpu.append(statistics.median(cpus))
    return statistics.median(walls)


def interleaved(specs: dict, rounds: int) -> dict:
    """Run the commands of `specs` (name -> (cmd, cwd)) round-robin, one warm-up each and then
    `rounds` rounds of one run each, so that all of them see the same minutes of a load that
    changes. Returns name -> (median wall, median CPU)."""
    for cmd, cwd in specs.values():
        timed(cmd, cwd)
    got: dict = {k: [] for k in specs}
    for _ in range(rounds):
        for k, (cmd, cwd) in specs.items():
            got[k].append((timed(cmd, cwd), LAST_CPU[0]))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in got.items()}


def prepare(root: Path, tool: str) -> Path:
    d = root / tool
    (d / "out").mkdir(parents=True)
    (d / "seed.txt").write_text("seed\n")
    return d


def spawn_baseline(root: Path, deps: list[list[int]]) -> float:
    """The same commands, one `sh -c` each, sequentially, with no engine: what a full run
    costs at the very least. Subtracted from a full run, it leaves the engine's own
    per-stage overhead (keys, hashing, commit with fsyncs, restore, scheduling)."""
    d = prepare(root, "baseline")
    t = time.perf_counter()
    for i, ds in enumerate(deps):
        subprocess.run(["sh", "-c", f"cat {' '.join(inputs(ds))} | md5sum > out/{name(i)}.txt"], cwd=d, check=True)
    return time.perf_counter() - t


def bench_ours(exe: str, root: Path, deps, reps: int, full: bool, no_memo: bool = False) -> dict:
    d = prepare(root, "pipeline")
    recipe = write_ours(d, deps)
    CLEAR_BEFORE[:] = [d / ".pipeline" / "v1" / "recipes"] if no_memo else []
    base = [exe, "--cache-dir", str(d / ".pipeline"), "--runs-dir", str(d / "runs"), "-q", "--no-progress"]
    res: dict = {}
    cpu: dict = {}
    c: list[float] = []
    res["plan-cold"] = median_of(reps, base + ["plan", str(recipe)], d, cpu=c)
    cpu["plan-cold"] = c[-1]
    if full:
        res["baseline"] = spawn_baseline(root, deps)
        res["full"] = timed(base + ["run", str(recipe), "-j", "1"], d)
        cpu["full"] = LAST_CPU[0]
        res["noop"] = median_of(reps, base + ["run", str(recipe)], d, cpu=c)
        cpu["noop"] = c[-1]
        res["plan"] = median_of(reps, base + ["plan", str(recipe)], d, cpu=c)
        cpu["plan"] = c[-1]
    res["cpu"] = cpu
    CLEAR_BEFORE.clear()
    return res


def run_commands_directly(d: Path, deps: list[list[int]]) -> None:
    """Produce every output with one shell script, in topological order (index order).

    Used to bring DVC and Snakemake into the up-to-date state without their (slow) cold
    run when that run is not being measured."""
    script = "set -e\n" + "".join(f"cat {' '.join(inputs(ds))} | md5sum > out/{name(i)}.txt\n" for i, ds in enumerate(deps))
    subprocess.run(["sh", "-c", script], cwd=d, check=True)


def bench_dvc(exe: str, root: Path, deps, reps: int, full: bool) -> dict:
    d = prepare(root, "dvc")
    write_dvc(d, deps)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run([exe, "init", "--no-scm", "-q"], cwd=d, env=env, check=True)
    res = {"plan-cold": median_of(reps, [exe, "status"], d, env)}
    if full:
        res["full"] = timed([exe, "repro", "-q"], d, env)
    else:
        # Same end state as `dvc repro`: outputs present, hashed into the cache and dvc.lock.
        run_commands_directly(d, deps)
        subprocess.run([exe, "commit", "-f", "-q"], cwd=d, env=env, check=True)
    res["noop"] = median_of(reps, [exe, "repro", "-q"], d, env)
    res["plan"] = median_of(reps, [exe, "status"], d, env)
    return res


def bench_snakemake(exe: str, root: Path, deps, reps: int, full: bool) -> dict:
    d = prepare(root, "snakemake")
    write_snakefile(d, deps)
    base = [exe, "--cores", "1", "--quiet"]
    cpu: dict = {}
    c: list[float] = []
    res = {"plan-cold": median_of(reps, base + ["-n"], d, cpu=c)}
    cpu["plan-cold"] = c[-1]
    if full:
        res["full"] = timed(base, d)
        cpu["full"] = LAST_CPU[0]
    else:
        run_commands_directly(d, deps)
        subprocess.run(base + ["--touch"], cwd=d, check=True, stdout=subprocess.DEVNULL)
    res["noop"] = median_of(reps, base, d, cpu=c)
    cpu["noop"] = c[-1]
    res["plan"] = median_of(reps, base + ["-n"], d, cpu=c)
    cpu["plan"] = c[-1]
    res["cpu"] = cpu
    return res


def fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def ratio(other: float | None, ours: float | None) -> str:
    if other is None or ours is None or ours <= 0:
        return "n/a"
    return f"{other / ours:.0f}x"


def find_tool(given: str | None, name_: str) -> str | None:
    if given:
        return given if shutil.which(given) else None
    return shutil.which(name_)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="target/release/pipeline", help="the pipeline binary")
    ap.add_argument("--dvc", help="dvc executable (default: on PATH)")
    ap.add_argument("--snakemake", help="snakemake executable (default: on PATH)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sizes", default="100,1000", help="sizes measured in full (run, no-op, plan)")
    ap.add_argument("--plan-sizes", default="10000", help="sizes for which only ours is measured (plan)")
    ap.add_argument("--others-max", type=int, default=1000, help="largest size DVC/Snakemake are run on")
    ap.add_argument("--others-full-max", type=int, default=100,
                    help="largest size at which DVC/Snakemake's cold run is timed; above it their "
                         "up-to-date state is made by running the commands directly + `dvc commit` / "
                         "`snakemake --touch`")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of no-op and plan (median)")
    ap.add_argument("--others-reps", type=int, default=1, help="repetitions for DVC/Snakemake (slow)")
    ap.add_argument("--interleaved-rounds", type=int, default=5,
                    help="rounds of the interleaved no-op and plan measurement against Snakemake "
                         "(0: skip it)")
    ap.add_argument("--no-recipe-cache", action="store_true",
                    help="empty pipeline's resolved-recipe store before each of its commands "
                         "(time full recipe loads)")
    args = ap.parse_args()

    exe = str(Path(args.pipeline).resolve())
    if not os.access(exe, os.X_OK):
        print(f"error: pipeline binary `{args.pipeline}` not found; build it with "
              "`cargo build --release --no-default-features`", file=sys.stderr)
        return 2
    dvc = find_tool(args.dvc, "dvc")
    smk = find_tool(args.snakemake, "snakemake")
    shapes = [s for s in args.shapes.split(",") if s]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    plan_sizes = [int(s) for s in args.plan_sizes.split(",") if s]

    rows = []
    inter_rows = []
    # Every measurement's files are deleted only at the end: deleting thousands of inodes
    # slows every inode the next measurement creates on some file systems (ext4 without a
    # journal scans past recently deleted inodes on each allocation), which would charge
    # one measurement for the clean-up of the one before.
    keep = tempfile.TemporaryDirectory(prefix="bench-engine-")
    for shape in shapes:
        for n in sizes + plan_sizes:
            full = n in sizes
            deps = dag(shape, n)
            root = Path(keep.name) / f"{shape}-{n}"
            root.mkdir()
            print(f"{shape} {n}: pipeline", file=sys.stderr, flush=True)
            ours = bench_ours(exe, root, deps, args.reps, full, args.no_recipe_cache)
            theirs = {}
            if full and n <= args.others_max:
                for tool, fn, path in (("dvc", bench_dvc, dvc), ("snakemake", bench_snakemake, smk)):
                    if path:
                        print(f"{shape} {n}: {tool}", file=sys.stderr, flush=True)
                        try:
                            theirs[tool] = fn(path, root, deps, args.others_reps, n <= args.others_full_max)
                        except RuntimeError as e:
                            print(f"warning: {tool} failed: {e}", file=sys.stderr)
                if "snakemake" in theirs and full and args.interleaved_rounds > 0:
                    print(f"{shape} {n}: interleaved", file=sys.stderr, flush=True)
                    d_ours, d_smk = root / "pipeline", root / "snakemake"
                    recipe = str(d_ours / "recipe.toml")
                    ours_base = [exe, "--cache-dir", str(d_ours / ".pipeline"), "--runs-dir",
                                 str(d_ours / "runs"), "-q", "--no-progress"]
                    smk_base = [smk, "--cores", "1", "--quiet"]
                    for metric, o_cmd, s_cmd in (("no-op rerun", ours_base + ["run", recipe], smk_base),
                                                 ("plan (all hit)", ours_base + ["plan", recipe],
                                                  smk_base + ["-n"])):
                        CLEAR_BEFORE[:] = ([d_ours / ".pipeline" / "v1" / "recipes"]
                                           if args.no_recipe_cache else [])
                        m = interleaved({"ours": (o_cmd, d_ours), "smk": (s_cmd, d_smk)},
                                        args.interleaved_rounds)
                        CLEAR_BEFORE.clear()
                        inter_rows.append((shape, n, metric, *m["ours"], *m["smk"]))
            for metric in ("full", "noop", "plan", "plan-cold"):
                if metric not in ours:
                    continue
                o = ours.get(metric)
                d = theirs.get("dvc", {}).get(metric)
                s = theirs.get("snakemake", {}).get(metric)
                s_cpu = theirs.get("snakemake", {}).get("cpu", {}).get(metric)
                o_cpu = ours["cpu"].get(metric)
                label = {"full": "full run (-j 1)", "noop": "no-op rerun", "plan": "plan (all hit)",
                         "plan-cold": "plan (cold)"}[metric]
                ours_txt = fmt_s(o)
                if metric == "full":
                    over = (o - ours["baseline"]) / n * 1000
                    ours_txt += f" ({o / n * 1000:.1f} ms/stage, {over:.1f} over `sh -c`)"
                rows.append((shape, n, label, ours_txt, fmt_s(o_cpu), fmt_s(d), fmt_s(s), fmt_s(s_cpu),
                             ratio(d, o), ratio(s, o), ratio(s_cpu, o_cpu)))

    keep.cleanup()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"dvc: {'yes' if dvc else 'n/a'}, snakemake: {'yes' if smk else 'n/a'}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(f"Recipe store: {'emptied before every pipeline command' if args.no_recipe_cache else 'kept'}\n")
    print("| shape | stages | measure | pipeline | pipeline CPU | dvc | snakemake | snakemake CPU "
          "| dvc / pipeline | snakemake / pipeline | snakemake / pipeline, CPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    if inter_rows:
        print(f"\nInterleaved (pipeline and Snakemake alternating, {args.interleaved_rounds} rounds, "
              "medians): the ratio of two tools measured in the same minutes\n")
        print("| shape | stages | measure | pipeline | pipeline CPU | snakemake | snakemake CPU "
              "| snakemake / pipeline | snakemake / pipeline, CPU |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for shape, n, metric, ow, oc, sw, sc in inter_rows:
            print(f"| {shape} | {n} | {metric} | {fmt_s(ow)} | {fmt_s(oc)} | {fmt_s(sw)} | {fmt_s(sc)} "
                  f"| {ratio(sw, ow)} | {ratio(sc, oc)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
