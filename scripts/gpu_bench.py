#!/usr/bin/env python3
"""The benchmark half of scripts/gpu-check (run there, on the GPU machine; needs CUDA PyTorch).

Prints one table from one run, both sides of every comparison:
  - bf16 and TF32 GEMM rates measured with torch.matmul (8192^3): the ceilings MFU is computed against;
  - GPT-2-small shape (12 layers, 12 heads, 768 wide, block 1024, vocab 50257), batch B: step time, tokens/s, MFU
    and peak GPU memory for dtrain ("precision": "bf16": bf16 GEMM inputs, fp32 master weights, the activations
    only bf16 GEMMs read stored as bf16; and fp32 with TF32 GEMMs; both with "attention": "auto", which at this
    shape is the matmul path: cuBLAS GEMMs over one sample's score square) and for PyTorch eager on the same model
    and batch (bf16 autocast, and fp32 with TF32); then, when the budget leaves time, dtrain fp32 with "attention":
    "fused" (the flash-style kernels: with the job's "tf32": true their TF32 tensor-core form) for the
    fused/matmul comparison that decides "auto"'s threshold;
  - all-reduce over the GPUs present: dtrain bench allreduce --backend nccl, and PyTorch's NCCL all_reduce on the
    same sizes (algbw and busbw as nccl-tests define them: busbw = algbw * 2 (n - 1) / n).
Time: --budget S bounds the whole run (scripts/gpu-check passes what its own budget leaves); each part's timeout
is the smaller of its own and what is left, keeping a reserve for the parts after it. A part that fails or runs
out of time prints why and the others still print; the exit code is then 1.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

L, H, C, T, V = 12, 12, 768, 1024, 50257
DEADLINE = [float("inf")]
FAILURES = []


def left(reserve=0.0):
    """Seconds until the deadline, less `reserve` (kept for the parts after this one); at least 1."""
    return max(1.0, DEADLINE[0] - time.monotonic() - reserve)


def gemm_tflops(dtype, n=8192, iters=20):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def flops_per_token(params):
    # nanoGPT's estimate_mfu (PaLM appendix B): 6 N + 12 L H Q T per token, Q = C / H, where N is nanoGPT's
    # get_num_params(): every parameter but the position table (a lookup, no matmul; the tied wte counts once, as
    # the lm_head's matmul). `params` is the whole count, wpe included, on both sides.
    return 6 * (params - T * C) + 12 * L * H * (C // H) * T


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B = x.size(0)
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block() for _ in range(L))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head


def torch_gpt(batch, steps, bf16):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    torch.cuda.empty_cache()  # the smi column: no cached blocks of an earlier row
    model = GPT().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    x = torch.randint(0, V, (batch, T), device="cuda")
    y = torch.randint(0, V, (batch, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float().view(-1, V), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with GpuMemory() as mem:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    return dt, params, peak, mem.peak


class GpuMemory:
    """Peak used memory of GPU 0 as nvidia-smi reports it, sampled every 0.2 s (dtrain has no allocator stats)."""

    def __init__(self):
        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, float(out.strip().splitlines()[0]) / 1024)
            except Exception:
                pass
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def step_seconds(rows, warm, steps):
    """Mean seconds per step from step `warm` to step `warm + steps` of dtrain's metrics.jsonl rows (log_every 1).

    Only the progress rows count: their time_s is the training time at that step. The final row repeats the last
    step with time_s = the whole run's wall time (the model's export included) and an evaluation row repeats its
    step too; either would stand in for the last step's time."""
    t = {row["step"]: row["time_s"] for row in rows
         if "time_s" in row and "step" in row and not row.get("final") and "eval_loss" not in row}
    return (t[warm + steps] - t[warm]) / steps


