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

# The inference-only fused RL convs (both tile shapes) and the fused RLN end to end.
with torch.no_grad():
    for cout in (4, 8):
        xs = [torch.randn(1, 4, 11, 9, 37, device="cuda"), torch.randn(1, 2, 11, 9, 37, device="cuda")]
        w = torch.randn(cout, 6, 3, 3, 3, device="cuda")
        b = torch.randn(cout, device="cuda")
        x1 = torch.rand(1, 1, 11, 9, 37, device="cuda") + 0.1
        ops.conv3d_rl_divide(xs, w, b, "softplus", x1, x1, 1e-4, 1.2, 0.1)
        ops.conv3d_rl_multiply(xs, w, b, "softplus", x1, 1.0)
        ops.conv3d_rl_multiply(xs, w, b, "softplus", None, 0.0)
    from rln_fast.models.rln import RLN

    RLN().eval().cuda().fuse()(torch.rand(1, 1, 13, 22, 35, device="cuda"))
torch.cuda.synchronize()
print("sanitize case (fused) ran")
