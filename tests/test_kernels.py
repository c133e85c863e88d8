"""The numba kernels of quantize/kernels/ (legacy.py, kquants.py, iq4.py, floats.py, common.py) against a slow
reference.

The reference below is written from ../shared/reference/quantization.md (§0, §1.2, §2.2-§2.6), not from the
kernels: per block, float32 numpy scalars and element-wise ops (each rounds like C's float ops), every sum an
explicit sequential loop, ``nearest_int`` by the 1.5·2²³ bit trick, fp16 through numpy, and the bit layouts
built from §1.2's element → bit formulas. It is slow (tens of ms per 256 values), so it sees few rows; the
interop tests in test_formats.py compare many more rows with llama.cpp's own C code.

Q2_K and Q3_K (kquants_low.py) have their own tests in test_kernels_q2q3.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import njit

from qtool.quantize.kernels import common, floats, iq4, kquants, legacy

f32 = np.float32
EPS = f32(1e-15)
FLT_MAX = f32(np.finfo(np.float32).max)
NO_IMATRIX = np.empty(0, dtype=np.float32)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=f32)


# ------------------------------------------------------------------------------------------- scalar helpers

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


def fp16_bytes(v):
    with np.errstate(over="ignore"):
        return np.frombuffer(np.float16(f32(v)).tobytes(), np.uint8)


def fp16_value(v):
    with np.errstate(over="ignore"):
        return f32(np.float16(f32(v)))


def c_int(v):
    """C's float → int on x86-64 (cvttss2si): truncation, and INT_MIN for NaN or out-of-range values."""
    v = np.asarray(v, dtype=f32)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(v) & (v < f32(2.0 ** 31)) & (v >= f32(-(2.0 ** 31)))
        return np.where(ok, np.trunc(np.where(ok, v, 0)).astype(np.int64), -(2 ** 31))


def c_int8(v):
    return ((c_int(v) & 0xFF) ^ 0x80) - 0x80


def roundf(v):
    """Half away from zero, computed without an inexact addition."""
    a = np.abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(f32(2.0) * (a - floored)))


def best_index(x):
    """§2.2 best_index_int8 written as "nearest table value, an exact tie goes up" (float32 distances)."""
    x = f32(x)
    if x <= KVALUES[0]:
        return 0
    if x >= KVALUES[15]:
        return 15
    upper = int(np.argmax(KVALUES > x)) if np.any(KVALUES > x) else 15
    return upper - 1 if (x - KVALUES[upper - 1]) < (KVALUES[upper] - x) else upper


# ------------------------------------------------------------------------------------------- §2.2 searches

def make_qx_quants(x, nmax, w):
    """→ (L in 0..2nmax-1, scale)."""
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
            L, scale = codes_for(iscale) + nmax, sumlx / suml2
            best = scale * sumlx
    return L, scale


