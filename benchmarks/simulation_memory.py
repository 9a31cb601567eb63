"""Memory of the in-process simulation as the number of clients K grows (SmolLM2-135M).

Simulating K clients in one process must cost one copy of the base model plus, per client, its
adapters and their optimizer state (the client side and the main server's side of its adapters):
the clients share the frozen blocks, never copy them.

For each K in (1, 10, 50) a fresh subprocess (glibc told to serve allocations above 64 KiB with
mmap, so freed tensors leave the resident set at once) loads the model, builds a federation of K
clients with split points cycling through 2, 4, 7, 11, 17 and rank 8 on q, k, v, o, runs one
local step of every client (so that every client's AdamW state exists), collects garbage and reads
its resident set (VmRSS). Per-client adapter state is counted exactly: adapter parameters x 4
bytes x 4 (weights, gradients, two AdamW moments), client and server side.

    extra per client = (RSS(K=50) - RSS(K=1)) / 49

    .venv/bin/python benchmarks/simulation_memory.py
    .venv/bin/python benchmarks/simulation_memory.py --clients 1,100 --plan-clients 100 --round-clients 100

Last line: RESULT extra_mb_per_client=<MB> (target: <= mean adapter state per client + 10 MB;
the line before it states the target for this configuration).

`--plan-clients N` also times ARMSC for N clients of the hetero5 preset (cycled), as a run plans
round 1 (the memory model measured once beforehand, uniform importance, the fastest split rule):
RESULT plan_seconds_k<N>=<s> (target < 2 s for 100). `--round-clients N` also runs one round of
hsplitlora with N clients, `--sampled` (10) of them sampled, 2 local steps, in a fresh process:
RESULT round_seconds_k<N>_sampled<M>=<wall s> and its peak resident set. `--ray-clients N` runs
one round of hsplitlora on the Ray engine with N client actors (every one trains one step) and
samples, every second, the proportional set size (PSS: shared pages split between the processes
that share them, so libraries count once) of this run's processes (the driver, Ray's own and the
actors): RESULT ray_round_seconds_k<N>=<wall s>, RESULT ray_peak_gib_k<N>=<GiB>, and the mean PSS
of a client actor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

KS = (1, 10, 50)
SPLITS = (2, 4, 7, 11, 17)
RANK = 8
MODEL = "smollm2-135m"


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(clients: int) -> None:
    import torch

    from hsplitlora.config import RunConfig
    from hsplitlora.roles.adapters import adapter_name
    from hsplitlora.setup import fixed_federation

    torch.set_num_threads(2)
    config = RunConfig(model=MODEL, clients=clients, split_point=[SPLITS[i % len(SPLITS)] for i in range(clients)],
                       rank=RANK, batch_size=1, max_seq_len=48, seed=0)  # fmt: skip
    federation = fixed_federation(config)
    gc.collect()
    after_load = rss_bytes()
    federation.engine.local_steps(1)
    gc.collect()
    model = federation.loaded.model
    names = {adapter_name(cid) for cid in range(clients)}
    adapter_params = base_params = 0
    for name, parameter in model.named_parameters():
        if names & set(name.split(".")):
            adapter_params += parameter.numel()
        else:
            base_params += parameter.numel()
    print(json.dumps({
        "clients": clients, "rss_bytes": rss_bytes(), "rss_after_load_bytes": after_load,
        "peak_bytes": rss_bytes("VmHWM"), "adapter_state_bytes": adapter_params * 4 * 4,
        "base_model_bytes": base_params * 4,
    }))  # fmt: skip


def plan_seconds(clients: int) -> float:
    """Wall seconds of ARMSC's round-1 plan for `clients` clients (the memory model is measured
    before the clock starts, as a run measures it once)."""
    import time

    import torch

    from hsplitlora.config import RunConfig
    from hsplitlora.devices import resolve_devices
    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.method.memory import measure_memory_model
    from hsplitlora.models.loading import load_model
    from hsplitlora.strategies import StrategyContext
    from hsplitlora.strategies.hsplitlora import HSplitLoRA
    from hsplitlora.time_model import Workload
    from hsplitlora.units import parse_bytes

    torch.set_num_threads(2)
    run = RunConfig()
    model = load_model(MODEL).model
    candidates = attach_lora(model, run.targets)
    memory = measure_memory_model(model, candidates, run.batch_size, run.max_seq_len)
    tokens = run.batch_size * 60.0  # E2E's mean length at this tokenizer, about 60 tokens
    workload = Workload(steps=run.local_steps, tokens_per_step=tokens, padded_tokens_per_step=tokens,
                        hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                        server_flops=run.server_flops)  # fmt: skip
    context = StrategyContext(memory, resolve_devices(clients, preset="hetero5"), parse_bytes(run.server_budget),
                              tuple(run.rank_levels), run.rho, run.s_min, run.replan_delta,
                              split_rule="fastest", workload=workload)  # fmt: skip
    strategy = HSplitLoRA(context)
    started = time.perf_counter()
    plan = strategy.make_plan(dict.fromkeys(candidates, 1.0))
    seconds = time.perf_counter() - started
    cuts = sorted({c.split_point for c in plan.clients})
    print(f"ARMSC for {clients} clients of hetero5 (cycled): {seconds:.2f} s; cuts used {cuts}")
    return seconds


def round_worker(clients: int, sampled: int) -> None:
    """One round of hsplitlora with `clients` clients, `sampled` of them sampled (this process)."""
    import tempfile
    import time

    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run

    with tempfile.TemporaryDirectory() as folder:
        config = RunConfig(model=MODEL, clients=clients, clients_per_round=sampled, rounds=1, local_steps=2,
                           val_size=16, output_dir=f"{folder}/run", threads=2)  # fmt: skip
        started = time.perf_counter()
        metrics = run(config).metrics[-1]
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_bytes": rss_bytes("VmHWM"), "val_ppl": metrics["val_ppl"],
                      "sampled": metrics.get("sampled_clients")}))  # fmt: skip


def ray_round_worker(clients: int) -> None:
    """One round of hsplitlora on the Ray engine with `clients` client actors (this process is the
    driver); the peak PSS of the driver and every process under it, sampled each second."""
    import tempfile
    import threading
    import time

    import psutil

    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run

    me = psutil.Process()
    peak = {"total": 0, "clients": [], "server": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            total, clients_pss, server = 0, [], 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    pss = process.memory_full_info().pss
                    title = " ".join(process.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += pss
                if "ClientActor" in title:
                    clients_pss.append(pss)
                elif "ServerActor" in title:
                    server = pss
            if total > peak["total"]:
                peak.update(total=total, clients=clients_pss, server=server)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as folder:
        config = RunConfig(model=MODEL, clients=clients, rounds=1, local_steps=1, val_size=16, engine="ray",
                           output_dir=f"{folder}/run", threads=1)  # fmt: skip
        started = time.perf_counter()
        metrics = run(config).metrics[-1]
        seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_pss_bytes": peak["total"], "client_actor_pss": peak["clients"],
                      "server_actor_pss": peak["server"], "val_ppl": metrics["val_ppl"],
                      "split_points": [c["split_point"] for c in metrics["clients"]]}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, metavar="K", help=argparse.SUPPRESS)
    parser.add_argument("--round-worker", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--clients", default=",".join(map(str, KS)), help="client counts (1,10,50); none: skip")
    parser.add_argument("--plan-clients", type=int, help="also time ARMSC for this many clients")
    parser.add_argument("--round-clients", type=int, help="also run one round with this many clients")
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled in that round (10)")
    parser.add_argument("--ray-clients", type=int, help="also run one round on the Ray engine with this many actors")
    parser.add_argument("--ray-round-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_round_worker:
        ray_round_worker(args.ray_round_worker)
        return
    if args.worker:
        worker(args.worker)
        return
    if args.round_worker:
        round_worker(*args.round_worker)
        return
    counts = [] if args.clients == "none" else sorted({int(k) for k in args.clients.split(",")})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    if counts:
        print(f"{MODEL}, split points cycling {SPLITS}, rank {RANK} on q,k,v,o, one step per client (batch 1)")
        print(f"{'K':>4} {'RSS MiB':>9} {'peak MiB':>9} {'adapter state MiB (all)':>24} {'base model MiB':>15}")
        rows = []
        for clients in counts:
            command = [sys.executable, __file__, "--worker", str(clients)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{clients:>4} {row['rss_bytes'] / 2**20:>9.1f} {row['peak_bytes'] / 2**20:>9.1f} "
                  f"{row['adapter_state_bytes'] / 2**20:>24.2f} {row['base_model_bytes'] / 2**20:>15.1f}")  # fmt: skip
        first, last = rows[0], rows[-1]
        span = last["clients"] - first["clients"]
        extra = (last["rss_bytes"] - first["rss_bytes"]) / span
        state = (last["adapter_state_bytes"] - first["adapter_state_bytes"]) / span
        print(
            f"extra memory per client {extra / 1e6:.2f} MB; its adapter state {state / 1e6:.2f} MB; "
            f"target <= {state / 1e6 + 10:.2f} MB ({'met' if extra <= state + 10e6 else 'NOT met'})"
        )
        print(f"RESULT extra_mb_per_client={extra / 1e6:.2f}")
    if args.plan_clients:
        print(f"RESULT plan_seconds_k{args.plan_clients}={plan_seconds(args.plan_clients):.2f}")
    if args.round_clients:
        command = [sys.executable, __file__, "--round-worker", str(args.round_clients), str(args.sampled)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"one round, {args.round_clients} clients, {args.sampled} sampled, 2 local steps: {row['seconds']:.1f} s "
              f"wall, peak RSS {row['peak_bytes'] / 2**30:.2f} GiB, val ppl {row['val_ppl']:.2f}, "
              f"sampled {row['sampled']}")  # fmt: skip
        print(f"RESULT round_seconds_k{args.round_clients}_sampled{args.sampled}={row['seconds']:.1f}")
    if args.ray_clients:
        command = [sys.executable, __file__, "--ray-round-worker", str(args.ray_clients)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the Ray round failed:\n{done.stderr.strip()[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        actors = row["client_actor_pss"]
        mean = sum(actors) / max(1, len(actors))
        print(f"one round on the Ray engine, {args.ray_clients} client actors (split points {row['split_points']}), "
              f"one step each: {row['seconds']:.1f} s wall, peak PSS {row['peak_pss_bytes'] / 2**30:.2f} GiB in all "
              f"({len(actors)} client actors at {mean / 2**20:.0f} MiB each, the main server's actor "
              f"{row['server_actor_pss'] / 2**20:.0f} MiB), val ppl {row['val_ppl']:.2f}")  # fmt: skip
        print(f"RESULT ray_round_seconds_k{args.ray_clients}={row['seconds']:.1f}")
        print(f"RESULT ray_peak_gib_k{args.ray_clients}={row['peak_pss_bytes'] / 2**30:.2f}")


if __name__ == "__main__":
    main()
