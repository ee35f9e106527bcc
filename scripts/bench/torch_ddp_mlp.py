"""PyTorch DDP peer for scripts/bench/train: the same job as configs/fashion_mnist_mlp.json.

784-256-256-10 MLP with ReLU, cross-entropy, SGD(lr=0.05, momentum=0.9), batch 64 per rank, pixels / 255,
shuffled with DistributedSampler, gloo backend, OMP_NUM_THREADS=1 (torchrun sets it). Run under torchrun
(scripts/bench/torchrun_peer.py). Rank 0 prints one JSON line: training samples/s over the group (training loop
only, evaluation excluded), peak RSS of each rank (max), wall time of the first step, test accuracy.
"""
import gzip
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

DATA = "/usr/share/datasets/fashion-mnist"


def idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def main():
    epochs = int(os.environ.get("BENCH_EPOCHS", "1"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(42)
    x = torch.from_numpy(idx(f"{DATA}/train-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255.0)
    y = torch.from_numpy(idx(f"{DATA}/train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    tx = torch.from_numpy(idx(f"{DATA}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255.0)
    ty = torch.from_numpy(idx(f"{DATA}/t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=42)
    loader = DataLoader(ds, batch_size=64, sampler=sampler)
    model = DDP(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    first_step = None
    # scripts/bench/recovery: rank 1 of the first attempt SIGKILLs itself after step BENCH_KILL_STEP.
    kill_step = int(os.environ.get("BENCH_KILL_STEP", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    steps = 0
    samples = 0
    train_time = 0.0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            samples += xb.shape[0] * world
            steps += 1
            if first_step is None:
                first_step = time.time()
                if kill_step:
                    print(json.dumps({"attempt": attempt, "rank": rank, "first_step_wall": first_step}), flush=True)
            if kill_step and attempt == 0 and rank == 1 and steps == kill_step:
                print(json.dumps({"killed_wall": time.time()}), flush=True)
                os.kill(os.getpid(), 9)
        train_time += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        correct = (model(tx).argmax(1) == ty).sum().item()
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"samples_per_s": samples / train_time, "peak_rss_mb": rss.item(),
                          "first_step_wall": first_step, "accuracy": correct / len(ty)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