def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2/3_quants with squared error → (L in 0..nmax, scale, the_min)."""
    vmin = vmax = x[0]
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
        return seqsum(w * (diff * diff))

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
    """→ (L as C's uint8, scale)."""
    vmax = f32(0.0)
    for v in x:
        vmax = vmax if vmax > v else v
    if vmax < EPS:
        return np.zeros(len(x), np.int64), f32(0.0)
    iscale = f32(nmax) / vmax
    L = nearest_int(iscale * x) & 0xFF
    diff = x - (f32(1.0) / iscale) * L.astype(f32)
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


# ------------------------------------------------------------------------------------------- §1.2 packing

def pack_low_high(q):
    """Q4_0/Q4_1/IQ4_NL (and each IQ4_XS sub-block): element j → low nibble of byte j, j+16 → high nibble."""
    q = np.asarray(q, np.int64)
    return ((q[:16] & 15) | ((q[16:32] & 15) << 4)).astype(np.uint8)


def fifth_bits(q):
    bits = sum(int((q[e] >> 4) & 1) << e for e in range(32))
    return np.frombuffer(np.uint32(bits).tobytes(), np.uint8)


def pack_k4_scales(sc, mn):
    out = np.zeros(12, np.uint8)
    for j in range(8):
        if j < 4:
            out[j] |= sc[j] & 0xFF
            out[j + 4] |= mn[j] & 0xFF
        else:
            out[j + 4] = (sc[j] & 15) | ((mn[j] & 15) << 4)
            out[j - 4] |= ((sc[j] >> 4) << 6) & 0xFF
            out[j] |= ((mn[j] >> 4) << 6) & 0xFF
    return out


def decode_k4_scales(packed, j):
    if j < 4:
        return int(packed[j] & 63), int(packed[j + 4] & 63)
    return (int((packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4)),
            int((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)))


def pack_k_nibbles(q):
    """Q4_K/Q5_K: element e, chunk c = e/64, r = e%64: r < 32 low nibble of qs[32c+r], else high of qs[32c+r-32]."""
    out = np.zeros(128, np.uint8)
    for e in range(256):
        c, r = divmod(e, 64)
        if r < 32:
            out[32 * c + r] |= q[e] & 15
        else:
            out[32 * c + r - 32] |= (q[e] & 15) << 4
    return out


# ------------------------------------------------------------------------------------------- §2.3 legacy

def ref_q4_0(x, qw, sigma2):
    if qw is not None:
        L, d = make_qx_quants(x, 8, qw * np.sqrt(sigma2 + x * x))
        return np.concatenate([fp16_bytes(d), pack_low_high(L)])
    vmax, _ = first_absmax(x)
    d = vmax / f32(-8.0)
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    codes = np.minimum(15, c_int8(x * inv + f32(8.5)))
    return np.concatenate([fp16_bytes(d), pack_low_high(codes)])


def ref_q5_0(x, qw, sigma2):
    if qw is not None:
        L, d = make_qx_quants(x, 16, qw * np.sqrt(sigma2 + x * x))
    else:
        vmax, _ = first_absmax(x)
        d = vmax / f32(-16.0)
        inv = f32(1.0) / d if d != 0 else f32(0.0)
        L = np.minimum(31, c_int8(x * inv + f32(16.5)))
    return np.concatenate([fp16_bytes(d), fifth_bits(L), pack_low_high(L)])


def min_max(x):
    vmin, vmax = FLT_MAX, -FLT_MAX
    for v in x:
        vmin = v if v < vmin else vmin
        vmax = v if v > vmax else vmax
    return vmin, vmax


def ref_q4_1(x, qw, sigma2):
    if qw is not None:
        L, d, the_min = make_qkx_quants(x, qw * np.sqrt(sigma2 + x * x), 15, f32(-0.9), f32(0.05), 36)
        m = -the_min
    else:
        m, vmax = min_max(x)
        d = (vmax - m) / f32(15.0)
        inv = f32(1.0) / d if d != 0 else f32(0.0)
        L = np.minimum(15, c_int8(((x - m) * inv) + f32(0.5)))
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_low_high(L)])


def ref_q5_1(x, qw, sigma2):
    if qw is not None:
        L, d, the_min = make_qkx_quants(x, qw * np.sqrt(sigma2 + x * x), 31, f32(-0.9), f32(0.05), 36)
        m = -the_min
    else:
        m, vmax = min_max(x)
        d = (vmax - m) / f32(31.0)
        inv = f32(1.0) / d if d != 0 else f32(0.0)
        L = c_int(((x - m) * inv) + f32(0.5)) & 0xFF   # (uint8_t), no cap in C
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), fifth_bits(L), pack_low_high(L)])


def ref_q8_0(x, qw, sigma2):
    amax = f32(0.0)
    for v in x:
        amax = amax if amax > abs(v) else abs(v)
    d = amax / f32(127.0)
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    q = c_int(roundf(x * inv)) & 0xFF
    return np.concatenate([fp16_bytes(d), q.astype(np.uint8)])


# ------------------------------------------------------------------------------------------- §2.4 K-quants

