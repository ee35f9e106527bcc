#!/usr/bin/python3
"""gloo peer benchmark for scripts/bench/allreduce: PyTorch's CPU all-reduce, timed the way
`dtrain bench allreduce --json` times its own (same sizes, same JSON keys), so the tables line up.

Runs without torchrun (Debian's torchrun 1.13 trips over Python 3.11's enum): this script starts NPROC
processes itself and calls init_process_group with a tcp:// init method.

  /usr/bin/python3 gloo_allreduce.py [--nproc 2] [--min-bytes 1024] [--max-bytes 67108864] [--label gloo]

float32 sum, in place. Per size: warm-up calls, then an iteration count chosen by rank 0 so the timed loop
lasts about --budget seconds (broadcast so every rank runs the same count), time = slowest rank's mean.
Correctness is checked on a separate call with small integers whose sum is exact."""
import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def time_loop(buf, iters):
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    mine = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine.item())


def worker(rank, args, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.nproc)
    n = args.nproc
    nbytes = args.min_bytes
    while nbytes <= args.max_bytes:
        count = nbytes // 4
        buf = torch.ones(count, dtype=torch.float32)
        warm = time_loop(buf, 3)
        iters = torch.tensor([min(20000, max(5, int(args.budget / max(warm, 1e-7))))], dtype=torch.int64)
        dist.broadcast(iters, 0)
        buf.fill_(1.0)
        t = time_loop(buf, int(iters.item()))
        idx = torch.arange(count, dtype=torch.int64)
        buf = ((rank + idx) % 7 - 3).to(torch.float32)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        want = torch.zeros(count, dtype=torch.float32)
        for r in range(n):
            want += ((r + idx) % 7 - 3).to(torch.float32)
        wrong = torch.tensor([int((buf != want).sum().item())], dtype=torch.int64)
        dist.reduce(wrong, 0)
        if rank == 0:
            algbw = nbytes / t / 1e9
            print(json.dumps({"backend": args.label, "bytes": nbytes, "time_us": round(t * 1e6, 3),
                              "algbw_gbps": round(algbw, 4), "busbw_gbps": round(algbw * 2 * (n - 1) / n, 4),
                              "wrong": int(wrong.item())}), flush=True)
        nbytes *= 2
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--min-bytes", type=int, default=1024)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--budget", type=float, default=0.25, help="seconds per size (timed loop)")
    p.add_argument("--label", default="gloo")
    args = p.parse_args()
    with socket.socket() as s:  # a free port for the rendezvous, as torchrun picks MASTER_PORT
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args, port), nprocs=args.nproc, join=True, start_method="spawn")


if __name__ == "__main__":
    sys.exit(main())
