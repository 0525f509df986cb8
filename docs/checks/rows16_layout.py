"""Float64 emulation of conv_rows16_kernel's shared-memory layout and epilogue (no GPU).

The kernel (csrc/kernels/cuda/conv_rows16.cu) copies NHWC input rows as [chunk p][row][column]
[8 channels] into a ring slot, stages W as [k-step][k-half][channel][8], pairs K-chunks
(p, r, q) two per k16-step (the second's core matrices at a per-step leading byte offset, an
odd last chunk against a zero region above the ring), and writes each output row through
stmatrix.trans into a [pixel][64 channels] stage (144-byte rows). This script lays out the
bytes exactly as the kernel's copy, weight staging and k-step tables do, reads every MMA
operand through the descriptor addressing of the PTX ISA for 16-bit K-major operands without
swizzle (element (row, k) at start + (row / 8) * SBO + (k / 8) * LBO + (row % 8) * 16 +
(k % 8) * 2 bytes), multiplies in float64, runs the epilogue's fragment -> stmatrix.trans ->
16-byte piece mapping (and the backward's ldmatrix.trans read of the same stage back into
fragments), and compares the output rows with a direct convolution. Where K <= 9 chunks it
also runs kGradOutW's weight gradient (g_hat masked to valid pixels in a stage of MN-major
core matrices; warpgroup MMAs with both operands MN-major, B the staged input itself; the
partials' layout and reduce_weight_grad_kernel's read) and compares it with conv2d_weight.
Shapes: the reference problem's, C_in 16 and 24 (an odd chunk count), padding, dilation, 1x1 and 2x2
kernels, C_out < 64 and a second channel block. Run: python docs/checks/rows16_layout.py.
"""

from __future__ import annotations

import torch

CO, PIX, CHUNK, SLOTS, STAGE_ROW, ZERO = 64, 128, 16, 3, 144, 16 * 128
CM_PIXEL_GROUP = 8 * 128  # kGradOutW's stage: bytes per 8-pixel group of core matrices
MAX_W_CHUNKS = 9  # kGradOutW's weight gradient: K <= 9 chunks of 8 channels


