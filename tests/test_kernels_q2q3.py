"""Q2_K and Q3_K kernels (quantize/kernels/kquants_low.py) against a slow reference and against ggml itself.

The reference below is written from ../shared/reference/quantization.md (§0, §1.2, §2.2, §2.4, §2.6), not from
the kernels' helpers: float32 scalars and arrays only (element-wise numpy ops round exactly like C's), every
sum an explicit sequential loop, ``nearest_int`` by the 1.5·2²³ bit trick. It is slow (about 20 ms per
super-block), so it sees a few rows; the interop tests compare many more rows with llama.cpp's own C code.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from qtool.quantize.kernels.kquants_low import quantize_q2_k, quantize_q3_k

f32 = np.float32
EPS = f32(1e-15)
BLOCK_BYTES = {T.Q2_K: 84, T.Q3_K: 110}
KERNELS = {T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k}
NO_IMATRIX = np.empty(0, dtype=np.float32)


# ------------------------------------------------------------------------------------------- the reference

def nearest_int(v):
    bits = (np.asarray(v, dtype=f32) + f32(12582912.0)).view(np.int32).astype(np.int64)
    return (bits & 0x7FFFFF) - 0x400000


def seqsum(values):
    s = f32(0.0)
    for v in values:
        s = f32(s + v)
    return s


def first_absmax(x):
    amax, vmax = f32(0.0), f32(0.0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    return vmax, amax


def fp16_value(v):
    return f32(np.float16(f32(v)))  # §0: numpy's RNE conversion equals ggml's for finite values


def make_qx_quants(x, nmax, w):
    """§2.2 make_qx_quants, rmse_type 1 → (L in 0..2nmax-1, scale)."""
    vmax, amax = first_absmax(x)
    if amax < EPS:
        return np.zeros(len(x), np.int64), f32(0.0)

    def codes_for(iscale):
        return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)

    l = codes_for(f32(-nmax) / vmax)
    lf = l.astype(f32)
    sumlx, suml2 = seqsum((w * x) * lf), seqsum((w * lf) * lf)
    L = l + nmax
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        lf = codes_for(iscale).astype(f32)
        sumlx, suml2 = seqsum((w * x) * lf), seqsum((w * lf) * lf)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = codes_for(iscale) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return L, scale


def make_q3_quants(x, nmax):
    """§2.2 make_q3_quants (do_rmse) → (L in 0..2nmax-1, scale)."""
    vmax, amax = first_absmax(x)
    if amax < EPS:
        return np.zeros(len(x), np.int64), f32(0.0)
    L = np.clip(nearest_int((f32(-nmax) / vmax) * x), -nmax, nmax - 1)
    w = x * x
    lf = L.astype(f32)
    sumlx, suml2 = seqsum((w * x) * lf), seqsum((w * lf) * lf)
    for _ in range(5):
        changed = 0
        for i in range(len(x)):
            li = f32(L[i])
            slx = sumlx - (w[i] * x[i]) * li
            if slx > 0:
                sl2 = suml2 - (w[i] * li) * li
                new_l = int(np.clip(nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1))
                if new_l != L[i]:
                    slx = slx + (w[i] * x[i]) * f32(new_l)
                    sl2 = sl2 + (w[i] * f32(new_l)) * f32(new_l)
                    if sl2 > 0 and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return L + nmax, (sumlx / suml2 if suml2 > 0 else f32(0.0))


def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """§2.2 make_qkx2/3_quants → (L in 0..nmax, scale, the_min)."""
    vmin, vmax = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, len(x)):
        vmin = x[i] if x[i] < vmin else vmin
        vmax = x[i] if x[i] > vmax else vmax
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    if vmin > 0:
        vmin = f32(0.0)
    if vmax == vmin:
        return np.zeros(len(x), np.int64), f32(0.0), -vmin

    def error(scale, mn, lf):
        diff = ((scale * lf) + mn) - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = f32(nmax) / (vmax - vmin)
    scale = f32(1.0) / iscale
    L = np.clip(nearest_int(iscale * (x - vmin)), 0, nmax)
    best = error(scale, vmin, L.astype(f32))
    for step in range(nstep + 1):
        iscale = ((rmin + rdelta * f32(step)) + f32(nmax)) / (vmax - vmin)
        aux = np.clip(nearest_int(iscale * (x - vmin)), 0, nmax)
        lf = aux.astype(f32)
        sum_l, sum_l2, sum_xl = seqsum(w * lf), seqsum((w * lf) * lf), seqsum((w * lf) * x)
        D = (sum_w * sum_l2) - (sum_l * sum_l)
        if D > 0:
            this_scale = ((sum_w * sum_xl) - (sum_x * sum_l)) / D
            this_min = ((sum_l2 * sum_x) - (sum_l * sum_xl)) / D
            if this_min > 0:
                this_min, this_scale = f32(0.0), sum_xl / sum_l2
            cur = error(this_scale, this_min, lf)
            if cur < best:
                L, best, scale, vmin = aux, cur, this_scale, this_min
    return L, scale, -vmin


def make_qp_quants(x, nmax, w):
    """§2.2 make_qp_quants → (L as C's uint8, scale)."""
    vmax = f32(0.0)
    for v in x:
        vmax = vmax if vmax > v else v
    if vmax < EPS:
        return np.zeros(len(x), np.int64), f32(0.0)
    iscale = f32(nmax) / vmax
    L = nearest_int(iscale * x) & 0xFF
    scale = f32(1.0) / iscale
    diff = x - scale * L.astype(f32)
    best = seqsum((w * diff) * diff)
    for step in [s for s in range(-4, 5) if s != 0]:
        iscale_step = (f32(0.1) * f32(step) + f32(nmax)) / vmax
        diff = x - (f32(1.0) / iscale_step) * np.minimum(nmax, nearest_int(iscale_step * x)).astype(f32)
        mse = seqsum((w * diff) * diff)
        if mse < best:
            best, iscale = mse, iscale_step
    l = np.minimum(nmax, nearest_int(iscale * x))
    L = l & 0xFF
    lf = l.astype(f32)
    sumlx, suml2 = seqsum((w * x) * lf), seqsum((w * lf) * lf)
    for _ in range(5):
        changed = 0
        for i in range(len(x)):
            li = f32(L[i])
            slx = sumlx - (w[i] * x[i]) * li
            sl2 = suml2 - (w[i] * li) * li
            if slx > 0 and sl2 > 0:
                new_l = int(min(nmax, nearest_int((x[i] * sl2) / slx)))
                if new_l != L[i]:
                    slx = slx + (w[i] * x[i]) * f32(new_l)
                    sl2 = sl2 + (w[i] * f32(new_l)) * f32(new_l)
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return L, (sumlx / suml2 if suml2 > 0 else f32(0.0))


def pack_2bit(q):
    """§1.2: qs[32h + l] = q[128h+l] | q[128h+l+32] << 2 | q[128h+l+64] << 4 | q[128h+l+96] << 6."""
    out = np.zeros(64, np.uint8)
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[32 * h + l] = (q[e] & 3) | (q[e + 32] & 3) << 2 | (q[e + 64] & 3) << 4 | (q[e + 96] & 3) << 6
    return out


def fp16_bytes(v):
    return np.frombuffer(np.float16(f32(v)).tobytes(), np.uint8)


def ref_q2_k_block(x, qw):
    subs = x.reshape(16, 16)
    L = np.zeros((16, 16), np.int64)
    scales, mins = np.zeros(16, f32), np.zeros(16, f32)
    if qw is None:
        for j in range(16):
            L[j], scales[j], mins[j] = make_qkx_quants(subs[j], np.abs(subs[j]), 3, f32(-0.5), f32(0.1), 15, True)
        max_scale = max_min = f32(0.0)
        for j in range(16):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        codes = np.zeros(16, np.int64)
        d = dmin = f32(0.0)
        if max_scale > 0:
            codes = nearest_int((f32(15.0) / max_scale) * scales) & 0xFF
            d = max_scale / f32(15.0)
        if max_min > 0:
            codes = (codes | (nearest_int((f32(15.0) / max_min) * mins) << 4)) & 0xFF
            dmin = max_min / f32(15.0)
    else:
        sigma2 = seqsum(x * x) / f32(256)
        sw = np.zeros(16, f32)
        for j in range(16):
            weight = qw[16 * j:16 * j + 16] * np.sqrt(sigma2 + subs[j] * subs[j])
            sw[j] = seqsum(weight)
            L[j], scales[j], mins[j] = make_qkx_quants(subs[j], weight, 3, f32(-0.9), f32(0.05), 36, False)
        Ls, d = make_qp_quants(scales, 15, sw)
        Lm, dmin = make_qp_quants(mins, 15, sw)
        codes = (Ls | (Lm << 4)) & 0xFF
    d16, dmin16 = fp16_value(d), fp16_value(dmin)
    for j in range(16):
        dd = d16 * f32(codes[j] & 15)
        if dd != 0:  # zero effective scale keeps the search's codes
            L[j] = np.clip(nearest_int((subs[j] + dmin16 * f32(codes[j] >> 4)) / dd), 0, 3)
    return np.concatenate([codes.astype(np.uint8), pack_2bit(L.ravel()), fp16_bytes(d), fp16_bytes(dmin)])


def ref_q3_k_block(x, qw):
    subs = x.reshape(16, 16)
    L = np.zeros((16, 16), np.int64)
    scales = np.zeros(16, f32)
    if qw is None:
        for j in range(16):
            L[j], scales[j] = make_q3_quants(subs[j], 4)
        max_scale, _ = first_absmax(scales)
        codes = np.zeros(16, np.int64)
        d = f32(0.0)
        if max_scale != 0:
            iscale = f32(-32.0) / max_scale
            as_int8 = ((nearest_int(iscale * scales) + 128) & 0xFF) - 128   # C keeps it in an int8_t first
            codes = np.clip(as_int8, -32, 31) + 32
            d = f32(1.0) / iscale
    else:
        sigma2 = (f32(2.0) * seqsum(x * x)) / f32(256)
        sw = np.zeros(16, f32)
        for j in range(16):
            weight = qw[16 * j:16 * j + 16] * np.sqrt(sigma2 + subs[j] * subs[j])
            sw[j] = seqsum(weight)
            L[j], scales[j] = make_qx_quants(subs[j], 4, weight)
        codes, d = make_qx_quants(scales, 32, sw)
    d16 = fp16_value(d)
    for j in range(16):
        dd = d16 * f32(codes[j] - 32)
        if dd != 0:
            L[j] = np.clip(nearest_int(subs[j] / dd), -4, 3) + 4
    q = L.ravel()
    hmask = np.zeros(32, np.uint8)
    for e in range(256):
        if q[e] > 3:
            hmask[e % 32] |= 1 << (e // 32)
    packed_scales = np.zeros(12, np.uint8)
    for s in range(16):
        packed_scales[s % 8] |= (codes[s] & 15) << (4 * (s // 8))
        packed_scales[8 + s % 4] |= (codes[s] >> 4) << (2 * (s // 4))
    return np.concatenate([hmask, pack_2bit(q & 3), packed_scales, fp16_bytes(d)])


REFERENCES = {T.Q2_K: ref_q2_k_block, T.Q3_K: ref_q3_k_block}


def reference_quantize(qtype, x, imatrix=None):
    rows, n = x.shape
    out = []
    with np.errstate(all="ignore"):
        for r in range(rows):
            blocks = [REFERENCES[qtype](x[r, b:b + 256], None if imatrix is None else imatrix[b:b + 256])
                      for b in range(0, n, 256)]
            out.append(np.concatenate(blocks))
    return np.stack(out)


def kernel_quantize(qtype, x, imatrix=None):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * BLOCK_BYTES[qtype]), np.uint8)
    KERNELS[qtype](x, NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), out)
    return out


# ------------------------------------------------------------------------------------------- the data

def edge_rows(rng) -> dict[str, np.ndarray]:
    """Rows of 512 (two super-blocks) that reach the degenerate branches of §2.6."""
    g = lambda: rng.standard_normal(512).astype(np.float32)  # noqa: E731
    cases = {}
    cases["gaussian"] = g()
    cases["all zero"] = np.zeros(512, np.float32)
    z = g()
    z[256:] = 0
    z[16:32] = 0
    z[40:48] = 0
    cases["zero block and zero sub-blocks"] = z
    o = g()
    o[300] = 1e4
    cases["one huge outlier"] = o
    o = g() * np.float32(1e-3)
    o[5] = -50.0
    cases["one negative outlier"] = o
    cases["constant positive"] = np.full(512, 0.75, np.float32)
    cases["constant negative"] = np.full(512, -3.0, np.float32)
    c = g()
    c[32:48] = -3.0
    c[64:80] = 2.5
    cases["constant sub-blocks"] = c
    cases["subnormal"] = (g() * np.float32(1e-39)).astype(np.float32)
    s = g()
    s[:256] *= np.float32(1e-41)
    cases["subnormal block beside normal"] = s
    cases["positive only"] = np.abs(g())
    cases["negative only"] = -np.abs(g()) - np.float32(1.0)
    cases["heavy tailed"] = (rng.standard_t(1.5, 512) * 10.0 ** rng.uniform(-4, 4, 512)).astype(np.float32)
    cases["two values"] = np.sign(g()).astype(np.float32)
    # Values on a grid, like weights dequantized from another format: many repeats and equal distances.
    cases["small integers"] = rng.integers(-4, 4, 512).astype(np.float32)
    cases["integers times 0.1"] = rng.integers(-20, 21, 512).astype(np.float32) * np.float32(0.1)
    return cases


def imatrix_for(rng, n=512):
    w = rng.uniform(0.0, 4.0, n).astype(np.float32) ** 2
    w[::5] = 0.0          # zero columns, as llama.cpp's imatrix has for never-activated inputs
    w[48:64] = 0.0        # one whole sub-block without weight
    w[70] = 1e6           # one dominant column
    return w


EDGE_NAMES = list(edge_rows(np.random.default_rng(0)))


def effective_scales(qtype, raw):
    """Per sub-block (dd, dm) of the re-quantization step, decoded from the stored bytes (§1.2)."""
    blocks = raw.reshape(-1, BLOCK_BYTES[qtype])
    if qtype == T.Q2_K:
        d = blocks[:, 80:82].copy().view(np.float16).astype(f32)
        dmin = blocks[:, 82:84].copy().view(np.float16).astype(f32)
        codes = blocks[:, :16].astype(np.int64)
        return d * (codes & 15).astype(f32), dmin * (codes >> 4).astype(f32)
    d = blocks[:, 108:110].copy().view(np.float16).astype(f32)
    packed = blocks[:, 96:108].astype(np.int64)
    s = np.arange(16)
    codes = ((packed[:, s % 8] >> (4 * (s // 8))) & 15) | (((packed[:, 8 + s % 4] >> (2 * (s // 4))) & 3) << 4)
    return d * (codes - 32).astype(f32), np.zeros((len(blocks), 16), f32)


def exact_ties(qtype, x, w):
    """Mask of elements whose re-quantization quotient (x + dm)/dd is exactly k + 0.5; also dd, dm per element."""
    scales = effective_scales(qtype, kernel_quantize(qtype, x, w))
    dd, dm = (a.reshape(x.shape[0], -1).repeat(16, axis=1) for a in scales)
    with np.errstate(all="ignore"):
        q = (x + dm) / dd
        return (dd != 0) & (q - np.floor(q) == f32(0.5)), dd, dm


def rows_with_ties(qtype, w, rng):
    """Gaussian rows with elements nudged onto exact rounding ties of the final scales. There ``x/dd`` rounds to
    even while ``x*(1/dd)`` may land an ulp off, so only an exact port of the division (§2.8.6) and of
    nearest_int's ties-to-even gives the same bytes. Nudging moves the scales a little, so it is repeated."""
    x = rng.standard_normal((4, 512)).astype(np.float32)
    for _ in range(4):
        _, dd, dm = exact_ties(qtype, x, w)
        with np.errstate(all="ignore"):
            q = (x.astype(np.float64) + dm) / dd
            k = np.floor(q)
            target = (k + 0.5).astype(f32) * dd          # exact: few significant bits on both sides
            nudged = (target - dm).astype(f32)
            ok = (dd != 0) & (np.abs(q - (k + 0.5)) < 0.02) & ((nudged + dm) == target)
        x[ok] = nudged[ok]
    return x


# ------------------------------------------------------------------------------------------- vs the reference

@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_kernel_matches_reference_on_random_rows(qtype, use_imatrix):
    rng = np.random.default_rng(1000 + int(qtype) + 7 * use_imatrix)
    x = rng.standard_normal((3, 512)).astype(np.float32) * np.float32([[1.0], [0.02], [30.0]])
    w = imatrix_for(rng) if use_imatrix else None
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


@pytest.mark.parametrize("case", EDGE_NAMES)
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_kernel_matches_reference_on_edge_cases(qtype, use_imatrix, case):
    rng = np.random.default_rng(2)
    x = edge_rows(rng)[case][None, :]
    w = imatrix_for(rng) if use_imatrix else None
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_kernel_matches_reference_on_rounding_ties(qtype, use_imatrix):
    rng = np.random.default_rng(8)
    w = rng.uniform(0.0, 4.0, 512).astype(np.float32) if use_imatrix else None
    x = rows_with_ties(qtype, w, rng)
    assert exact_ties(qtype, x, w)[0].sum() >= 20, "the construction no longer produces ties"
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_kernel_matches_reference_with_all_zero_imatrix(qtype):
    """A tensor whose inputs were never activated: every weight 0, the searches see no preference at all."""
    x = np.random.default_rng(9).standard_normal((2, 512)).astype(np.float32)
    w = np.zeros(512, np.float32)
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_all_zero_input_gives_all_zero_bytes(qtype):
    """§2.6: both paths store an all-zero block as zero bytes (d = +0, codes 0)."""
    x = np.zeros((2, 512), np.float32)
    assert not kernel_quantize(qtype, x).any()
    assert not kernel_quantize(qtype, x, np.ones(512, np.float32)).any()


def test_zero_sub_block_keeps_unoffset_search_codes():
    """§2.6: an all-zero group inside a non-zero Q3_K block gets sub-scale 0, so its codes stay the search's
    early-out L = 0 (not the offset 4): q-low 0 and hmask bit clear, which decodes to −4 × a zero scale."""
    x = np.random.default_rng(3).standard_normal((1, 256)).astype(np.float32)
    x[0, :16] = 0.0
    raw = kernel_quantize(T.Q3_K, x)[0]
    hmask, qs = raw[:32], raw[32:96]
    assert not (hmask[:16] & 1).any()                 # elements 0..15: hmask bit 0 of bytes 0..15
    assert not (qs[:16] & 3).any()                    # and the low 2 bits of qs[0..15]
    np.testing.assert_array_equal(dequantize(raw[None], T.Q3_K)[0, :16], np.zeros(16, np.float32))


# ------------------------------------------------------------------------------------------- error bounds

# Relative RMS error on unit Gaussian data: what the formats achieve with their 2.625 / 3.4375 bits (measured
# 0.295 / 0.150 on this seed, the same as llama.cpp's bytes give); a bug that scrambles codes or scales lands far
# above.
RMS_BOUND = {T.Q2_K: 0.32, T.Q3_K: 0.17}


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_round_trip_error_is_bounded(qtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    y = dequantize(kernel_quantize(qtype, x), qtype).reshape(x.shape)
    rel_rms = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
    assert rel_rms < RMS_BOUND[qtype]
    # nothing overshoots the data's range by much (measured 1.02x): scales and mins are decoded consistently
    assert np.abs(y).max() <= np.abs(x).max() * 1.1


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    w = (rng.lognormal(0.0, 2.0, 1024)).astype(np.float32)

    def weighted_error(raw):
        y = dequantize(raw, qtype).reshape(x.shape)
        return float(np.sum(w * (y - x) ** 2))

    assert weighted_error(kernel_quantize(qtype, x, w)) < 0.9 * weighted_error(kernel_quantize(qtype, x))


def test_bad_shapes_are_refused():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q2_k(np.zeros((2, 100), np.float32), NO_IMATRIX, np.zeros((2, 84), np.uint8))
    with pytest.raises(ValueError, match="imatrix"):
        quantize_q3_k(x, np.ones(128, np.float32), np.zeros((2, 110), np.uint8))
    with pytest.raises(ValueError, match="output"):
        quantize_q3_k(x, NO_IMATRIX, np.zeros((2, 84), np.uint8))


# ------------------------------------------------------------------------------------------- vs llama.cpp

def _interop_data(kind: str, rng) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((256, 1024)).astype(np.float32)
    # Student-t with per-row magnitudes over 10 orders of magnitude
    return (rng.standard_t(2.0, (256, 1024)) * 10.0 ** rng.uniform(-5, 5, (256, 1))).astype(np.float32)


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed"])
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_byte_identical_to_ggml(ggml, qtype, use_imatrix, kind):
    rng = np.random.default_rng(6 + int(qtype))
    x = _interop_data(kind, rng)
    w = None
    if use_imatrix:
        w = rng.lognormal(0.0, 2.0, 1024).astype(np.float32)
        w[::7] = 0.0
    ours = kernel_quantize(qtype, x, w)
    theirs = ggml.ggml_quantize(qtype, x, w)
    blocks_differ = (ours.reshape(-1, BLOCK_BYTES[qtype]) != theirs.reshape(-1, BLOCK_BYTES[qtype])).any(1)
    assert blocks_differ.sum() == 0, f"{blocks_differ.mean():.4%} of blocks differ"


@pytest.mark.interop
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_edge_cases_and_ties_byte_identical_to_ggml(ggml, qtype, use_imatrix):
    rng = np.random.default_rng(7)
    x = np.stack(list(edge_rows(rng).values()))
    w = imatrix_for(rng) if use_imatrix else None
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), ggml.ggml_quantize(qtype, x, w))
    x = rows_with_ties(qtype, w, rng)
    assert exact_ties(qtype, x, w)[0].sum() >= 20
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), ggml.ggml_quantize(qtype, x, w))
    if use_imatrix:
        zero = np.zeros_like(w)
        np.testing.assert_array_equal(kernel_quantize(qtype, x, zero), ggml.ggml_quantize(qtype, x, zero))
