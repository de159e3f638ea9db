"""A small CUDA case for compute-sanitizer: every kernel (forward and backward, float32 and float64),
the fused RL convs, the fused RLN, and the classic RL kernels on every path."""

import torch

from rln_fast import ops
from rln_fast.psf import gaussian
from rln_fast.rl import richardson_lucy

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

# Classic RL (rl_ratio, rl_update with its block dot products and stored weights, rl_predict,
# psf_conv_ratio/update): the FFT and direct paths, each edge mode, TV, background, Biggs and
# SHB acceleration, float32 and float64.

psf = gaussian((5, 7, 7), sigma=(1.5, 1.0, 1.0))
for dtype in (torch.float32, torch.float64):
    img = torch.rand(9, 13, 37, device="cuda", dtype=dtype) + 0.2
    for method, edges in (("fft", "periodic"), ("fft", "bertero"), ("fft", "reflect"),
                          ("direct", "bertero"), ("direct", "reflect")):
        for tv, bg, acc in ((0.0, 0.0, None), (0.01, 0.05, "biggs"), (0.0, 0.05, "shb")):
            richardson_lucy(img, psf, 3, method=method, edges=edges, tv=tv, background=bg,
                            acceleration=acc, progress=False)
# The classic RL ops themselves in float64 too (richardson_lucy computes in float32), with
# Bertero weights, TV and the Biggs dot products.
for dtype in (torch.float32, torch.float64):
    kw = dict(device="cuda", dtype=dtype)
    image = torch.rand(2, 1, 7, 9, 33, **kw) + 0.1
    work = torch.rand(2, 1, 11, 15, 39, **kw) + 0.1
    k = torch.from_numpy(psf).to(**kw)
    weights = ops.edge_weights(psf, (11, 15, 39), (7, 9, 33), circular=True, device="cuda")
    ratio = ops.rl_ratio(image, work, 0.05)
    ops.rl_update(work, ratio, weights, tv=0.01)
    ops.rl_update(work, ratio, None, tv=0.01, tv_periodic=False)
    prev, change = torch.zeros_like(work), torch.zeros_like(work)
    ops.rl_update_(ratio.clone(), work, weights, 0.01, previous=prev, change=change)
    stored = ops.store_edge_weights(weights, work)  # w read per voxel instead of evaluated
    ops.rl_update_(ratio.clone(), work, stored, 0.01, previous=prev, change=change)
    ops.rl_predict_(work - ratio, work, 0.6)
    est = torch.rand(2, 1, 11, 15, 39, **kw) + 0.1
    r = ops.psf_conv_ratio(image, est, k, 0.05)
    wd = ops.edge_weights(psf, (11, 15, 39), (7, 9, 33), (2, 3, 3), circular=False, device="cuda")
    ops.psf_conv_update(est, r, k, wd, tv=0.01)
torch.cuda.synchronize()
print("sanitize case (classic RL) ran")

# Past the shared-memory limit the conv runs in channel chunks (300 float32 input channels at
# 8 outputs; the input gradient swaps them): forward and backward.
xs = [torch.randn(1, 300, 3, 5, 33, device="cuda", requires_grad=True)]
w = torch.randn(8, 300, 3, 3, 3, device="cuda", requires_grad=True)
ops.conv3d(xs, w, None, "softplus").sum().backward()
torch.cuda.synchronize()
print("sanitize case (channel chunks) ran")
