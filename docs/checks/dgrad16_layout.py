"""Float64 emulation of grad_input_rows16_kernel's shared-memory layout (no GPU).

The kernel (csrc/kernels/cuda/grad_input_rows16.cu) computes grad_input of a stride-1
convolution as dX^T(128 pixels x 8 input channels) = G(128 x K) * W'(K x 8) per input row,
K = (tap (r, q), output-channel chunk p), from a ring of kh + 2 rows of the output gradient g
copied as [chunk p][column][8 channels], and W' staged as [k-step][k-half][8 input channels]
[8 values] with the taps flipped. This script walks the kernel's work items, ring slots, copy
schedule (prologue and one row per input row, skipped past the segment's last row) and
descriptors exactly as the kernel does, reads every MMA operand through the PTX ISA's
addressing for 16-bit K-major operands without swizzle (element (row, k) at start +
(row / 8) * SBO + (k / 8) * LBO + (row % 8) * 16 + (k % 8) * 2 bytes), multiplies in
float64, and compares dX with autograd's grad_input of conv2d. It also checks that no MMA
reads a ring row that is being refilled or has not been copied yet. Shapes: the reference
problem's rows, two 8-channel blocks, a 4x4 kernel over two row segments, 1x1 with three
channel blocks, a 2x2 kernel, and two column tiles. Run: python docs/checks/dgrad16_layout.py.
"""

from __future__ import annotations

import torch

PIX, CHUNK, SEGMENT, W_STEP = 128, 16, 32, 2 * 8 * 16


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
    pairs, k_steps = planes // 2, taps * planes // 2
    segments, tiles_w, c_blocks = -(-h // SEGMENT), -(-w // PIX), -(-c_in // 8)
    staged_w = PIX + kw - 1
    plane_bytes = staged_w * CHUNK
    row_bytes = planes * plane_bytes
    ring_rows = kh + 2
    w_bytes = k_steps * W_STEP
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
        iw0 = tile * PIX
        first, gw0, last = ih0 - p_h, iw0 - p_w, rows + kh - 2
        # W' (restaged for every item here; the kernel skips it when cb repeats).
        for i in range(k_steps * 128):
            u, ci, e = i >> 6, 8 * cb + ((i >> 3) & 7), i & 7
            tap, p = u // planes, u % planes
            value = wt[8 * p + e, ci].flatten()[taps - 1 - tap].item() if ci < c_in else 0.0
            mem[i] = value  # 16-bit element i of the W' region
        landed = {}  # ring slot -> ring row (relative to first) whose copy has landed
        in_flight = []  # copies issued, oldest first (one commit group each)
        for j in range(kh + 1):
            in_flight.append((j, j % ring_rows) if j <= last else None)
        for i in range(rows):
            # cp.async.wait_group 1: all but the newest group have landed.
            for entry in in_flight[:-1]:
                if entry is not None:
                    copy_row(img, first + entry[0], gw0, entry[1])
                    landed[entry[1]] = entry[0]
            in_flight = in_flight[-1:]
            ahead = i + kh + 1
            if ahead <= last:
                slot = ahead % ring_rows
                landed.pop(slot, None)  # being refilled: must not be read below
                in_flight.append((ahead, slot))
            else:
                in_flight.append(None)
            acc = torch.zeros(2, 64, 8, dtype=torch.float64)
            slot0 = i % ring_rows
            for half in range(2):
                ks = 0
                for r in range(kh):
                    slot = slot0 + r if slot0 + r < ring_rows else slot0 + r - ring_rows
                    assert landed.get(slot) == i + r, (item, i, r, slot, landed.get(slot))
                    row_addr = w_bytes + slot * row_bytes + half * 64 * CHUNK
                    for q in range(kw):
                        for pp in range(pairs):
                            a_addr = row_addr + 2 * pp * plane_bytes + q * CHUNK
                            a = operand(mem, a_addr, plane_bytes, 128, 64)
                            b = operand(mem, ks * W_STEP, 128, 256, 8)
                            acc[half] += a @ b.T
                            ks += 1
            for half in range(2):
                for px in range(64):
                    iw = iw0 + half * 64 + px
                    if iw < w:
                        for ci in range(8):
                            if 8 * cb + ci < c_in:
                                got[img, ih0 + i, iw, 8 * cb + ci] = acc[half, px, ci]
        # cp.async.wait_group 0 at the item's end: nothing carries over.
    err = ((got - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all(), "a grad_input element was never written"
    assert err < 1e-12, err
    return err


if __name__ == "__main__":
    shapes = [
        (1, 8, 3, 130, 64, 3, 0),  # the reference problem's rows (pad 0), a 2-pixel tile
        (1, 16, 4, 70, 32, 3, 1),  # two 8-channel blocks, padding 1
        (1, 8, 36, 66, 16, 4, 2),  # 4x4, two row segments (the second 4 rows)
        (1, 24, 3, 67, 16, 1, 0),  # 1x1, three channel blocks
        (2, 8, 3, 64, 16, 2, 1),  # a 2x2 kernel, g padded by 0, two images
    ]
    for shape in shapes:
        print(shape, f"relative error {check(*shape):.1e}")
    print("ok")