def ref_q45_k(x, qw, nmax, rmin, nstep):
    subs = x.reshape(8, 32)
    L = np.zeros((8, 32), np.int64)
    scales, mins = np.zeros(8, f32), np.zeros(8, f32)
    if qw is None:
        for j in range(8):
            av_x = np.sqrt(seqsum(subs[j] * subs[j]) / f32(32.0))
            L[j], scales[j], mins[j] = make_qkx_quants(subs[j], av_x + np.abs(subs[j]), nmax, rmin, f32(0.1), nstep)
        max_scale = max_min = f32(0.0)
        for j in range(8):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
        inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
        sc = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF)
        mn = np.minimum(63, nearest_int(inv_min * mins) & 0xFF)
        d, dmin = max_scale / f32(63.0), max_min / f32(63.0)
    else:
        sigma2 = (f32(2.0) * seqsum(x * x)) / f32(256.0)
        sw = np.zeros(8, f32)
        for j in range(8):
            weight = qw[32 * j:32 * j + 32] * np.sqrt(sigma2 + subs[j] * subs[j])
            sw[j] = seqsum(weight)
            L[j], scales[j], mins[j] = make_qkx_quants(subs[j], weight, nmax, f32(-0.9), f32(0.05), 36)
        sc, d = make_qp_quants(scales, 63, sw)
        mn, dmin = make_qp_quants(mins, 63, sw)
        if nmax == 31:
            sc, mn = np.minimum(63, sc), np.minimum(63, mn)
    packed = pack_k4_scales(sc, mn)
    for j in range(8):
        s, m = decode_k4_scales(packed, j)
        dd = fp16_value(d) * f32(s)
        if dd != 0:  # a zero effective scale keeps the search's codes
            L[j] = np.clip(nearest_int((subs[j] + fp16_value(dmin) * f32(m)) / dd), 0, nmax)
    q = L.ravel()
    head = [fp16_bytes(d), fp16_bytes(dmin), packed]
    if nmax == 15:
        return np.concatenate(head + [pack_k_nibbles(q)])
    qh = np.zeros(32, np.uint8)
    for e in range(256):
        qh[e % 32] |= ((q[e] >> 4) & 1) << (e // 32)
    return np.concatenate(head + [qh, pack_k_nibbles(q)])


def ref_q4_k(x, qw):
    return ref_q45_k(x, qw, 15, f32(-1.0), 20)


def ref_q5_k(x, qw):
    return ref_q45_k(x, qw, 31, f32(-0.5), 15)


def ref_q6_k(x, qw):
    subs = x.reshape(16, 16)
    L = np.zeros((16, 16), np.int64)
    scales = np.zeros(16, f32)
    for j in range(16):
        weight = subs[j] * subs[j] if qw is None else qw[16 * j:16 * j + 16]
        L[j], scales[j] = make_qx_quants(subs[j], 32, weight)
    max_scale, max_abs = first_absmax(scales)
    if max_abs < EPS:
        return np.zeros(210, np.uint8)
    iscale = f32(-128.0) / max_scale
    d = f32(1.0) / iscale
    codes = ((np.minimum(127, nearest_int(iscale * scales)) & 0xFF) ^ 0x80) - 0x80   # stored as int8
    for j in range(16):
        dd = fp16_value(d) * f32(codes[j])
        if dd != 0:
            L[j] = np.clip(nearest_int(subs[j] / dd), -32, 31) + 32
    q = L.ravel()
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for e in range(256):
        h, r = divmod(e, 128)
        t, l = divmod(r, 32)
        ql[64 * h + l + 32 * (t % 2)] |= (q[e] & 15) << (0 if t < 2 else 4)
        qh[32 * h + l] |= ((q[e] >> 4) & 3) << (2 * t)
    return np.concatenate([ql, qh, (codes & 0xFF).astype(np.uint8), fp16_bytes(d)])


# ------------------------------------------------------------------------------------------- §2.5 IQ4

def iq4_scale(x, weight):
    vmax, amax = first_absmax(x)
    if amax < EPS:
        return f32(0.0)

    def sums(inv):
        q = KVALUES[[best_index(v) for v in inv * x]]
        return seqsum((weight * q) * x), seqsum((weight * q) * q)

    sumqx, sumq2 = sums(f32(1.0) / ((-vmax) / f32(-127.0)))
    d = sumqx / sumq2 if sumq2 > 0 else f32(0.0)
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = sums(f32(itry - 127) / vmax)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


def iq4_weight(x, qw, sigma2):
    return x * x if qw is None else qw * np.sqrt(sigma2 + x * x)


def ref_iq4_nl(x, qw):
    d = iq4_scale(x, iq4_weight(x, qw, seqsum(x * x) * (f32(2.0) / f32(32.0))))
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    return np.concatenate([fp16_bytes(d), pack_low_high([best_index(v) for v in inv * x])])


def ref_iq4_xs(x, qw):
    sigma2 = seqsum(x * x) * (f32(2.0) / f32(256.0))
    subs = x.reshape(8, 32)
    scales = np.array([iq4_scale(subs[i], iq4_weight(subs[i], None if qw is None else qw[32 * i:32 * i + 32], sigma2))
                       for i in range(8)], dtype=f32)
    max_scale, _ = first_absmax(scales)
    d = -max_scale / f32(32.0)
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    scales_h, scales_l, qs = 0, np.zeros(4, np.uint8), []
    for i in range(8):
        l = int(np.clip(nearest_int(inv * scales[i]), -32, 31))
        dl = d * f32(l)   # the fp32 d, not the stored fp16 one
        idl = f32(1.0) / dl if dl != 0 else f32(0.0)
        qs.append(pack_low_high([best_index(v) for v in idl * subs[i]]))
        scales_l[i // 2] |= ((l + 32) & 15) << (4 * (i % 2))
        scales_h |= ((l + 32) >> 4) << (2 * i)
    return np.concatenate([fp16_bytes(d), np.frombuffer(np.uint16(scales_h).tobytes(), np.uint8), scales_l] + qs)


# ------------------------------------------------------------------------------------------- drivers

LEGACY = {T.Q4_0: ref_q4_0, T.Q4_1: ref_q4_1, T.Q5_0: ref_q5_0, T.Q5_1: ref_q5_1, T.Q8_0: ref_q8_0}
SUPER = {T.Q4_K: ref_q4_k, T.Q5_K: ref_q5_k, T.Q6_K: ref_q6_k, T.IQ4_XS: ref_iq4_xs}
KERNELS = {T.Q4_0: legacy.quantize_q4_0, T.Q4_1: legacy.quantize_q4_1, T.Q5_0: legacy.quantize_q5_0,
           T.Q5_1: legacy.quantize_q5_1, T.Q8_0: legacy.quantize_q8_0, T.Q4_K: kquants.quantize_q4_k,
           T.Q5_K: kquants.quantize_q5_k, T.Q6_K: kquants.quantize_q6_k, T.IQ4_NL: iq4.quantize_iq4_nl,
           T.IQ4_XS: iq4.quantize_iq4_xs}
BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24, T.Q8_0: 34, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210,
         T.IQ4_NL: 18, T.IQ4_XS: 136}
BLOCK = {qtype: 256 if qtype in SUPER else 32 for qtype in KERNELS}


def reference_quantize(qtype, x, imatrix=None):
    rows = []
    size = BLOCK[qtype]
    with np.errstate(all="ignore"):
        for row in x:
            # Q8_0 ignores the imatrix; the legacy imatrix paths scale weights by the whole row's mean square.
            qw = None if qtype == T.Q8_0 else imatrix
            sigma2 = seqsum(row * row) / f32(len(row)) if qw is not None else None
            blocks = []
            for b in range(0, len(row), size):
                part = None if qw is None else qw[b:b + size]
                if qtype in LEGACY:
                    blocks.append(LEGACY[qtype](row[b:b + size], part, sigma2))
                elif qtype == T.IQ4_NL:
                    blocks.append(ref_iq4_nl(row[b:b + size], part))
                else:
                    blocks.append(SUPER[qtype](row[b:b + size], part))
            rows.append(np.concatenate(blocks))
    return np.stack(rows)


def kernel_quantize(qtype, x, imatrix=None):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.full((x.shape[0], x.shape[1] // BLOCK[qtype] * BYTES[qtype]), 0xA5, np.uint8)  # catches unwritten bytes
    KERNELS[qtype](x, NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), out)
    return out


# ------------------------------------------------------------------------------------------- data

def edge_rows(rng) -> dict[str, np.ndarray]:
    """Rows of 512 values (two super-blocks, sixteen 32-blocks) that reach the degenerate branches of §2.6."""
    g = lambda: rng.standard_normal(512).astype(np.float32)  # noqa: E731
    cases = {"gaussian": g(), "all zero": np.zeros(512, np.float32)}
    z = g()
    z[256:] = 0
    z[32:64] = 0
    z[80:96] = -0.0
    cases["zero blocks and sub-blocks"] = z
    o = g()
    o[300] = 1e4
    cases["one huge outlier"] = o
    o = g() * np.float32(1e-3)
    o[5] = -50.0
    cases["one negative outlier"] = o
    cases["constant positive"] = np.full(512, 0.75, np.float32)
    cases["constant negative"] = np.full(512, -3.0, np.float32)
    c = g()
    c[32:64] = -3.0
    c[96:112] = 2.5
    c[128:160] = 1e-20
    cases["constant and tiny groups"] = c
    cases["subnormal"] = g() * np.float32(1e-39)
    s = g()
    s[:256] *= np.float32(1e-41)
    cases["subnormal block beside normal"] = s
    cases["positive only"] = np.abs(g())
    cases["negative only"] = -np.abs(g()) - np.float32(1.0)
    cases["heavy tailed"] = np.clip(rng.standard_t(1.5, 512) * 10.0 ** rng.uniform(-4, 3, 512), -6e4, 6e4).astype(f32)
    cases["two values"] = np.sign(g()).astype(np.float32)
    # On a grid, like weights dequantized from another format: many repeats, equal distances, exact ties.
    cases["small integers"] = rng.integers(-8, 8, 512).astype(np.float32)
    cases["integers times 0.1"] = rng.integers(-20, 21, 512).astype(np.float32) * np.float32(0.1)
    return cases


def imatrix_for(rng, n=512):
    w = rng.uniform(0.0, 4.0, n).astype(np.float32) ** 2
    w[::5] = 0.0          # zero columns, as an imatrix has for inputs never activated
    w[64:96] = 0.0        # one whole 32-block without weight
    w[70] = 1e6           # one dominant column
    return w


EDGE_NAMES = list(edge_rows(np.random.default_rng(0)))
TYPES = list(KERNELS)


# ------------------------------------------------------------------------------------------- helpers vs numpy

def test_nearest_int_is_round_half_even_in_range_and_the_bit_trick_outside():
    @njit
    def apply(values, out):
        for i in range(values.shape[0]):
            out[i] = common.nearest_int(values[i])

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(10000) * 1000, np.arange(-10, 10) + 0.5,
                             [4194303, -4194303, 5e6, -5e6, 1e30, np.inf, -np.inf, np.nan]]).astype(np.float32)
    out = np.empty(len(values), np.int64)
    apply(values, out)
    np.testing.assert_array_equal(out, nearest_int(values))
    in_range = np.abs(values) <= 4194303
    np.testing.assert_array_equal(out[in_range], np.rint(values[in_range]))
    assert out[-6] == -3791456  # 5e6: §0's example of the trick's garbage


