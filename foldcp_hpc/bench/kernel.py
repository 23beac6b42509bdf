"""``python -m foldcp_hpc.bench.kernel --n 1024,2048,4096``: the flash triangle-attention kernel, one GPU.

Times one whole triangle attention's core (all N rows, H=4 heads of width 32, bfloat16, a [H, N, N] triangle
bias and a key mask) through :func:`~foldcp_hpc.kernels.triangle_attention.flash_triangle_attention` and
through PyTorch's ``scaled_dot_product_attention`` with the broadcast bias (rows in chunks of up to 128, the broadcast bias within 2 GiB), and prints
N, seconds, TFLOP/s (4 N^3 H D) and each one's largest error against float32 PyTorch on a few rows.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from ..kernels.triangle_attention import _triton, flash_triangle_attention


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1000 / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m foldcp_hpc.bench.kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1024,2048,4096")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sdpa", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    heads, width = args.heads, args.width
    print(f"{torch.cuda.get_device_name(device)}; H={heads} D={width}, bfloat16, float32 accumulation")
    print(f"{'N':>6} {'impl':>8} {'seconds':>9} {'TFLOP/s':>8} {'max err':>9}")
    for n in (int(v) for v in args.n.split(",")):
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(n, n, heads, width, device=device, generator=gen, dtype=torch.bfloat16)
                   for _ in range(3))
        bias = torch.randn(1, heads, n, n, device=device, generator=gen, dtype=torch.bfloat16)
        mask_bias = torch.zeros(n, n, device=device)
        mask_bias[:, n - n // 10:] = -1e9  # the last tenth of the tokens masked
        scale = 1 / math.sqrt(width)
        flop = 4.0 * n ** 3 * heads * width
        rows = torch.arange(0, n, max(1, n // 4), device=device)
        ref_logits = torch.einsum("rjhd,rkhd->rhjk", q[rows].float(), k[rows].float()) * scale + bias.float() \
            + mask_bias[rows, None, None, :]
        ref = torch.einsum("rhjk,rkhd->rjhd", ref_logits.softmax(-1), v[rows].float())
        del ref_logits

        out = {}

        def flash():
            out["flash"] = flash_triangle_attention(q, k, v, bias, mask_bias, scale, n)[0]

        seconds = _time(flash, args.repeats)
        err = (out.pop("flash")[rows].float() - ref).abs().max().item()
        config = getattr(_triton(), "best_config", "")
        print(f"{n:>6} {'flash':>8} {seconds:>9.4f} {flop / seconds / 1e12:>8.1f} {err:>9.2e}  {config}", flush=True)
        if args.no_sdpa:
            continue
        chunk = max(1, min(128, 2 ** 31 // (heads * n * n * 2)))  # the broadcast bias within 2 GiB
        result = torch.empty(n, heads, n, width, device=device, dtype=torch.bfloat16)

        def sdpa():
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                attn_mask = (bias[0] + mask_bias[sl, None, None, :]).to(torch.bfloat16)  # [c,H,J,K]
                result[sl] = F.scaled_dot_product_attention(
                    q[sl].transpose(1, 2), k[sl].transpose(1, 2), v[sl].transpose(1, 2), attn_mask=attn_mask)

        seconds = _time(sdpa, args.repeats)
        err = (result[rows].transpose(1, 2).float() - ref).abs().max().item()
        print(f"{n:>6} {'sdpa':>8} {seconds:>9.4f} {flop / seconds / 1e12:>8.1f} {err:>9.2e}", flush=True)
        del q, k, v, result
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