def dtrain_gpt(dtrain, batch, steps, tmp, precision, reserve, attention="auto"):
    tokens = batch * T * (steps + 6) + T + 1
    path = os.path.join(tmp, "tokens.bin")
    if not os.path.exists(path):
        header = torch.zeros(256, dtype=torch.int32)
        header[0], header[1], header[2] = 20240520, 1, tokens  # llm.c's token file
        with open(path, "wb") as f:
            f.write(header.numpy().tobytes())
            f.write(torch.randint(0, V, (tokens,), dtype=torch.int32).to(torch.int16).numpy().tobytes())
    out = os.path.join(tmp, f"out-{precision}-{attention}")
    warm = 3
    job = {
        "model": {"preset": "gpt", "vocab_size": V, "block_size": T, "n_layer": L, "n_head": H, "n_embd": C,
                  "dropout": 0.0, "bias": True},
        "loss": {"type": "cross_entropy"},
        "data": {"train": {"format": "tokens", "path": path}, "batch_size": batch, "shuffle": False},
        "optimizer": {"type": "adamw", "lr": 6e-4, "weight_decay_on": "matrices"},
        "train": {"epochs": 1, "seed": 1, "max_steps": warm + steps, "log_every": 1},
        "checkpoint": False, "device": "cuda", "tf32": True, "precision": precision, "attention": attention,
    }
    job_path = os.path.join(tmp, f"job-{precision}-{attention}.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    with GpuMemory() as mem:
        r = subprocess.run([dtrain, "train", job_path, "--output-dir", out],
                           capture_output=True, text=True, timeout=min(300.0, left(reserve)))
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"dtrain train failed (exit {r.returncode})")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    dt = step_seconds(rows, warm, steps)
    params = 12 * (12 * C * C + 13 * C) + V * C + T * C + 2 * C  # the gpt preset with bias and a tied head
    final = next((row for row in reversed(rows) if row.get("final")), {})
    if "peak_gpu_mb" not in final:
        raise SystemExit("dtrain's final metrics line has no peak_gpu_mb")
    return dt, params, final["peak_gpu_mb"] / 1024, mem.peak