def test_fp16_conversion_matches_numpy_bit_for_bit():
    @njit
    def to_half(values, out):
        for i in range(values.shape[0]):
            out[i] = common.fp32_to_fp16_bits(values[i])

    @njit
    def from_half(halves, out):
        for i in range(halves.shape[0]):
            out[i] = common.fp16_bits_to_fp32(halves[i])

    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 400000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000 - 2, 0x38800000 + 2, 997, dtype=np.uint32),  # the subnormal range
                           np.uint32([0x477FEFFF, 0x477FF000, 0x7F800000, 0x80000000, 0x7FC00001, 0xFFC00000])])
    values = bits.view(np.float32)
    halves = np.empty(len(values), np.int64)
    to_half(values, halves)
    with np.errstate(all="ignore"):
        expected = values.astype(np.float16).view(np.uint16).astype(np.int64)
    nan = np.isnan(values)
    expected[nan] = 0x7E00 | ((bits[nan] >> 16) & 0x8000)  # §0: any NaN becomes 0x7E00 | sign
    np.testing.assert_array_equal(halves, expected)
    back = np.empty(65536, np.float32)
    from_half(np.arange(65536, dtype=np.int64), back)
    every_half = np.arange(65536).astype(np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back.view(np.uint32), every_half.view(np.uint32))


