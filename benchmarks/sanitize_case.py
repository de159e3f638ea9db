"""A small CUDA case for compute-sanitizer: every kernel (forward and backward, float32 and float64)."""

import torch

from rln_fast import ops

for dtype in (torch.float32, torch.float64):
    for chans, cout in (((1,), 4), ((4, 4), 4), ((8, 1, 1), 8), ((16,), 8), ((3,), 10)):
        xs = [torch.randn(2, c, 5, 9, 37, device="cuda", dtype=dtype, requires_grad=True) for c in chans]
        w = torch.randn(cout, sum(chans), 3, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(cout, device="cuda", dtype=dtype, requires_grad=True)
        s = torch.randn(2, 1, 5, 9, 37, device="cuda", dtype=dtype, requires_grad=True)
        y = ops.conv3d(xs, w, b, "softplus", s)
        x1 = torch.rand(2, 1, 5, 9, 37, device="cuda", dtype=dtype, requires_grad=True)
        r = ops.rl_divide(x1, y, 1e-4, 1.5, 0.1)
        z = ops.rl_multiply(r, y, 1.0)
        z.sum().backward()
torch.cuda.synchronize()
print("sanitize case ran")
