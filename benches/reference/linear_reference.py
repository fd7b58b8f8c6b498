"""PyTorch's F.linear at the shapes of dsvl's `packed_throughput` test, for the GEMM table in
benches/README.md (issue 18): best of 7 after a warm-up, GFLOP/s, f32 and bf16.

    benches/reference/.venv/bin/python benches/reference/linear_reference.py --threads 2
"""

import argparse
import platform
import time

import torch

SHAPES = [
    (128, 5632, 2048),
    (128, 2048, 5632),
    (1024, 5632, 2048),
    (1024, 2048, 5632),
    (1024, 2048, 2048),
    (576, 4096, 1024),
    (4096, 2304, 768),
]


def best_of(f, reps=7):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    for dtype in (torch.float32, torch.bfloat16):
        for m, n, k in SHAPES:
            x = torch.randn(m, k, dtype=dtype)
            w = torch.randn(n, k, dtype=dtype)
            s = best_of(lambda: torch.nn.functional.linear(x, w))
            print(f"{m}x{n}x{k} {dtype}: {2 * m * n * k / s / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