def test_best_index_matches_nearest_value_with_ties_up():
    @njit
    def apply(values, out):
        for i in range(values.shape[0]):
            out[i] = common.best_index_int8(values[i])

    rng = np.random.default_rng(2)
    midpoints = (KVALUES[1:] + KVALUES[:-1]) / f32(2.0)
    values = np.concatenate([rng.uniform(-140, 130, 3000), KVALUES, midpoints, np.nextafter(midpoints, 0),
                             [0.0, -0.0, np.nan]]).astype(np.float32)
    out = np.empty(len(values), np.int64)
    apply(values, out)
    np.testing.assert_array_equal(out, [best_index(v) for v in values])
    assert out[-3] == 8 and out[-1] == 15  # §2.2: best_index(0) = 8; NaN fails every test and ends at 15


def test_first_non_finite_finds_the_first_bad_row_and_column():
    x = np.zeros((5, 40), np.float32)
    assert common.first_non_finite(x) == (-1, -1)
    x[3, 7] = np.inf
    x[4, 0] = np.nan
    assert common.first_non_finite(x) == (3, 7)
    x[1, 39] = -np.inf
    assert common.first_non_finite(x) == (1, 39)


# ------------------------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("use_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference_on_random_rows(qtype, use_imatrix):
    rng = np.random.default_rng(100 + int(qtype) + 7 * use_imatrix)
    x = rng.standard_normal((3, 512)).astype(np.float32) * np.float32([[1.0], [0.02], [30.0]])
    w = imatrix_for(rng) if use_imatrix else None
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference_on_edge_cases(qtype, use_imatrix):
    rng = np.random.default_rng(200 + int(qtype))
    cases = edge_rows(rng)
    x = np.stack(list(cases.values()))
    w = imatrix_for(rng) if use_imatrix else None
    ours, ref = kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w)
    for name, a, b in zip(cases, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"{qtype.name} {name}")


