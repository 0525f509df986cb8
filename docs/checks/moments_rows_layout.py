"""Float64 emulation of grad_moments_rows_kernel's data layout and record (no GPU).

The kernel (csrc/kernels/cuda/grad_moments_rows.cu) stages each tile's input rows three times
(column shifts q = 0, 1, 2) as X~[row][q][pixel group j][ci][4] and feeds wgmma K-major
descriptors over it (core matrices of 8 rows x 16 bytes: taps xt_row words apart, the two
4-pixel halves of a k-step 128 bytes apart). This script builds X~ and the staged g exactly as
the kernel's staging and conversion do, reads every MMA operand through the descriptor
addressing of the PTX ISA (element (row, k) at start + (row / 8) * SBO + (k / 4) * LBO +
(row % 8) * 16 + (k % 4) * 4 bytes), multiplies in float64, scatters the accumulators into the
record by the kernel's fragment ownership and write rules, and compares the record with Gw, G,
sum X and sum g computed from their definitions. Shapes: the reference problem's width (one row
per tile), narrow images (many rows per tile, a partial last tile), padding 1 and 2, C_in < 8,
C_out < 64. Run: python docs/checks/moments_rows_layout.py (CPU, seconds).
"""

from __future__ import annotations

import torch

CO, CX, TAPS, K = 64, 8, 9, 72
PIX, GS, LEFT, PARTS = 128, 132, 4, 4
REC_GW, REC_G = 0, CO * K
REC_S = REC_G + K * K
REC_SUMG = REC_S + K
RECORD = REC_SUMG + CO


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def direct(x: torch.Tensor, g: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """The record's true values from the definitions (k = ci*9 + tap)."""
    n, c_x, h, w = x.shape
    shift = torch.zeros(CX, dtype=torch.float64)
    shift[:c_x] = x[0, :, h // 2, w // 2]
    xp = torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    xs = torch.zeros(n, CX, xp.shape[2], xp.shape[3], dtype=torch.float64)
    xs[:, :c_x] = xp
    xs -= shift.view(1, CX, 1, 1)  # padding holds -shift
    h_g, w_g = g.shape[2], g.shape[3]
    cols = torch.zeros(n, h_g, w_g, K, dtype=torch.float64)  # patch matrix X~, k = ci*9 + tap
    for ci in range(CX):
        for tap in range(TAPS):
            r, q = divmod(tap, 3)
            cols[..., ci * TAPS + tap] = xs[:, ci, r : r + h_g, q : q + w_g]
    xm = cols.reshape(-1, K)
    gm = torch.zeros(n, CO, h_g, w_g, dtype=torch.float64)
    gm[:, : g.shape[1]] = g
    gm = gm.permute(0, 2, 3, 1).reshape(-1, CO)
    rec = torch.zeros(RECORD, dtype=torch.float64)
    rec[REC_GW:REC_G] = (gm.T @ xm).reshape(-1)
    rec[REC_G:REC_S] = (xm.T @ xm).reshape(-1)
    rec[REC_S:REC_SUMG] = xm.sum(0)
    rec[REC_SUMG:] = gm.sum(0)
    return rec


def desc_read(words: torch.Tensor, start: int, sbo: int, rows: int, kdim: int = 8) -> torch.Tensor:
    """A rows x kdim K-major operand through a descriptor (offsets in words: LBO = 32)."""
    out = torch.zeros(rows, kdim, dtype=torch.float64)
    for m in range(rows):
        for k in range(kdim):
            out[m, k] = words[start + (m // 8) * sbo + (k // 4) * 32 + (m % 8) * 4 + (k % 4)]
    return out


def emulate(x: torch.Tensor, g: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    n, c_x, h, w = x.shape
    c_g, h_g, w_g = g.shape[1], g.shape[2], g.shape[3]
    slots = round_up(w_g, 8)
    rows = PIX // slots
    tiles_h = (h_g + rows - 1) // rows
    raw_row = round_up(max(slots + 6, w + LEFT), 4)
    plane = (rows + 2) * raw_row
    raw_plane = plane + ((4 - plane) % 32 + 32) % 32
    assert raw_plane % 32 == 4
    xt_row = slots * 8
    shift = torch.zeros(CX, dtype=torch.float64)
    shift[:c_x] = x[0, :, h // 2, w // 2]
    # per-thread running sums, by record slot (the kernel's ownership is emulated below)
    run_gw = torch.zeros(CO, K, dtype=torch.float64)  # [c][n = tap*8 + ci]
    run_g = torch.zeros(64, K, dtype=torch.float64)  # rows taps 1..8
    run_g0 = torch.zeros(64, 8, dtype=torch.float64)  # rows taps 0..7 x column tap 0
    run_sx = torch.zeros(K, dtype=torch.float64)  # n = tap*8 + ci
    run_sg = torch.zeros(CO, dtype=torch.float64)
    for tile in range(n * tiles_h):
        img, th = divmod(tile, tiles_h)
        oh0 = th * rows
        # stage: g slots, raw rows (zeros outside)
        gs = torch.zeros(CO, GS, dtype=torch.float64)
        for c in range(c_g):
            for ri in range(rows):
                oh = oh0 + ri
                if oh < h_g:
                    gs[c, ri * slots : ri * slots + w_g] = g[img, c, oh]
        raw = torch.zeros(CX * raw_plane, dtype=torch.float64)
        for ci in range(c_x):
            for rr in range(rows + 2):
                ih = oh0 - pad[0] + rr
                if 0 <= ih < h:
                    base = ci * raw_plane + rr * raw_row + LEFT
                    raw[base : base + w] = x[img, ci, ih]
        # convert
        xt = torch.zeros((rows + 2) * 3 * xt_row, dtype=torch.float64)
        groups = slots // 4
        per_part = (groups + PARTS - 1) // PARTS
        sums = torch.zeros((rows + 2) * 3 * PARTS, CX, dtype=torch.float64)
        for u in range((rows + 2) * 3 * PARTS):
            task, part = divmod(u, PARTS)
            rr, q = divmod(task, 3)
            for lane in range(32):
                ci, e = divmod(lane, 4)
                src = ci * raw_plane + rr * raw_row + LEFT + q - pad[1] + e
                for j in range(part * per_part, min(part * per_part + per_part, groups)):
                    v = raw[src + 4 * j] - shift[ci] if 4 * j + e < w_g else 0.0
                    xt[task * xt_row + ci * 4 + e + 32 * j] = v
                    sums[u, ci] += v
        steps_per_row = slots // 8
        k_steps = min(rows, h_g - oh0) * steps_per_row
        # sum X (warpgroup 1, thread n = tap*8 + ci)
        for nn in range(K):
            tap, ci = divmod(nn, 8)
            r, q = divmod(tap, 3)
            for ri in range(k_steps // steps_per_row):
                for part in range(PARTS):
                    run_sx[nn] += sums[((ri + r) * 3 + q) * PARTS + part, ci]
        for ks in range(k_steps):
            ri, sidx = divmod(ks, steps_per_row)
            xo = ri * 3 * xt_row + 64 * sidx
            col = ri * slots + 8 * sidx
            a_g = gs[:, col : col + 8]  # A = g: rows c, k = the step's pixels
            b = desc_read(xt, xo, xt_row, 72).T  # B[k][n], n = tap*8 + ci
            run_gw += a_g @ b
            run_sg += a_g.sum(1)
            a1 = desc_read(xt, xo + xt_row, xt_row, 64)  # rows taps 1..8
            run_g += a1 @ b
            a0 = desc_read(xt, xo, xt_row, 64)  # rows taps 0..7
            run_g0 += a0 @ b[:, :8]
    # the record, by the kernel's write rules
    rec = torch.full((RECORD,), float("nan"), dtype=torch.float64)
    for c in range(CO):
        for tap in range(TAPS):
            for ci in range(CX):
                rec[REC_GW + c * K + ci * TAPS + tap] = run_gw[c, tap * 8 + ci]
        rec[REC_SUMG + c] = run_sg[c]
    for wq in range(4):
        for fg in range(8):
            for h_ in range(2):
                a = 1 + 2 * wq + h_
                row = 16 * wq + fg + 8 * h_
                for b in range(TAPS):
                    for ci2 in range(CX):
                        v = run_g[row, b * 8 + ci2]
                        if a <= b:
                            slot = REC_G + (fg * TAPS + a) * K + ci2 * TAPS + b
                        elif b == 0:
                            slot = REC_G + (ci2 * TAPS) * K + fg * TAPS + a
                        else:
                            continue
                        assert torch.isnan(rec[slot]), "two writers of one slot"
                        rec[slot] = v
    for fg in range(8):
        for ci2 in range(CX):
            slot = REC_G + (fg * TAPS) * K + ci2 * TAPS
            assert torch.isnan(rec[slot])
            rec[slot] = run_g0[fg, ci2]
    for nn in range(K):
        tap, ci = divmod(nn, 8)
        rec[REC_S + ci * TAPS + tap] = run_sx[nn]
    return rec


def check(shape: tuple[int, int, int, int, int], pad: tuple[int, int], seed: int) -> None:
    n, c_x, h, w, c_g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c_x, h, w, generator=gen, dtype=torch.float64) + 0.5
    h_g, w_g = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    g = torch.randn(n, c_g, h_g, w_g, generator=gen, dtype=torch.float64)
    got, want = emulate(x, g, pad), direct(x, g, pad)
    # the slots the reduction reads: all but G entries below the tap diagonal
    idx = torch.arange(RECORD)
    rel = idx - REC_G
    in_g = (rel >= 0) & (rel < K * K)
    below = in_g & ((rel // K) % TAPS > (rel % K) % TAPS)
    read = ~below
    assert not torch.isnan(got[read]).any(), "a slot the reduction reads was never written"
    err = ((got[read] - want[read]).abs().max() / want[read].abs().max()).item()
    print(f"shape {shape} pad {pad}: relative error {err:.1e}")
    assert err < 1e-12


def main() -> None:
    check((1, 8, 5, 20, 64), (0, 0), 0)  # one row per tile needs w_g <= 128; 18 -> 24 slots
    check((2, 3, 9, 8, 16), (1, 1), 1)  # narrow: 8 slots, 16 rows per tile, partial tile
    check((1, 5, 6, 12, 40), (2, 0), 2)  # padding 2 rows, 10 -> 16 slots
    check((1, 8, 4, 128, 8), (1, 1), 3)  # w_g = 128: one full row per tile


if __name__ == "__main__":
    main()
