"""Float64 emulation of the grad_input correction (csrc/kernels/cuda/grad_input_correction.cu).

The tap kernel on g with weights A*W plus the correction R computed from x, with the kernels'
index conventions (V[(ci, t)][(ci', t')], the collapsed 5x5 K [ci'][d][ci] over all taps, the
invalid border taps' V terms and e [ci][t] backed out, the shifted x~ with -shift outside the
image), must equal conv_transpose(g_hat; W) for
g_hat = A*g + C*(y - ctr) + D. Run: python docs/checks/grad_input_correction_emulation.py
(CPU, about a minute); prints the relative error per padding (float64 rounding, ~1e-15).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 72  # 8 input channels x 9 taps, k = ci*9 + t


def correction_terms(w, x, coef_y, coef_1, center, c_in):
    """V, e and the shifts as correction_terms_kernel forms them."""
    h, wd = x.shape[2], x.shape[3]
    shift = torch.zeros(8, dtype=torch.float64)
    shift[:c_in] = x[0, :, h // 2, wd // 2]
    k_cols = c_in * 9
    ctr = center - torch.stack(
        [(w[c] * shift[torch.arange(k_cols) // 9]).sum() for c in range(len(w))]
    )
    v = torch.zeros(K, K, dtype=torch.float64)
    v[:k_cols, :k_cols] = torch.einsum("c,ck,cj->kj", coef_y, w, w)
    e = torch.zeros(K, dtype=torch.float64)
    e[:k_cols] = torch.einsum("ck,c->k", w, coef_1 - coef_y * ctr)
    return v, e, shift


def collapsed(v):
    """K[ci'][d][ci] = sum over t' - t = d of V[(ci, t)][(ci', t')]."""
    k5 = torch.zeros(8, 25, 8, dtype=torch.float64)
    for ci2 in range(8):
        for d in range(25):
            dr, dq = d // 5 - 2, d % 5 - 2
            for t in range(9):
                kr2, kq2 = t // 3 + dr, t % 3 + dq
                if 0 <= kr2 < 3 and 0 <= kq2 < 3:
                    k5[ci2, d] += v[torch.arange(8) * 9 + t, ci2 * 9 + kr2 * 3 + kq2]
    return k5


def correction(x, v, e, shift, pad):
    """R, pixel by pixel: the collapsed K over all taps, e of the valid taps, the V terms of
    the invalid ones backed out (the kernels add sum_t e and back out e with V instead)."""
    n_img, c_in, h, wd = x.shape
    h_g, w_g = h + 2 * pad - 2, wd + 2 * pad - 2
    k5 = collapsed(v)
    xt = F.pad(x, (2, 2, 2, 2)) - shift[None, :c_in, None, None]  # -shift outside the image
    out = torch.zeros(n_img, 8, h, wd, dtype=torch.float64)
    for ih in range(h):
        for iw in range(wd):
            patch = xt[:, :, ih : ih + 5, iw : iw + 5].reshape(n_img, c_in, 25)  # offsets -2..2
            acc = torch.einsum("njd,jdi->ni", patch, k5[:c_in])
            for t in range(9):
                kr, kq = divmod(t, 3)
                oh, ow = ih + pad - kr, iw + pad - kq
                if 0 <= oh < h_g and 0 <= ow < w_g:
                    acc += e[torch.arange(8) * 9 + t]
                    continue
                taps = xt[:, :, ih + 2 - kr : ih + 5 - kr, iw + 2 - kq : iw + 5 - kq]
                vt = v[torch.arange(8) * 9 + t].reshape(8, 8, 9)[:, :c_in]  # [ci][ci'][t']
                acc -= torch.einsum("njt,ijt->ni", taps.reshape(n_img, c_in, 9), vt)
            out[:, :, ih, iw] = acc
    return out[:, :c_in]


def main() -> None:
    torch.manual_seed(1)
    n_img, c_in, h, wd, c_out = 2, 3, 9, 11, 5
    for pad in (0, 1, 2):
        x = torch.randn(n_img, c_in, h, wd, dtype=torch.float64) + 3.0
        weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
        y = F.conv2d(x, weight, padding=pad)
        g = torch.randn_like(y)
        a, c, d, ctr = (torch.randn(c_out, dtype=torch.float64) for _ in range(4))
        g_hat = (
            a[:, None, None] * g + c[:, None, None] * (y - ctr[:, None, None]) + d[:, None, None]
        )
        want = F.conv_transpose2d(g_hat, weight, padding=pad)
        taps = F.conv_transpose2d(g, weight * a[:, None, None, None], padding=pad)
        v, e, shift = correction_terms(weight.reshape(c_out, -1), x, c, d, ctr, c_in)
        got = taps + correction(x, v, e, shift, pad)
        print(
            "padding", pad, "relative error", ((got - want).abs().max() / want.abs().max()).item()
        )


if __name__ == "__main__":
    main()
