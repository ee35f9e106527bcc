#!/usr/bin/env python3
"""PyTorch parity of the gpt preset (issue 11), run by ctest as test_gpt_parity (label "peers").

Needs Debian's python3-torch (`scripts/setup --peers`); exits 77 (ctest: skipped) without it.
Usage: gpt_parity.py DTRAIN_BINARY

1. A nanoGPT-style PyTorch module (written here from nanoGPT's model.py) is initialised by torch and its weights
   are written as a Hugging Face GPT-2 model.safetensors (names without "transformer.", Conv1D weights [in, out]):
   dtrain's init.from must transpose them on load.
2. `dtrain train` runs N AdamW steps (nanoGPT's decay groups, clipping) on a tokens .bin file; the same N steps
   run in PyTorch on the same windows. Per-step losses and every final weight agree within 1e-4 relative.
3. The checkpoint (model.safetensors) loads into the module with only the tied lm_head.weight missing.
4. A run stopped after N/2 steps and resumed from its checkpoint ends bitwise equal to the uninterrupted run.
"""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("SKIP: python3-torch is not installed (scripts/setup --peers)")
    sys.exit(77)

V, T, L, H, C = 37, 8, 2, 2, 16
BATCH, STEPS = 4, 6
LR, WD, BETAS, CLIP = 3e-3, 0.1, (0.9, 0.95), 1.0


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C)
        self.c_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(C), Attn(), nn.LayerNorm(C), Mlp()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C),
                                              h=nn.ModuleList([Block() for _ in range(L)]), ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.normal_(p, 0.0, 0.02)  # nonzero biases, so that their gradients and loading are tested too

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        assert info["dtype"] == "F32", info
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(info["shape"])
    return out


def hf_layout(model):
    """GPT2Model's names and Conv1D layout, plus the mask buffers transformers saves."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        bare = name[len("transformer."):]
        if any(bare.endswith(s) for s in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                          "mlp.c_proj.weight")):
            t = t.t()
        out[bare] = t
    for i in range(L):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
    return out


def run(binary, job, *args):
    r = subprocess.run([binary, "train", job, *args], capture_output=True, text=True, timeout=240)
    if r.returncode != 0:
        sys.exit(f"dtrain train {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def main():
    binary = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="gpt_parity_")
    try:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        tokens = torch.randint(0, V, (BATCH * STEPS * T + 1,), dtype=torch.int64)
        with open(os.path.join(tmp, "train.bin"), "wb") as f:
            f.write(tokens.numpy().astype("<u2").tobytes())
        model = GPT()
        write_safetensors(os.path.join(tmp, "hf.safetensors"), hf_layout(model))
        job = {"model": {"preset": "gpt", "vocab_size": V, "block_size": T, "n_layer": L, "n_head": H, "n_embd": C},
               "loss": {"type": "cross_entropy"},
               "data": {"train": {"format": "tokens", "path": "train.bin"}, "batch_size": BATCH, "shuffle": False},
               "optimizer": {"type": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WD,
                             "weight_decay_on": "matrices", "clip_grad_norm": CLIP},
               "train": {"epochs": 1, "seed": 3, "log_every": 1},
               "init": {"from": "hf.safetensors"},
               "checkpoint": {"every_steps": 1000, "keep": 3}}
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        full = os.path.join(tmp, "full")
        run(binary, job_path, "--output-dir", full)

        # The same steps in PyTorch: windows i*T in order (shuffle off, one rank), nanoGPT's optimizer groups.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=LR, betas=BETAS, foreach=False)
        losses = []
        for step in range(STEPS):
            idx = torch.stack([tokens[(step * BATCH + b) * T:(step * BATCH + b) * T + T] for b in range(BATCH)])
            tgt = torch.stack([tokens[(step * BATCH + b) * T + 1:(step * BATCH + b) * T + T + 1] for b in range(BATCH)])
            logits = model(idx)
            loss = F.cross_entropy(logits.view(-1, V), tgt.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            losses.append(loss.item())

        by_step = {}
        for line in open(os.path.join(full, "metrics.jsonl")):
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                by_step.setdefault(rec["step"], rec["loss"])  # one line per step (log_every 1)
        ours = [by_step[s] for s in sorted(by_step)]
        worst = 0.0
        for step, (a, b) in enumerate(zip(ours, losses)):
            rel = abs(a - b) / abs(b)
            worst = max(worst, rel)
            print(f"step {step + 1}: loss dtrain {a:.7f} pytorch {b:.7f} (rel {rel:.1e})")
        assert len(ours) == STEPS, ours
        assert worst < 1e-4, f"loss differs by {worst:.2e} relative"

        weights = read_safetensors(os.path.join(full, "model.safetensors"))
        state = model.state_dict()
        worst_w = 0.0
        for name, t in weights.items():
            rel = ((t - state[name]).norm() / state[name].norm().clamp_min(1e-12)).item()
            worst_w = max(worst_w, rel)
            if rel >= 1e-4:
                print(f"{name}: relative difference {rel:.2e}")
        print(f"weights after {STEPS} AdamW steps: largest relative difference {worst_w:.2e} over {len(weights)} tensors")
        assert worst_w < 1e-4

        fresh = GPT()
        result = fresh.load_state_dict(weights, strict=False)
        assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys, result
        assert torch.equal(fresh.lm_head.weight, weights["transformer.wte.weight"])
        print("model.safetensors loads into the nanoGPT-style module (missing only the tied lm_head.weight)")

        half = os.path.join(tmp, "half")
        run(binary, job_path, "--output-dir", half, "--set", f"train.max_steps={STEPS // 2}")
        r = run(binary, job_path, "--output-dir", half)
        assert "resumed from" in r.stdout + r.stderr, r.stdout + r.stderr
        with open(os.path.join(full, "model.safetensors"), "rb") as a, open(os.path.join(half, "model.safetensors"), "rb") as b:
            assert a.read() == b.read(), "the resumed run's weights differ from the uninterrupted run's"
        print(f"stopped at step {STEPS // 2} and resumed: weights bitwise equal to the uninterrupted run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
