"""Float64 emulation of grad_input_rows16_kernel's shared-memory layout (no GPU).

The kernel (csrc/kernels/cuda/grad_input_rows16.cu) computes grad_input of a stride-1
convolution per group of R = 4 input rows and 64-pixel column tile as
dX^T(64 pixels x (R rows x 8 input channels)) = sum over the group's R + kh - 1 rows j of the
output gradient g, tap columns q and output-channel chunk pairs of G_j(64 x 16) * B_j(16 x 32),
from a ring of 2R + kh - 1 rows of g copied as [chunk p][column][8 channels], with W' staged
per k-step (q, chunk pair) as 2R + kh - 2 blocks [k-half][8 input channels][8 values], block m
holding tap row R + kh - 2 - m (flipped taps) or zeros, so that B_j is the 4 blocks from
m = R + kh - 2 - j. This script walks the kernel's work items, ring slots, copy schedule (the
first group's window, then the next group's R new rows per group) and descriptors exactly as
the kernel does, reads every MMA operand through the PTX ISA's addressing for 16-bit K-major
operands without swizzle (element (row, k) at start + (row / 8) * SBO + (k / 8) * LBO +
(row % 8) * 16 + (k % 8) * 2 bytes), multiplies in float64, and compares dX with autograd's
grad_input of conv2d. Shared memory starts as NaN, so a zero weight block against a row never
copied shows up; it also checks that no MMA reads a ring row that is being refilled or has
not been copied yet. Shapes: the reference problem's rows, two 8-channel blocks, a 4x4 kernel
over two row segments, 1x1 with three channel blocks, a 2x2 kernel, and a partial last group.
Run: python docs/checks/dgrad16_layout.py.
"""

from __future__ import annotations

import torch

PIX, R, CHUNK, SEGMENT, BLOCK = 64, 4, 16, 32, 2 * 8 * 16


def operand(mem: torch.Tensor, start: int, lead: int, stride: int, rows: int) -> torch.Tensor:
    """rows x 16 values of a K-major operand from the byte-addressed 16-bit memory `mem`."""
    out = torch.empty(rows, 16, dtype=torch.float64)
    for row in range(rows):
        for k in range(16):
            byte = start + (row // 8) * stride + (k // 8) * lead + (row % 8) * 16 + (k % 8) * 2
            out[row, k] = mem[byte // 2]
    return out


def check(n, c_in, h, w, c_out, k, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, wt, None, 1, pad)
    g_nchw = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(g_nchw)
    want = x.grad.permute(0, 2, 3, 1)  # NHWC
    g = g_nchw.permute(0, 2, 3, 1).contiguous()  # NHWC, as the kernel reads it
    g_h, g_w = g.shape[1], g.shape[2]

    kh = kw = k
    p_h = p_w = k - 1 - pad
    planes, taps = c_out // 8, kh * kw
    pairs, k_steps, blocks = planes // 2, kw * planes // 2, 2 * R + kh - 2
    window, ring_rows = R + kh - 1, 2 * R + kh - 1
    segments, tiles_w, c_blocks = -(-h // SEGMENT), -(-w // PIX), -(-c_in // 8)
    staged_w = PIX + kw - 1
    plane_bytes = staged_w * CHUNK
    row_bytes = planes * plane_bytes
    w_bytes = k_steps * blocks * BLOCK
    mem = torch.full(((w_bytes + ring_rows * row_bytes) // 2,), float("nan"), dtype=torch.float64)
    got = torch.full((n, h, w, c_in), float("nan"), dtype=torch.float64)

    def copy_row(img, gr, gw0, slot):
        base = w_bytes + slot * row_bytes
        for pl in range(planes):
            for col in range(staged_w):
                gc = gw0 + col
                inside = 0 <= gr < g_h and 0 <= gc < g_w
                for e in range(8):
                    value = g[img, gr, gc, 8 * pl + e].item() if inside else 0.0
                    mem[(base + (pl * staged_w + col) * CHUNK + e * 2) // 2] = value

    for item in range(c_blocks * n * segments * tiles_w):
        rest = item
        tile, rest = rest % tiles_w, rest // tiles_w
        seg, rest = rest % segments, rest // segments
        img, cb = rest % n, rest // n
        ih0 = seg * SEGMENT
        rows = min(SEGMENT, h - ih0)
        groups = -(-rows // R)
        iw0 = tile * PIX
        first, gw0 = ih0 - p_h, iw0 - p_w
        # W' (restaged for every item here; the kernel skips it when cb repeats).
        for i in range(k_steps * blocks * 128):
            e, ci, kc, blk = i & 7, 8 * cb + ((i >> 3) & 7), (i >> 6) & 1, i >> 7
            ks, m = blk // blocks, blk % blocks
            q, p, r = ks // pairs, 2 * (ks % pairs) + kc, R + kh - 2 - m
            live = ci < c_in and 0 <= r < kh
            mem[i] = wt[8 * p + e, ci].flatten()[taps - 1 - (r * kw + q)].item() if live else 0.0
        landed = {}  # ring slot -> relative g row whose copy has landed
        in_flight = [j for j in range(window)]  # one commit group: the first window
        for k in range(groups):
            # cp.async.wait_group 0: everything issued has landed.
            for j in in_flight:
                copy_row(img, first + j, gw0, j % ring_rows)
                landed[j % ring_rows] = j
            in_flight = []
            if k + 1 < groups:
                for jj in range(R):
                    j = R * (k + 1) + kh - 1 + jj
                    landed.pop(j % ring_rows, None)  # being refilled: must not be read below
                    in_flight.append(j)
            acc = torch.zeros(64, 8 * R, dtype=torch.float64)
            for j in range(window):
                slot = (R * k + j) % ring_rows
                assert landed.get(slot) == R * k + j, (item, k, j, slot, landed.get(slot))
                row_addr = w_bytes + slot * row_bytes
                for q in range(kw):
                    for pp in range(pairs):
                        ks = q * pairs + pp
                        a = operand(mem, row_addr + 2 * pp * plane_bytes + q * CHUNK,
                                    plane_bytes, 128, 64)  # fmt: skip
                        b = operand(mem, (ks * blocks + R + kh - 2 - j) * BLOCK, 128, BLOCK, 8 * R)
                        acc += a @ b.T
            for rho in range(R):
                i = R * k + rho
                if i >= rows:
                    break
                for px in range(64):
                    iw = iw0 + px
                    if iw < w:
                        for ci in range(8):
                            if 8 * cb + ci < c_in:
                                got[img, ih0 + i, iw, 8 * cb + ci] = acc[px, 8 * rho + ci]
        # cp.async.wait_group 0 at the item's end: nothing carries over.
    err = ((got - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all(), "a grad_input element was never written"
    assert err < 1e-12, err
    return err


if __name__ == "__main__":
    shapes = [
        (1, 8, 5, 130, 64, 3, 0),  # the reference problem's rows (pad 0), a 2-pixel tile
        (1, 16, 4, 70, 32, 3, 1),  # two 8-channel blocks, padding 1
        (1, 8, 36, 66, 16, 4, 2),  # 4x4, two row segments (the second 4 rows)
        (1, 24, 3, 67, 16, 1, 0),  # 1x1, three channel blocks
        (2, 8, 3, 64, 16, 2, 1),  # a 2x2 kernel, g padded by 0, two images
        (1, 8, 6, 64, 32, 3, 1),  # a partial last group (rows 4, 5)
    ]
    for shape in shapes:
        print(shape, f"relative error {check(*shape):.1e}")
    print("ok")