def allreduce_torch(rank, world, sizes, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    res = []
    for n in sizes:
        x = torch.ones(n // 4, device="cuda")
        for _ in range(5):
            torch.distributed.all_reduce(x)
        torch.cuda.synchronize()
        iters = 20
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.distributed.all_reduce(x)
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) / iters)
    if rank == 0:
        out.put(res)
    torch.distributed.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtrain", required=True)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=float, default=420, help="seconds for the whole run")
    a = ap.parse_args()
    DEADLINE[0] = time.monotonic() + a.budget
    print(f"\n== GEMM ceilings ({torch.cuda.get_device_name(0)}, torch {torch.__version__}) ==")
    bf16, tf32 = gemm_tflops(torch.bfloat16), None
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = gemm_tflops(torch.float32)
    print(f"bf16 GEMM 8192^3: {bf16:.1f} TFLOP/s    fp32 (TF32) GEMM: {tf32:.1f} TFLOP/s")

    torch.cuda.empty_cache()  # the GEMM ceilings' blocks would count in the dtrain rows' smi column
    tokens = a.batch * T
    print(f"\n== GPT-2-small shape (L{L} H{H} C{C} T{T} V{V}), batch {a.batch} = {tokens} tokens/step, "
          f"{a.steps} timed steps after 3 warm-up ==")
    print(f"{'side':<34}{'step ms':>9}{'tokens/s':>11}{'MFU bf16':>10}{'MFU tf32':>10}{'peak GiB':>10}{'smi GiB':>9}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Reserves: the second dtrain row, the PyTorch rows and the all-reduce table come after the first row.
        for key, name, precision, reserve in (("dtrain bf16", "dtrain (bf16 GEMMs, fp32 master)", "bf16", 150),
                                              ("dtrain fp32", "dtrain (fp32, TF32 GEMMs)", "fp32", 90)):
            try:
                rows[key] = (name,) + dtrain_gpt(a.dtrain, a.batch, a.steps, tmp, precision, reserve)
            except Exception as e:  # keep the other rows: they say what the machine does
                print(f"{name} row failed: {e}")
                FAILURES.append(key)
        for key, name, use_bf16 in (("torch bf16", "PyTorch eager (bf16 autocast)", True),
                                    ("torch fp32", "PyTorch eager (fp32, TF32)", False)):
            try:
                rows[key] = (name,) + torch_gpt(a.batch, a.steps, use_bf16)
            except Exception as e:
                print(f"{name} row failed: {e}")
                FAILURES.append(key)
                torch.cuda.empty_cache()
        # The comparison row (the fused attention kernels, TF32 tensor cores as "tf32" is on), after the PyTorch rows so it never starves them: only
        # when the budget leaves it a minute beside the all-reduce table's reserve.
        if left(40) > 60:
            name = "dtrain (fp32, fused attention)"
            try:
                rows["dtrain fp32 fused"] = (name,) + dtrain_gpt(a.dtrain, a.batch, a.steps, tmp, "fp32", 40,
                                                                 attention="fused")
            except Exception as e:
                print(f"{name} row failed: {e}")
                FAILURES.append("dtrain fp32 fused")
        else:
            print("dtrain (fp32, fused attention): NOT RUN (time budget)")
    for name, dt, params, peak, smi in rows.values():
        fpt = flops_per_token(params) * tokens / dt / 1e12
        print(f"{name:<34}{dt * 1e3:>9.1f}{tokens / dt:>11.0f}{fpt / bf16:>10.1%}{fpt / tf32:>10.1%}{peak:>10.1f}"
              f"{smi:>9.1f}")
    print("(peak GiB: the most memory the program's buffers held at once, the same measure on both sides: PyTorch's\n"
          " torch.cuda.max_memory_allocated, dtrain's peak_gpu_mb (every cudaMalloc'd buffer); the issue's target.\n"
          " smi GiB: the peak of nvidia-smi's memory.used of GPU 0 during the row's run, device-wide: CUDA contexts,\n"
          " cuBLAS/NCCL workspaces, PyTorch's cached blocks, and this script's own context in every row)")
    for mine, theirs in (("dtrain bf16", "torch bf16"), ("dtrain fp32", "torch fp32"),
                         ("dtrain fp32 fused", "dtrain fp32")):
        if mine in rows and theirs in rows:  # tokens/s ratio = inverse step-time ratio
            print(f"{rows[mine][0]} / {rows[theirs][0]} tokens/s: {rows[theirs][1] / rows[mine][1]:.2f}x")

    print(f"\n== all-reduce, float32 sum, {a.gpus} GPU(s) ==")
    sizes = [1 << p for p in range(20, 31, 2)]  # 1 MiB .. 1 GiB
    print("dtrain bench allreduce --backend nccl:")
    try:
        r = subprocess.run([a.dtrain, "run", "--standalone", "--nproc-per-node", str(a.gpus), "--", a.dtrain, "bench",
                            "allreduce", "--backend", "nccl", "--min-bytes", "1M", "--max-bytes", "1G",
                            "--step-factor", "4"],
                           capture_output=True, text=True, timeout=min(180.0, left(40)))
        print(r.stdout.strip() or r.stderr[-2000:])
        if r.returncode != 0:
            print(f"(exit {r.returncode})")
            FAILURES.append("dtrain all-reduce")
    except subprocess.TimeoutExpired:
        print("timed out (time budget)")
        FAILURES.append("dtrain all-reduce")
    import queue
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=allreduce_torch, args=(i, a.gpus, sizes, 29500 + os.getpid() % 1000, q))
             for i in range(a.gpus)]
    for p in procs:
        p.start()
    try:
        times = q.get(timeout=min(180.0, left()))
    except queue.Empty:
        print("PyTorch all_reduce: timed out (time budget)")
        FAILURES.append("torch all-reduce")
        times = []
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    print("PyTorch torch.distributed.all_reduce (nccl):")
    print(f"{'bytes':>12}{'time us':>11}{'algbw GB/s':>12}{'busbw GB/s':>12}")
    for n, t in zip(sizes, times):
        alg = n / t / 1e9
        print(f"{n:>12}{t * 1e6:>11.1f}{alg:>12.2f}{alg * 2 * (a.gpus - 1) / a.gpus:>12.2f}")
    if FAILURES:
        print(f"\nbenchmark parts that failed: {', '.join(FAILURES)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
