#!/usr/bin/env python3
"""scripts/gpu_bench.py's arithmetic without a GPU or PyTorch (ctest gpu_bench; a stub `torch` stands in for the
import): the step time read from dtrain's metrics.jsonl and the MFU flop count.

Usage: gpu_bench_test.py SOURCE_DIR. Exit 0 when every check holds, 1 (with the failed check) otherwise."""
import importlib.util
import os
import sys
import tempfile
import types


def stub_torch():
    """Just enough of torch for gpu_bench.py to import: nn.Module to subclass, nn.functional."""
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    nn.Module = object
    functional = types.ModuleType("torch.nn.functional")
    nn.functional = functional
    torch.nn = nn
    sys.modules.update({"torch": torch, "torch.nn": nn, "torch.nn.functional": functional})


def main(src):
    stub_torch()
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(src, "scripts", "gpu_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    # dtrain train's metrics.jsonl with log_every 1 and max_steps 13: progress rows (time_s: training time at the
    # step), an evaluation row and the final row repeating the last step with the run's wall time, model export
    # included.
    rows = [{"step": s, "time_s": 0.5 + 0.25 * s, "loss": 1.0} for s in range(1, 14)]
    rows.insert(5, {"step": 5, "time_s": 99.0, "eval_loss": 1.0})
    rows.append({"step": 13, "final": True, "time_s": 40.0, "train_time_s": 3.75, "peak_gpu_mb": 1.0})
    got = bench.step_seconds(rows, 3, 10)
    assert abs(got - 0.25) < 1e-12, f"step time {got} s, expected 0.25 s (the final/eval rows must not count)"

    # MFU's N is nanoGPT's get_num_params(): the position table left out (123.65M for GPT-2 small).
    L, H, C, T, V = bench.L, bench.H, bench.C, bench.T, bench.V
    params = 12 * (12 * C * C + 13 * C) + V * C + T * C + 2 * C
    assert params == 124439808
    assert bench.flops_per_token(params) == 6 * 123653376 + 12 * L * H * (C // H) * T
    print("gpu_bench arithmetic: ok")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