@pytest.mark.parametrize("qtype", [t for t in TYPES if t != T.Q8_0], ids=lambda t: t.name)
def test_all_zero_imatrix_matches_reference(qtype):
    rng = np.random.default_rng(300 + int(qtype))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    w = np.zeros(512, np.float32)
    np.testing.assert_array_equal(kernel_quantize(qtype, x, w), reference_quantize(qtype, x, w))


# §2.6's byte patterns for an all-zero block, written out by hand (independent of both implementations).
ZERO_BLOCKS = {
    (T.Q4_0, False): bytes([0x00, 0x80]) + bytes([0x88]) * 16,
    (T.Q4_0, True): bytes(18),
    (T.Q5_0, False): bytes([0x00, 0x80]) + bytes([0xFF]) * 4 + bytes(16),
    (T.Q5_0, True): bytes(22),
    (T.Q4_1, False): bytes(20), (T.Q4_1, True): bytes(20),
    (T.Q5_1, False): bytes(24), (T.Q5_1, True): bytes(24),
    (T.Q8_0, False): bytes(34), (T.Q8_0, True): bytes(34),
    (T.Q4_K, False): bytes(144), (T.Q4_K, True): bytes(144),
    (T.Q5_K, False): bytes(176), (T.Q5_K, True): bytes(176),
    (T.Q6_K, False): bytes(210), (T.Q6_K, True): bytes(210),
    (T.IQ4_NL, False): bytes(2) + bytes([0x88]) * 16, (T.IQ4_NL, True): bytes(2) + bytes([0x88]) * 16,
    (T.IQ4_XS, False): bytes([0x00, 0x80, 0xAA, 0xAA]) + bytes(4) + bytes([0x88]) * 128,
    (T.IQ4_XS, True): bytes([0x00, 0x80, 0xAA, 0xAA]) + bytes(4) + bytes([0x88]) * 128,
}


@pytest.mark.parametrize("qtype, use_imatrix", list(ZERO_BLOCKS), ids=lambda v: getattr(v, "name", str(v)))
def test_all_zero_block_bytes(qtype, use_imatrix):
    x = np.zeros((1, BLOCK[qtype]), np.float32)
    w = np.ones(BLOCK[qtype], np.float32) if use_imatrix else None
    assert kernel_quantize(qtype, x, w)[0].tobytes() == ZERO_BLOCKS[qtype, use_imatrix]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_are_independent_of_how_the_tensor_is_split(qtype):
    # The pipeline may quantize a tensor in row chunks on any number of threads: bytes must not depend on it.
    rng = np.random.default_rng(400 + int(qtype))
    x = rng.standard_normal((9, 256)).astype(np.float32)
    w = rng.uniform(0, 2, 256).astype(np.float32)
    whole = kernel_quantize(qtype, x, w)
    pieces = np.concatenate([kernel_quantize(qtype, x[:4], w), kernel_quantize(qtype, x[4:], w)])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(kernel_quantize(qtype, x[5:6], w), whole[5:6])


# ------------------------------------------------------------------------------------------- F16 / BF16

def float_rows(rng) -> np.ndarray:
    """Every float32 class: random bit patterns (finite, inf, NaN), the fp16 subnormal and overflow edges."""
    bits = rng.integers(0, 2 ** 32, (8, 4096), dtype=np.uint64).astype(np.uint32)
    edges = np.float32([0.0, -0.0, 65504, 65519.996, 65520, -65520, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25,
                        2 ** -14, 6.1e-5, -6.0e-8, 1e-40, -3e-39, 3.4e38, np.inf, -np.inf, np.nan])
    bits[0, :len(edges)] = edges.view(np.uint32)
    bits[1] = np.arange(0x33000000 - 2048, 0x33000000 + 2048, dtype=np.uint32)  # around 2**-25
    return bits.view(np.float32)


def test_f16_kernel_matches_numpy_conversion():
    x = float_rows(np.random.default_rng(10))
    out = np.empty((x.shape[0], 2 * x.shape[1]), np.uint8)
    floats.quantize_f16(x, NO_IMATRIX, out)
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16).view(np.uint16).copy()
    nan = np.isnan(x)
    expected[nan] = 0x7E00 | ((x.view(np.uint32)[nan] >> 16) & 0x8000).astype(np.uint16)  # §0: ggml's NaN
    np.testing.assert_array_equal(out.view(np.uint16), expected)


def test_bf16_kernel_matches_reference_rounding():
    x = float_rows(np.random.default_rng(11))
    out = np.empty((x.shape[0], 2 * x.shape[1]), np.uint8)
    floats.quantize_bf16(x, NO_IMATRIX, out)
    u = x.view(np.uint32).astype(np.uint64)
    # §0: NaN -> (u >> 16) | 64; otherwise round to nearest even on the upper half.
    expected = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    np.testing.assert_array_equal(out.view(np.uint16), expected.astype(np.uint16))
    # the one numpy bf16 rounding (export-hf, activation rounding) is the same function
    from qtool.floats import f32_to_bf16_bits
    np.testing.assert_array_equal(f32_to_bf16_bits(x).reshape(out.shape[0], -1), out.view(np.uint16))