def check(n, c_in, h, w, c_out, kh, kw, pad, dil, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c_in, generator=g, dtype=torch.float64)  # NHWC
    wt = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64)
    h_out = h + 2 * pad - dil * (kh - 1)
    w_out = w + 2 * pad - dil * (kw - 1)
    ref = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), wt, None, 1, pad, dil)
    planes, taps = c_in // 8, kh * kw
    chunks = taps * planes
    k_steps = (chunks + 1) // 2
    staged_rows, staged_w = rows + (kh - 1) * dil, PIX + (kw - 1) * dil
    slot_bytes = planes * staged_rows * staged_w * CHUNK
    w_bytes = k_steps * 2 * CO * CHUNK
    ring0 = w_bytes
    zero0 = ring0 + SLOTS * slot_bytes

    def chunk_off(u):
        p, tap = divmod(u, taps)
        r, q = divmod(tap, kw)
        return ((p * staged_rows + r * dil) * staged_w + q * dil) * CHUNK

    step_off = [chunk_off(2 * ks) for ks in range(k_steps)]
    step_lead = [
        chunk_off(2 * ks + 1) - chunk_off(2 * ks) if 2 * ks + 1 < chunks else -1
        for ks in range(k_steps)
    ]
    assert all(lead == -1 or lead > 0 for lead in step_lead), "second chunk below the first"
    out = torch.full((n, h_out, w_out, c_out), float("nan"), dtype=torch.float64)
    tiles_w, strips_h = -(-w_out // PIX), -(-h_out // rows)
    c_blocks = -(-c_out // CO)
    fused_dw = chunks <= MAX_W_CHUNKS
    w_off = [chunk_off(min(u, chunks - 1)) for u in range(MAX_W_CHUNKS + 1)]
    # kGradOutW's partials [c_blocks][1 block][64][taps * c_in], with the conv output y
    # standing in for g_hat (the mapping is what is checked)
    partials = torch.zeros(c_blocks, CO, taps * c_in, dtype=torch.float64)
    for cb in range(c_blocks):
        dw = {}  # chunk u -> its [64 channels][8 input channels] accumulator columns
        mem = torch.zeros((zero0 + ZERO) // 2, dtype=torch.float64)  # 2-byte units
        for i in range(k_steps * 2 * CO * 8):  # the kernel's weight staging loop
            u, co, e = i // (CO * 8), (i >> 3) & (CO - 1), i & 7
            p, tap = divmod(u, taps)
            c = cb * CO + co
            if u < chunks and c < c_out:
                mem[i] = wt[c, 8 * p + e, tap // kw, tap % kw]
        for strip in range(n * strips_h * tiles_w):
            row_tile, tw = divmod(strip, tiles_w)
            ni, sh = divmod(row_tile, strips_h)
            ow0, oh0 = tw * PIX, sh * rows
            slot = strip % SLOTS
            base = ring0 + slot * slot_bytes
            for sr in range(staged_rows):  # the copy: 16-byte pieces, zeros outside
                for px in range(staged_w):
                    for pl in range(planes):
                        ih, iw = oh0 - pad + sr, ow0 - pad + px
                        b = (base + ((pl * staged_rows + sr) * staged_w + px) * CHUNK) // 2
                        inside = 0 <= ih < h and 0 <= iw < w
                        mem[b : b + 8] = x[ni, ih, iw, 8 * pl : 8 * pl + 8] if inside else 0.0
            for r in range(min(rows, h_out - oh0)):
                d = torch.zeros(CO, PIX, dtype=torch.float64)
                for ks in range(k_steps):
                    b0 = base + step_off[ks] + r * staged_w * CHUNK
                    lead_b = step_lead[ks] if step_lead[ks] >= 0 else zero0 - b0
                    a = operand(mem, ks * 2 * CO * CHUNK, CO * CHUNK, 128, CO)
                    bt = operand(mem, b0, lead_b, 128, PIX)
                    d += a @ bt.T
                lim = min(w_out - ow0, PIX)
                if fused_dw:
                    row_base = base + r * staged_w * CHUNK
                    weight_grad_row(
                        mem, row_base, w_off, chunks, d, w_out - ow0, dw, kw, dil, zero0
                    )
                piece_out = epilogue(d)  # [pixel][64 channels] as the stage holds it
                groups = min(8, (c_out - cb * CO) // 8)
                for q in range(lim * 8):  # the block's 16-byte pieces
                    px, cg = divmod(q, 8)
                    if cg < groups:
                        c0 = cb * CO + 8 * cg
                        out[ni, oh0 + r, ow0 + px, c0 : c0 + 8] = piece_out[px, 8 * cg : 8 * cg + 8]
        for u, acc in dw.items():  # the kernel's partial write (chunk u's 8 columns)
            if u < chunks:
                p, tap = divmod(u, taps)
                partials[cb, :, tap * c_in + 8 * p : tap * c_in + 8 * p + 8] = acc
    ref_nhwc = ref.permute(0, 2, 3, 1)
    assert not torch.isnan(out).any(), "an output element was never written"
    err = ((out - ref_nhwc).norm() / ref_nhwc.norm()).item()
    assert err < 1e-12, err
    if fused_dw:
        # reduce_weight_grad_kernel's read: grad_weight[co][ci][tap] = partials[..][tap*c_in+ci]
        got = torch.empty(c_out, c_in, taps, dtype=torch.float64)
        for co in range(c_out):
            cb, cl = divmod(co, CO)
            got[co] = partials[cb, cl].view(taps, c_in).T
        want = torch.nn.grad.conv2d_weight(
            x.permute(0, 3, 1, 2), wt.shape, ref, stride=1, padding=pad, dilation=dil
        ).reshape(c_out, c_in, taps)
        dw_err = ((got - want).norm() / want.norm()).item()
        assert dw_err < 1e-12, dw_err
    return err


def weight_grad_row(mem, row_base, w_off, chunks, d, lim, dw, kw, dil, zero0):
    """kGradOutW's weight gradient for one output row: g_hat (here d) masked to pixels < lim
    in the core-matrix stage (stage_offset), then per 16-pixel k-step the warpgroup MMAs with
    both operands MN-major: A = the stage's two pixel groups (LBO = 1 KB between pixel groups,
    SBO = 128 bytes between channel groups), B = the staged strip at chunk u's offset (LBO =
    128 bytes between 8-pixel groups, SBO = dil * 16 bytes between tap columns): m64n24k16
    per chunk triple for kw = 3, else m64n8k16 per chunk; chunks past the last read the zero
    region."""
    stage = torch.full(((PIX // 8) * CM_PIXEL_GROUP // 2,), float("nan"), dtype=torch.float64)
    for px in range(PIX):
        for c in range(CO):
            stage[(stage_offset_cm(px, c // 8) + (c % 8) * 2) // 2] = d[c, px] if px < lim else 0.0
    for ks in range(PIX // 16):
        a = mn_major_operand(stage, ks * 2 * CM_PIXEL_GROUP, CM_PIXEL_GROUP, 128, CO)
        step = 3 if kw == 3 else 1
        for u in range(0, MAX_W_CHUNKS, step):
            start = row_base + w_off[u] + ks * 16 * CHUNK if u < chunks else zero0
            b = mn_major_operand(mem, start, 8 * CHUNK, (dil if step == 3 else 1) * CHUNK, 8 * step)
            prod = a @ b.T  # [64 channels][8 * step columns]
            for q in range(step):
                dw[u + q] = dw.get(u + q, 0.0) + prod[:, 8 * q : 8 * q + 8]


def stage_offset_cm(px, cg):
    """conv_rows16.cu's stage_offset for kGradOutW: MN-major core matrices."""
    return (px >> 3) * CM_PIXEL_GROUP + cg * 128 + (px & 7) * 16


def mn_major_operand(mem, start, lead, stride, rows):
    """A (rows x 16) MN-major operand through the descriptor addressing assumed for 16-bit
    operands without swizzle (docs/checks/wgmma_transpose_probe.cu checks it on the device):
    element (mn, k) at start + (k / 8) * LBO + (mn / 8) * SBO + (k % 8) * 16 + (mn % 8) * 2."""
    mn = torch.arange(rows).view(-1, 1)
    k = torch.arange(16).view(1, -1)
    addr = start + (k // 8) * lead + (mn // 8) * stride + (k % 8) * 16 + (mn % 8) * 2
    vals = mem[addr // 2]
    assert not torch.isnan(vals).any(), "an MMA operand read an unwritten byte"
    return vals


def operand(mem, start, lead, stride, rows):
    """A (rows x 16) K-major operand through the descriptor addressing (bytes -> 2-byte units)."""
    r = torch.arange(rows).view(-1, 1)
    k = torch.arange(16).view(1, -1)
    addr = start + (r // 8) * stride + (k // 8) * lead + (r % 8) * 16 + (k % 8) * 2
    return mem[addr // 2]


def epilogue(d):
    """Fragments -> stmatrix.x4.trans -> stage [pixel][channel] (emulated lane by lane)."""
    stage = torch.full((PIX, CO), float("nan"), dtype=torch.float64)
    for warp in range(4):
        for j in range(0, 16, 2):
            # register mm of lane l: M_mm[l // 4][2 (l % 4) + {0, 1}], M_mm[ch][px] =
            # D[16 warp + 8 (mm % 2) + ch][8 (j + mm // 2) + px]
            regs = {}
            for lane in range(32):
                gq, t = divmod(lane, 4)
                for mm in range(4):
                    jm, p = j + (mm >> 1), mm & 1
                    c = 16 * warp + gq + 8 * p
                    regs[lane, mm] = (d[c, 8 * jm + 2 * t], d[c, 8 * jm + 2 * t + 1])
            for mm in range(4):
                # M_mm as the fragment describes it, then row i of its transpose goes to
                # the address lane 8 mm + i supplies
                mat = torch.empty(8, 8, dtype=torch.float64)
                for lane in range(32):
                    gq, t = divmod(lane, 4)
                    mat[gq, 2 * t], mat[gq, 2 * t + 1] = regs[lane, mm]
                for i in range(8):
                    lane = 8 * mm + i
                    m, ii = lane >> 3, lane & 7
                    px, ch = 8 * (j + (m >> 1)) + ii, 16 * warp + 8 * (m & 1)
                    assert (px * STAGE_ROW + ch * 2) % 16 == 0
                    stage[px, ch : ch + 8] = mat[:, i]
    assert not torch.isnan(stage).any()
    # The backward's ldmatrix.x4.trans from the same addresses (g staged as [pixel][channel])
    # must give each lane the values at its accumulators' (channel, pixel) positions: row i of
    # matrix m is the 16 bytes at lane 8m + i's address; lane l receives row 2 (l % 4) and
    # 2 (l % 4) + 1 of it at column l // 4, i.e. (channel l // 4, pixels 2 (l % 4), +1).
    for warp in range(4):
        for j in range(0, 16, 2):
            rows_m = {}
            for lane in range(32):
                m, ii = lane >> 3, lane & 7
                px, ch = 8 * (j + (m >> 1)) + ii, 16 * warp + 8 * (m & 1)
                rows_m[m, ii] = stage[px, ch : ch + 8]
            for lane in range(32):
                gq, t = divmod(lane, 4)
                for mm in range(4):
                    got = (rows_m[mm, 2 * t][gq], rows_m[mm, 2 * t + 1][gq])
                    jm, p = j + (mm >> 1), mm & 1
                    c = 16 * warp + gq + 8 * p
                    assert got == (d[c, 8 * jm + 2 * t], d[c, 8 * jm + 2 * t + 1])
    banks = {(px * STAGE_ROW // 16) % 8 for px in range(8)}
    assert len(banks) == 8, "stmatrix rows of 8 consecutive pixels share banks"
    return stage


if __name__ == "__main__":
    cases = [
        # n, c_in, h, w, c_out, kh, kw, pad, dil
        (1, 8, 7, 130, 64, 3, 3, 0, 1),  # the reference problem's layout (one 128-pixel tile)
        (1, 16, 6, 70, 64, 3, 3, 1, 1),  # two channel chunks, padding, a partial tile
        (1, 24, 5, 66, 32, 3, 3, 1, 1),  # 27 chunks: the zero pairing; C_out < 64
        (1, 8, 5, 140, 72, 1, 1, 0, 1),  # 1x1: one zero-paired chunk; 2 tiles, 2 channel blocks
        (1, 8, 9, 72, 16, 2, 2, 1, 2),  # an even kernel with dilation
        (1, 8, 9, 75, 64, 3, 3, 2, 2),  # 3x3 with dilation: the fused weight gradient's SBO
    ]
    for case in cases:
        print(case, f"rel. error {check(*case):.1e}")
    print("ok")
