"""One self-attention at SD 1.5's largest level on this CPU: ours ('xla', 'blocked') vs torch SDPA.

    python benchmarks/attention_cpu.py [--length 4096] [--heads 8] [--head_dim 40] [--reps 5] [--grad]

float32, batch 1; the three run interleaved (ours, ours, torch, ...) after one warm-up each; medians.
--grad times forward + backward instead (the gradients of sum(out * g) for q, k and v, as in a
training step), and checks our gradients against XLA's.
"""
import argparse
import statistics
import time


import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--grad", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    import jax
    import torch
    from diffrestorer_jax.models.attention import dot_product_attention

    shape = (1, args.length, args.heads, args.head_dim)
    q, k, v = (np.random.default_rng(i).standard_normal(shape, np.float32) for i in range(3))
    qj, kj, vj = (jax.device_put(t) for t in (q, k, v))
    qt, kt, vt = (torch.from_numpy(t).permute(0, 2, 1, 3).contiguous() for t in (q, k, v))
    g = np.random.default_rng(3).standard_normal(shape, np.float32)
    gj, gt = jax.device_put(g), torch.from_numpy(g).permute(0, 2, 1, 3).contiguous()

    def ours_fn(impl):
        attend = lambda a, b, c: dot_product_attention(a, b, c, implementation=impl)  # noqa: E731
        if args.grad:
            return jax.jit(jax.grad(lambda a, b, c: (attend(a, b, c) * gj).sum(), argnums=(0, 1, 2)))
        return jax.jit(attend)
    ours = {impl: ours_fn(impl) for impl in ("xla", "blocked")}
    for a, b in zip(jax.tree.leaves(ours["blocked"](qj, kj, vj)), jax.tree.leaves(ours["xla"](qj, kj, vj))):
        np.testing.assert_allclose(a, b, atol=1e-4 if args.grad else 1e-5)

    def torch_sdpa():
        if args.grad:
            a, b, c = (t.detach().requires_grad_() for t in (qt, kt, vt))
            (torch.nn.functional.scaled_dot_product_attention(a, b, c) * gt).sum().backward()
            return
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    fns = {f"ours {impl}": (lambda f=f: jax.block_until_ready(f(qj, kj, vj))) for impl, f in ours.items()}
    fns["torch sdpa"] = torch_sdpa
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{'forward + backward' if args.grad else 'forward'}, L={args.length} heads={args.heads} "
          f"d={args.head_dim}, float32, median of {args.reps}; "
          f"torch threads {torch.get_num_threads()}, jax {jax.__version__}")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} ms | {ms / med['torch sdpa']:.2f}x torch |")


if __name__ == "__main__":
    main()