def test_kernel_block_geometry_is_the_format_tables():
    """The block sizes the kernels hard-wire (numba freezes them) are gguf's and the format table's."""
    import gguf

    from qtool.quantize.formats import FORMATS
    from qtool.quantize.kernels import common

    for qtype, fmt in FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
        if fmt.name in ("F32", "F16", "BF16"):
            continue
        assert getattr(common, f"{fmt.name}_BYTES") == fmt.type_size, fmt.name
        kernel_block = {"Q1_0": common.QK1_0, "Q2_0": common.QK2_0}.get(
            fmt.name, common.QK_K if fmt.block_size == 256 else common.QK)
        assert fmt.block_size == kernel_block, fmt.name


DECODED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0",
           "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
           "MXFP4"]
# Decoded by our kernels but not by gguf-py (tests/test_kernels_lowbit.py checks them against a numpy port of ggml).
DECODED_WITHOUT_GGUF_PY = ["Q1_0", "Q2_0"]
# fp16 scale patterns at the edges: ±0, the smallest and largest subnormals, the smallest normal, ±1, ±65504.
EDGE_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF],
                       np.uint16)


def test_every_writable_block_type_has_a_parallel_decoder():
    from qtool.quantize import formats

    assert (sorted(f.name for f in formats.FORMATS.values() if f.load_decoder is not None)
            == sorted(DECODED + DECODED_WITHOUT_GGUF_PY))


@pytest.mark.parametrize("name", DECODED)
def test_parallel_decoders_equal_gguf_py(name):
    """The numba decoders behind formats.decode, bit for bit against gguf-py: quantized rows (with an outlier and an
    all-zero row) and raw random bytes (every fp16 scale pattern: subnormal, inf, NaN)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from qtool.quantize import formats

    qtype = T[name]
    fmt = formats.FORMATS[qtype]
    assert fmt.load_decoder is not None
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 512)) * rng.uniform(1e-4, 50, (8, 1))).astype(np.float32)
    x[3] = 0.0
    x[5, 17] = 3e4
    quantized = np.ascontiguousarray(fmt.quantize(x, np.ones(512, np.float32) if fmt.needs_imatrix else None))
    random_bytes = rng.integers(0, 256, (16, fmt.row_bytes(512)), dtype=np.uint8)
    for raw in (quantized, random_bytes):
        with np.errstate(invalid="ignore", over="ignore"):       # inf scales times zero codes
            want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(raw.shape[0], 512)
        got = formats.decode(raw, qtype, 512)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def random_finite_blocks(rng, fmt, rows: int, n: int) -> np.ndarray:
    """Random block bytes whose fp16 scale fields are finite: random non-inf/NaN halves in most blocks, the
    EDGE_HALVES (subnormal, tiny, negative, ±65504) in the others, so that every decoded value is finite."""
    raw = rng.integers(0, 256, (rows, fmt.row_bytes(n)), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, fmt.type_size)
    # IQ1_M's one fp16 d has no offset of its own: its four nibbles top the four scale words (bytes 49, 51, 53, 55)
    packed_half = fmt.name == "IQ1_M"
    for offset in (0,) if packed_half else fmt.half_offsets:
        halves = rng.integers(0, 2 ** 16, blocks.shape[:2], dtype=np.uint32).astype(np.uint16)
        halves[(halves & 0x7C00) == 0x7C00] ^= 0x4000                     # inf/NaN exponent -> a finite one
        edge = rng.random(blocks.shape[:2]) < 0.5
        halves[edge] = rng.choice(EDGE_HALVES, int(edge.sum()))
        halves.reshape(-1)[:len(EDGE_HALVES)] = EDGE_HALVES                 # each edge at least once
        if packed_half:
            for s in range(4):
                blocks[:, :, 49 + 2 * s] = (blocks[:, :, 49 + 2 * s] & 0x0F) | (((halves >> (4 * s)) & 0xF) << 4)
            continue
        blocks[:, :, offset] = halves & 0xFF
        blocks[:, :, offset + 1] = halves >> 8
    for offset in fmt.e8m0_offsets:                    # MXFP4: up to 252, where 12 * 2**124 is still finite
        exponents = rng.integers(0, 253, blocks.shape[:2], dtype=np.uint8)
        exponents.reshape(-1)[:4] = [0, 1, 2, 252]
        blocks[:, :, offset] = exponents
    return raw


@pytest.mark.parametrize("name", DECODED)
def test_parallel_decoders_equal_gguf_py_on_finite_random_blocks(name):
    """Every decoder, bit for bit against gguf-py, on random blocks with finite (incl. extreme) scales: no value is
    NaN, so the float32 bit patterns must be equal everywhere, through the kernel itself and through
    formats.decode into a given C-contiguous buffer (and into a strided one, which goes through gguf-py)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from qtool.quantize import formats

    qtype = T[name]
    fmt = formats.FORMATS[qtype]
    n = 4 * 256
    raw = random_finite_blocks(np.random.default_rng(sum(map(ord, name))), fmt, 24, n)
    want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(raw.shape[0], n)
    assert np.isfinite(want).all()

    direct = np.full(want.shape, np.nan, np.float32)                     # catches unwritten values
    fmt.load_decoder(name)(raw, direct)
    assert np.array_equal(direct.view(np.uint32), want.view(np.uint32))

    out = np.full(want.shape, np.nan, np.float32)
    assert formats.decode(raw, qtype, n, out=out) is out
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))

    wide = np.full((raw.shape[0], 2 * n), np.nan, np.float32)
    strided = wide[:, ::2]
    formats.decode(raw, qtype, n, out=strided)
    assert np.array_equal(strided.view(np.uint32), want.view(np.uint32))

    assert np.array_equal(formats.decode(raw[5:9], qtype, n).view(np.uint32), want[5:9].view(np.uint32))


