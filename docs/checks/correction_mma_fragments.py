"""Float64 emulation of grad_input_correction_kernel's tensor-core addressing (one tile).

The kernel (csrc/kernels/cuda/grad_input_correction.cu) computes the collapsed 5x5 convolution
R[ci][r][c] = sum_{ci', dr, dq} K[ci'][dr*5 + dq][ci] * x~[ci'][r + dr][c + 2 + dq] (halo
coordinates: the halo starts 2 rows above and 4 columns left of the tile) as m16n8k8 MMAs: a
k-step per offset d, K = the 8 input channels, N = the 8 output channels. This script gathers
every lane's A and B registers from the kernel's shared-memory addresses (the halo planes kPlane
words apart, the K fragments in lane order), multiplies the fragments as the PTX ISA defines
them, scatters D by the kernel's epilogue ownership, and compares with the direct sum; it also
asserts that each A read hits 32 distinct banks. Run: python
docs/checks/correction_mma_fragments.py (CPU, a few seconds).
"""

from __future__ import annotations

import torch

CX, OFFSETS, WARPS, M_TILES = 8, 25, 8, 4
ROWS, COLS = WARPS, 16 * M_TILES
HALO_LEFT = 4  # staged columns left of the tile (16-byte aligned copies); the 5x5 window needs 2
HALO_ROWS, HALO_COLS = ROWS + 4, COLS + 2 * HALO_LEFT
PLANE = HALO_ROWS * HALO_COLS + (24 - HALO_ROWS * HALO_COLS % 32 + 32) % 32


def main() -> None:
    assert PLANE % 32 == 24
    torch.manual_seed(0)
    c_in = 5  # planes and K rows past C_in are zero, as in the kernel
    xt = torch.randn(CX, HALO_ROWS, HALO_COLS, dtype=torch.float64)
    xt[c_in:] = 0
    k5 = torch.randn(CX, OFFSETS, CX, dtype=torch.float64)  # [ci'][d][ci]
    k5[c_in:] = 0
    xs = torch.zeros(CX * PLANE, dtype=torch.float64)
    for ci in range(CX):
        xs[ci * PLANE : ci * PLANE + HALO_ROWS * HALO_COLS] = xt[ci].reshape(-1)
    # kb[d*32 + lane] = (b0, b1) = (K[t][d][g], K[t + 4][d][g]), g = lane / 4, t = lane % 4
    kb = [(k5[i % 4, i // 32, (i % 32) // 4], k5[i % 4 + 4, i // 32, (i % 32) // 4])
          for i in range(OFFSETS * 32)]  # fmt: skip
    got = torch.zeros(CX, ROWS, COLS, dtype=torch.float64)
    for warp in range(WARPS):
        for d in range(OFFSETS):
            dr, dq = divmod(d, 5)
            for m in range(M_TILES):
                a = torch.zeros(16, 8, dtype=torch.float64)
                b = torch.zeros(8, 8, dtype=torch.float64)
                banks = set()
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    p = t * PLANE + (warp + dr) * HALO_COLS + (HALO_LEFT - 2) + g + 16 * m + dq
                    a[g, t], a[g + 8, t] = xs[p], xs[p + 8]
                    a[g, t + 4], a[g + 8, t + 4] = xs[p + 4 * PLANE], xs[p + 4 * PLANE + 8]
                    banks.add(p % 32)
                    b[t, g], b[t + 4, g] = kb[d * 32 + lane]
                assert len(banks) == 32, sorted(banks)
                dmat = a @ b
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for half in range(2):
                        for j in range(2):
                            px, ci = 16 * m + g + 8 * half, 2 * t + j
                            got[ci, warp, px] += dmat[g + 8 * half, 2 * t + j]
    want = torch.zeros_like(got)
    for d in range(OFFSETS):
        dr, dq = divmod(d, 5)
        q0 = HALO_LEFT - 2 + dq  # the window column of the tile's first pixel
        window = xt[:, dr : dr + ROWS, q0 : q0 + COLS]
        want += torch.einsum("jrc,ji->irc", window, k5[:, d])
    err = ((got - want).abs().max() / want.abs().max()).item()
    print("relative error", err)
    assert err < 1e-12


if __name__ == "__main__":
    main()
