"""Seeded random spec projects for the benchmarks, and the lower bound LB* of each.

    .venv/bin/python bench/workload.py --specs 300 --seed 1 --out /tmp/specs/bench-1 [--scale 1.0] [--slots 140]

A project is a layered DAG: specs are spread over `layers` layers; a spec of layer k > 0 depends on 1-3
specs of earlier layers (mostly layer k-1), so there is fan-out (one spec feeds several) and fan-in (one
spec waits for several). Priorities are drawn (1: 15%, 2: 70%, 3: 15%). `modifies` is drawn from a small
pool of files with a skewed (Zipf-like) choice, so some specs share files and hence file locks.
Every spec is `kind: shell` and runs

    echo "<id> start <epoch> $DISPATCH_NODE" >> timeline; sleep <d>; echo "<id> end <epoch> $DISPATCH_NODE" >> timeline

with d drawn uniformly in [min_s, max_s] x scale. LB* = max(critical path by duration, total work /
slots, the largest total work under one file lock) is computed from the drawn project itself.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class GenSpec:
    task_id: str
    layer: int
    seconds: float
    priority: int
    depends_on: list[str] = field(default_factory=list)
    modifies: list[str] = field(default_factory=list)


@dataclass
class Workload:
    seed: int
    specs: list[GenSpec]

    @property
    def by_id(self) -> dict[str, GenSpec]:
        return {s.task_id: s for s in self.specs}

    def critical_path(self) -> float:
        finish: dict[str, float] = {}
        for spec in self.specs:  # generated in topological order
            finish[spec.task_id] = spec.seconds + max((finish[d] for d in spec.depends_on), default=0.0)
        return max(finish.values(), default=0.0)

    def total_work(self) -> float:
        return sum(s.seconds for s in self.specs)

    def lock_work(self) -> dict[str, float]:
        work: dict[str, float] = {}
        for spec in self.specs:
            for path in spec.modifies:
                work[path] = work.get(path, 0.0) + spec.seconds
        return work

    def lower_bound(self, slots: int) -> dict[str, float]:
        """The bounds of bench/bounds.py: `lb_s` is the tightest (with Jackson's per-file bound), `plain_lb_s`
        the earlier LB* (critical path, work / slots, the busiest file's work)."""
        from bounds import workload_bounds

        bounds = workload_bounds(self, slots)
        return {**{k: v for k, v in bounds.items() if k not in ("plain_s", "bound_s")},
                "lb_s": bounds["bound_s"], "plain_lb_s": bounds["plain_s"],
                "total_work_s": round(self.total_work(), 3), "slots": slots}


def generate(count: int, seed: int, *, layers: int | None = None, min_s: float = 1.0, max_s: float = 4.0,
             scale: float = 1.0, files: int = 60, share: float = 0.25, uniform: bool = False) -> Workload:
    """Draw a project of `count` specs (deterministic for a seed).

    Args:
        layers: DAG depth (default ~ count ** 0.5 / 1.5, at least 3).
        min_s, max_s, scale: durations are uniform in [min_s, max_s] times scale (0 gives no-op specs).
        files: size of the pool of files `modifies` draws from.
        share: probability that a spec modifies one file of the pool (a few modify two).
        uniform: draw the files uniformly instead of Zipf-like (a few hot files).
    """
    rng = random.Random(seed)
    layers = layers or max(3, round(count ** 0.5 / 1.5))
    sizes = [1] * layers
    for _ in range(count - layers):
        sizes[rng.randrange(layers)] += 1
    weights = [1.0 if uniform else 1.0 / (k + 1) ** 0.6 for k in range(files)]  # Zipf-like: a few hot files
    pool = [f"src/mod{k:02d}.py" for k in range(files)]
    specs: list[GenSpec] = []
    by_layer: list[list[str]] = []
    index = 0
    for layer, size in enumerate(sizes):
        ids = []
        for _ in range(size):
            task_id = f"S{index:05d}"
            index += 1
            deps: list[str] = []
            if layer > 0:
                fan_in = rng.choice([1, 1, 1, 2, 2, 3])
                for _ in range(fan_in):
                    source = layer - 1 if rng.random() < 0.8 or layer == 1 else rng.randrange(layer - 1)
                    dep = rng.choice(by_layer[source])
                    if dep not in deps:
                        deps.append(dep)
            modifies: list[str] = []
            if rng.random() < share:
                modifies.append(rng.choices(pool, weights)[0])
                if rng.random() < 0.15:
                    other = rng.choices(pool, weights)[0]
                    if other not in modifies:
                        modifies.append(other)
            priority = rng.choices([1, 2, 3], [0.15, 0.7, 0.15])[0]
            seconds = round(rng.uniform(min_s, max_s) * scale, 2)
            specs.append(GenSpec(task_id, layer, seconds, priority, deps, modifies))
            ids.append(task_id)
        by_layer.append(ids)
    return Workload(seed, specs)


PROFILES = {
    "standard": {},
    # 30 % of the specs modify a file of 40, drawn uniformly: many files, each with a few specs in a row
    "lock-heavy": {"files": 40, "share": 0.30, "uniform": True},
}


def generate_named(profile: str, count: int, seed: int, **overrides) -> Workload:
    """`generate` with a named profile's settings (`standard`, `lock-heavy`), then `overrides`."""
    return generate(count, seed, **{**PROFILES[profile], **overrides})


def shell_script(spec: GenSpec, timeline: Path) -> str:
    return (f'echo "{spec.task_id} start $(date +%s.%N) $DISPATCH_NODE" >> {timeline}\n'
            f"sleep {spec.seconds}\n"
            f'echo "{spec.task_id} end $(date +%s.%N) $DISPATCH_NODE" >> {timeline}\n')


def write_project(workload: Workload, specs_dir: Path, timeline: Path) -> None:
    """Write the specs as `kind: shell` markdown files (and workload.json beside the timeline)."""
    specs_dir.mkdir(parents=True, exist_ok=True)
    for spec in workload.specs:
        front = {"task_id": spec.task_id, "kind": "shell", "priority": spec.priority,
                 "depends_on": spec.depends_on, "modifies": spec.modifies, "retries": 2}
        lines = "".join(f"{k}: {json.dumps(v)}\n" for k, v in front.items())
        script = shell_script(spec, timeline)
        body = f"## Goal\nBenchmark spec {spec.task_id} (layer {spec.layer}).\n\n```bash\n{script}```\n"
        (specs_dir / f"{spec.task_id}.md").write_text(f"---\n{lines}---\n{body}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--slots", type=int, default=140)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    parser.add_argument("--out", type=Path, required=True, help="the project's spec directory")
    parser.add_argument("--timeline", type=Path, default=None)
    args = parser.parse_args()
    workload = generate_named(args.profile, args.specs, args.seed, scale=args.scale)
    write_project(workload, args.out, args.timeline or args.out.parent / f"{args.out.name}.timeline")
    print(json.dumps({"specs": len(workload.specs), **workload.lower_bound(args.slots)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["PROFILES", "GenSpec", "Workload", "asdict", "generate", "generate_named", "write_project"]
