#!/usr/bin/env python3
"""ctest ptx_contraction (label unit, CUDA builds): a kernel that stores a product and also sums it must add the
stored, rounded value, or the device's bits differ from the kernels (and the CPU) that add the stored value.

nvcc compiles with --fmad=true by default, and PTX's plain `mul.f32` / `add.f32` (no rounding modifier) may be
contracted by ptxas into one fused multiply-add: `d = dy * g; dx[i] = d; acc += d;` may then sum the unrounded
products, so the fused bias + activation backward's bias gradient (lib/gpu/reduce_index.h
biasActivationBackwardChunk) would no longer equal the unfused pair's bit for bit, which test_gpu_nn's "fused bias
+ activation: a GPU model equals its layers run unfused bit for bit" asserts. The rule checked here, on the PTX of
the given .cu files: no contractable `add.f32`/`sub.f32` takes a register that a contractable `mul.f32` wrote and
a store wrote to memory (such sums use __fadd_rn: `add.rn.f32`, never contracted). No GPU is needed. ctest runs
it on kernels_reduce.cu, whose results the tests compare bit for bit with other kernels (the unfused pair) and with
their CPU emulation; elsewhere such a sum is only a rounding-level difference (the causal softmax's normaliser sums
its exp values unrounded: compared within a tolerance, and backward repeats the same kernel).

Usage: ptx_contraction_test.py NVCC SOURCE_DIR GENERATED_DIR FILE.cu...   (FILE relative to SOURCE_DIR)
Exit 0 when every kernel keeps the rule, 1 naming each violation, 77 without nvcc."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

INSTR = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)\s+(.*?);")
REG = re.compile(r"%f\d+")


def violations(ptx):
    """(kernel, add instruction) pairs breaking the rule, kernel by kernel."""
    out = []
    for body in re.split(r"\n(?:\.visible\s+)?\.entry\s+", ptx)[1:]:
        name = body.split("(", 1)[0]
        products, stored, adds = set(), set(), []
        for line in body.splitlines():
            m = INSTR.match(line)
            if not m:
                continue
            op, args = m.group(1), m.group(2)
            regs = REG.findall(args)
            if op == "mul.f32" and regs:
                products.add(regs[0])
            elif op.startswith("st.") and op.endswith(".f32") and regs:
                stored.update(regs)
            elif op in ("add.f32", "sub.f32") and len(regs) == 3:
                adds.append((regs[1:], line.strip()))
        for operands, text in adds:
            if any(r in products and r in stored for r in operands):
                out.append((name, text))
    return out


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    nvcc, src, generated, files = argv[0], argv[1], argv[2], argv[3:]
    if not (os.path.isfile(nvcc) or shutil.which(nvcc)):
        print(f"skipped: no nvcc at {nvcc}")
        return 77
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            ptx = os.path.join(tmp, os.path.basename(f) + ".ptx")
            subprocess.run([nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90", "-ptx", "-I", src, "-I", generated,
                            "-x", "cu", os.path.join(src, f), "-o", ptx], check=True)
            found = violations(open(ptx).read())
            bad += [(f, k, t) for k, t in found]
            print(f"{f}: {'ok' if not found else f'{len(found)} contractable sum(s) of stored products'}")
    for f, kernel, text in bad:
        print(f"FAILED: {f}: {kernel}: `{text}` adds a stored product with a contractable add (use __fadd_rn)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