def test_bf16_decode_equals_gguf_py_for_every_bit_pattern():
    """formats.decode of BF16 (the parallel floats.decode_bf16, or the numpy shift into a strided buffer) against
    gguf-py and the plain shift, on all 65536 patterns (NaN payloads, ±inf, subnormals, ±0) and random rows."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from qtool.quantize import formats

    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).reshape(64, 1024)
    random = np.random.default_rng(12).integers(0, 2 ** 16, (7, 1024), dtype=np.uint32).astype(np.uint16)
    for halves in (every, random):
        raw = halves.view(np.uint8)
        want = (halves.astype(np.uint32) << 16)
        reference = np.asarray(gguf.quants.dequantize(raw, T.BF16), np.float32).reshape(halves.shape)
        assert np.array_equal(reference.view(np.uint32), want)
        got = formats.decode(raw, T.BF16, 1024)
        assert np.array_equal(got.view(np.uint32), want)
        out = np.zeros(halves.shape, np.float32)
        assert formats.decode(raw, T.BF16, 1024, out=out) is out
        assert np.array_equal(out.view(np.uint32), want)
        strided = np.zeros((halves.shape[0], 2048), np.float32)[:, 1::2]
        formats.decode(raw, T.BF16, 1024, out=strided)
        assert np.array_equal(strided.view(np.uint32), want)
    flat = np.zeros(every.size, np.float32)
    floats.decode_bf16(every.reshape(-1), flat)
    assert np.array_equal(flat.view(np.uint32), every.reshape(-1).astype(np.uint32) << 16)


def test_f16_decode_keeps_every_bit_pattern():
    """formats.decode of F16 (floats.decode_f16: the CPU's vectorized conversion) on all 65536 patterns against the
    format's definition bit for bit: subnormals, ±0, ±inf, and NaN payloads, signaling ones included (the CPU's
    conversion alone would quiet those), directly and through formats.decode."""
    from gguf import GGMLQuantizationType as T

    from qtool.quantize import formats

    h = np.arange(2 ** 16, dtype=np.uint32)
    sign, exponent, mantissa = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    want = np.where(exponent == 31, sign | 0x7F800000 | (mantissa << 13),
                    sign | ((exponent + 112) << 23) | (mantissa << 13)).astype(np.uint32)
    sub = exponent == 0                                     # subnormal halves: m * 2^-24, a normal float32 (or 0)
    want[sub] = sign[sub] | (mantissa[sub].astype(np.float32) * np.float32(2.0 ** -24)).view(np.uint32)
    assert (want[0x7C01] & 0x00400000) == 0                 # a signaling NaN stays signaling
    halves = h.astype(np.uint16)
    flat = np.zeros(halves.size, np.float32)
    floats.decode_f16(halves, flat)
    assert np.array_equal(flat.view(np.uint32), want)
    got = formats.decode(halves.view(np.uint8).reshape(64, 2048), T.F16, 1024)
    assert np.array_equal(got.view(np.uint32).reshape(-1), want)
