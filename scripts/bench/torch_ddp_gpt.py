"""PyTorch DDP peer for scripts/bench/gpt: the same job as configs/gpt_fortunes.json.

nanoGPT's GPT (4 layers, 4 heads, 128 wide, block 128, byte vocabulary 256, tied lm_head, exact GELU), the same
fortune files cut into windows at i*128 (first 90% of the bytes), DistributedSampler(shuffle), batch 16 per
rank, AdamW(lr 2e-3, betas (0.9, 0.99), weight decay 0.1 on >= 2-D weights), clip_grad_norm 1.0, gloo backend,
OMP_NUM_THREADS=1 (torchrun sets it). Runs BENCH_STEPS steps (default 60); the first BENCH_SKIP (default 5) are
warm-up and not timed. Rank 0 prints one JSON line: tokens/s over the group, tokens per CPU second (the ranks'
process CPU time over the timed steps, summed: what the code costs, whatever else the machine runs), peak RSS of each
rank (max).
"""
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

FILES = ["fortunes", "computers", "cookie", "literature", "wisdom", "people", "science", "work", "humorists"]
V, T, L, H, C, BATCH = 256, 128, 4, 4, 128, 16


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mask = torch.tril(torch.ones(T, T, dtype=torch.bool))  # not a buffer: gloo cannot broadcast bool

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(~self.mask[:t, :t], float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), Attn(), nn.LayerNorm(C)
        self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList([Block() for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def main():
    steps, skip = int(os.environ.get("BENCH_STEPS", "60")), int(os.environ.get("BENCH_SKIP", "5"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1337)
    data = b"".join(open(f"/usr/share/games/fortunes/{f}", "rb").read() for f in FILES)
    tokens = torch.frombuffer(bytearray(data[: int(len(data) * 0.9)]), dtype=torch.uint8).long()
    n = (len(tokens) - 1) // T
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=1337)
    order = list(sampler)
    model = DDP(GPT())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.99))
    timed = 0.0
    for step in range(steps):
        if step == skip:
            t0 = time.perf_counter()
            c0 = time.process_time()
        idx = order[(step * BATCH) % len(order):][:BATCH]
        x = torch.stack([tokens[i * T:i * T + T] for i in idx])
        y = torch.stack([tokens[i * T + 1:i * T + T + 1] for i in idx])
        loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    timed = time.perf_counter() - t0
    cpu = torch.tensor([time.process_time() - c0])
    dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        tok = (steps - skip) * BATCH * T * world
        print(json.dumps({"tokens_per_s": tok / timed, "tokens_per_cpu_s": tok / cpu.item(), "peak_rss_mb": rss.item(),
                          "loss": loss.item()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
