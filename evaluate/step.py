"""One decoded token through a layer of attention and FFN in one compiled call.

Model.forward runs a layer as some twenty Python steps around its seven matrix products. With one token of a small
model (SmolLM2-135M: 30 layers of 576-wide rows) that Python was about a third of the time (py-spy, 2 threads).
Here each such layer is one numba function, built from the kernels forward calls, called in the order forward calls
them, on the same inputs: its results are forward's, bit for bit (tests/test_step.py).

A layer's build depends on how its seven products multiply (`Product`): by the integer codes of the input (Q8_K
for K-quants, Q8_0 for blocks of 32: evaluate/qdot.py), or by the input's floats, rounded as llama.cpp rounds them
(F16 weights: to F16) or exact (activations="float32"), times evaluate/matvec.py's float kernels. A model whose
products need anything else (a float32 weight held for BLAS, a type without a mat-vec kernel, BF16 rounding), or
whose layers are not plain attention + FFN (experts, DeltaNet, a gated attention output), is left to forward:
`compiled_layers` returns None. Model.forward uses the compiled layers for one token of one sequence with an F16
KV cache and no input hook.

The products of one input run side by side (q, k and v; gate and up: `_group`), in one parallel loop over
chunks of rows of either matrix, each chunk by the product's serial kernel: the values of each row are those of the
product alone, and a layer starts and waits for the worker threads 4 times for its products, not 7. A/B in one
process (SmolLM2, 30 layers of one token at depth 10, 25 alternating rounds, 2 threads, AVX-512 Zen 4): F16 12.44 ->
11.63 ms, Q8_0 7.80 -> 7.14, Q4_K_M 5.90 -> 5.64 (medians).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from numba import get_num_threads, njit, prange
from qtool.numba_start import drop_stale_kernels

from qtool.evaluate import matvec, qdot
from qtool.evaluate.matvec import PARALLEL_MIN_WEIGHTS, specialize
from qtool.evaluate.model import (PARALLEL_MIN_ELEMENTS, _attend_few_serial, _rms_norm_rows_serial,
                                  _rope_rows_serial, _round_f16_serial, _round_q8_0_serial, _round_q8_k_serial,
                                  _silu_mul_serial, _store_f16_serial, attend_few_, rms_norm_rows, rope_rows,
                                  round_f16_, round_q8_0_, round_q8_k_, silu_mul_, store_f16_)
from qtool.quantize.kernels import common as _common
from qtool.quantize.kernels import decode as _decode

# The layer builds compile in the kernels of these files: an edit of any of them drops the cached builds.
drop_stale_kernels(Path(__file__).parent / "__pycache__",
                   [Path(m.__file__) for m in (matvec, qdot, _common, _decode)] + [Path(__file__).with_name("model.py")],
                   "step.helpers.sha256", lambda name: name.startswith("step."))

# the templates' constants (each build has its own)
_PREP = _PARALLEL = _SERIAL = None
_PQKV = _PO = _PGU = _PD = None


# --- forward's size rules, compiled ------------------------------------------------------------------------------

def _by_size(n_elements, *args):
    """forward's `_sized`: the parallel build from PARALLEL_MIN_ELEMENTS elements on, else the serial twin."""
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        _PARALLEL(*args)
    else:
        _SERIAL(*args)


def _sized(name: str, parallel, serial):
    return specialize(_by_size, f"step_sized_{name}", {"_PARALLEL": parallel, "_SERIAL": serial})


_rms = _sized("rms_norm", rms_norm_rows, _rms_norm_rows_serial)
_rope = _sized("rope", rope_rows, _rope_rows_serial)
_store = _sized("store_f16", store_f16_, _store_f16_serial)
_silu = _sized("silu_mul", silu_mul_, _silu_mul_serial)
_attend = _sized("attend_few", attend_few_, _attend_few_serial)
_round_f16_sized = _sized("round_f16", round_f16_, _round_f16_serial)
_round_q8_0_sized = _sized("round_q8_0", round_q8_0_, _round_q8_0_serial)
_round_q8_k_sized = _sized("round_q8_k", round_q8_k_, _round_q8_k_serial)


@njit(cache=True)
def _add_bias(out, bias):
    for i in range(bias.size):
        out[0, i] += bias[i]


@njit(cache=True)
def _add_(x, y):
    for i in range(x.shape[1]):
        x[0, i] += y[0, i]


# the input x (1-D) rounded into out (1, n) as forward's round_activations rounds it, by kind
@njit(cache=True)
def _copy(x, out):
    out[0, :] = x


@njit(cache=True)
def _round_f16(x, out):
    x2 = x.reshape(1, x.size)
    _round_f16_sized(x.size, x2, out)


@njit(cache=True)
def _round_q8_0(x, out):
    _round_q8_0_sized(x.size, x.reshape(1, x.size), out)


@njit(cache=True)
def _round_q8_k(x, out):
    _round_q8_k_sized(x.size, x.reshape(1, x.size), out)


_ROUNDERS = {None: _copy, "f16": _round_f16, "q8_0": _round_q8_0, "q8_K": _round_q8_k}


# --- one product: x (1-D) @ W.T into p's out (1, n_out), p = (raw, out, bias, scratch...); `threads`: numba's
# thread count, which a cached build cannot ask for itself (get_num_threads in compiled code is a dynamic global) ---

@njit(inline="always")
def _in_parallel(n_weights, threads):
    """Whether a product of n_weights runs on the worker threads: small ones, and any at one thread, run on the
    calling thread (waking the workers costs more than they save)."""
    return n_weights >= PARALLEL_MIN_WEIGHTS and threads > 1


def _codes_product(p, x, threads):
    raw, out, bias, q, d, sums = p
    _PREP(x, q, d, sums)
    if _in_parallel(raw.shape[0] * x.size, threads):
        _PARALLEL(raw, q, d, sums, out)
    else:
        _SERIAL(raw, q, d, sums, out)
    _add_bias(out, bias)


def _float_product(p, x, threads):
    raw, out, bias, rounded = p
    _PREP(x, rounded)
    if _in_parallel(raw.shape[0] * x.size, threads):
        _PARALLEL(raw, rounded, out, 1)
    else:
        _SERIAL(raw, rounded, out, 1)
    _add_bias(out, bias)


# --- products of one input side by side (q, k, v; gate, up): each prepares its input (its own codes or rounding, as
# alone), then one parallel loop takes chunks of GROUP_ROWS rows of any of the matrices, each chunk by the product's
# serial kernel on those rows: a row's value is the same as alone, and the two or three products cost one start of
# the worker threads and one wait for them, not one each ---
GROUP_ROWS = 32
_PREP_A = _PREP_B = _PREP_C = _ROWS_A = _ROWS_B = _ROWS_C = None
_THREE = True


def _codes_prep(p, x):
    raw, out, bias, q, d, sums = p
    _PREP(x, q, d, sums)


def _codes_rows(p, r0, r1):
    raw, out, bias, q, d, sums = p
    _SERIAL(raw[r0:r1], q, d, sums, out[:, r0:r1])


def _float_prep(p, x):
    _PREP(x, p[3])


def _float_rows(p, r0, r1):
    raw, out, bias, rounded = p
    _SERIAL(raw[r0:r1], rounded, out[:, r0:r1], 1)


def _group(pa, pb, pc, x, threads):
    """pa, pb and (if the build's _THREE) pc: the products of x side by side. A pair's build takes pb again as pc
    and leaves it alone."""
    _PREP_A(pa, x)
    _PREP_B(pb, x)
    if _THREE:
        _PREP_C(pc, x)
    na, nb, nc = pa[0].shape[0], pb[0].shape[0], pc[0].shape[0] if _THREE else 0
    if _in_parallel((na + nb + nc) * x.size, threads):
        ca = (na + GROUP_ROWS - 1) // GROUP_ROWS
        cb = (nb + GROUP_ROWS - 1) // GROUP_ROWS
        cc = (nc + GROUP_ROWS - 1) // GROUP_ROWS
        for i in prange(ca + cb + cc):
            if i < ca:
                _ROWS_A(pa, i * GROUP_ROWS, min(na, (i + 1) * GROUP_ROWS))
            elif i < ca + cb:
                j = i - ca
                _ROWS_B(pb, j * GROUP_ROWS, min(nb, (j + 1) * GROUP_ROWS))
            else:
                j = i - ca - cb
                _ROWS_C(pc, j * GROUP_ROWS, min(nc, (j + 1) * GROUP_ROWS))
    else:
        _ROWS_A(pa, 0, na)
        _ROWS_B(pb, 0, nb)
        if _THREE:
            _ROWS_C(pc, 0, nc)
    _add_bias(pa[1], pa[2])
    _add_bias(pb[1], pb[2])
    if _THREE:
        _add_bias(pc[1], pc[2])


@dataclass(frozen=True)
class Product:
    """How one weight multiplies its input in forward's decoding step: `codes` "q8_K" / "q8_0" (the input's integer
    codes times the stored blocks) or None (the input rounded as `rounding` says, times the stored rows by matvec's
    float kernel)."""
    qtype: qdot.T
    codes: str | None
    rounding: str | None

    @property
    def name(self) -> str:
        return f"{self.codes or 'float'}_{self.rounding}_{self.qtype.name}"

    def scratch(self, n_in: int) -> tuple[np.ndarray, ...]:
        if self.codes == "q8_K":
            return np.empty(n_in, np.int8), np.empty(n_in // 256, np.float32), np.empty(n_in // 16, np.int16)
        if self.codes == "q8_0":
            return np.empty(n_in, np.int8), np.empty(n_in // 32, np.float32), np.empty(n_in // 32, np.int32)
        return (np.empty((1, n_in), np.float32),)


_products: dict[Product, object] = {}
_parts: dict[Product, tuple] = {}
_groups: dict[tuple[Product, ...], object] = {}


def _kernels(product: Product) -> tuple:
    """(prepare the input, the parallel kernel, the serial kernel) of a product: qdot's quantizer of the input and
    its one-row builds for integer codes; the rounding and matvec's float kernels for floats."""
    if product.codes is not None:
        builds = qdot.row_builds(product.qtype)
        quantize = qdot._quantize_q8_k if product.codes == "q8_K" else qdot._quantize_q8_0
        return quantize, builds[True], builds[False]
    parallel, serial = matvec._variants(product.qtype)
    return _ROUNDERS[product.rounding], parallel[0], serial[0]


def _product_parts(product: Product):
    """(prepare the input, rows r0:r1 by the serial kernel) builds of a product, for _group."""
    parts = _parts.get(product)
    if parts is None:
        prep, _, serial = _kernels(product)
        codes = product.codes is not None
        parts = _parts[product] = (
            specialize(_codes_prep if codes else _float_prep, f"step_prep_{product.name}", {"_PREP": prep}),
            specialize(_codes_rows if codes else _float_rows, f"step_rows_{product.name}", {"_SERIAL": serial}))
    return parts


def _group_build(products: tuple[Product, ...]):
    """The build that runs these two or three products of one input side by side (_group)."""
    build = _groups.get(products)
    if build is None:
        parts = [_product_parts(product) for product in products]
        parts += parts[-1:] * (3 - len(parts))
        consts = {"_THREE": len(products) == 3}
        for letter, (prep, rows) in zip("ABC", parts):
            consts[f"_PREP_{letter}"], consts[f"_ROWS_{letter}"] = prep, rows
        build = _groups[products] = specialize(_group, "step_group_" + "_".join(p.name for p in products), consts,
                                               parallel=True)
    return build


def _product_build(product: Product):
    build = _products.get(product)
    if build is None:
        prep, parallel, serial = _kernels(product)
        template = _codes_product if product.codes is not None else _float_product
        build = _products[product] = specialize(template, f"step_product_{product.name}",
                                                {"_PREP": prep, "_PARALLEL": parallel, "_SERIAL": serial})
    return build


# --- one layer ---------------------------------------------------------------------------------------------------

def _layer(x, attn_norm, ffn_norm, q_norm, k_norm, eps, rope, cos, sin, neox, scale, keys, values, start, slopes,
           pq, pk, pv, po, pg, pu, pd, h, context, threads):
    """forward's layer for one token of one sequence at position `start`: x (1, n_embd) in place; keys / values the
    layer's F16 cache (n_kv, capacity, d) as uint16; h (1, n_embd) and context (n_kv, n_group, d) work buffers."""
    n_kv, n_group, d = context.shape
    q, k, v = pq[1], pk[1], pv[1]
    _rms(x.size, x, attn_norm, eps, h)
    _PQKV(pq, pk, pv, h[0], threads)
    if q_norm.size:
        _rms(q.size, q.reshape(n_kv * n_group, d), q_norm, eps, q.reshape(n_kv * n_group, d))
        _rms(k.size, k.reshape(n_kv, d), k_norm, eps, k.reshape(n_kv, d))
    if rope:
        _rope(q.size, q.reshape(1, n_kv * n_group, d), cos, sin, 1, neox)
        _rope(k.size, k.reshape(1, n_kv, d), cos, sin, 1, neox)
    for i in range(q.shape[1]):
        q[0, i] *= scale
    _store(k.size, k.reshape(1, n_kv, d), keys[:, start:start + 1])
    _store(v.size, v.reshape(1, n_kv, d), values[:, start:start + 1])
    _attend(q.size * (start + 1), q.reshape(n_kv, n_group, d), keys, values, start, slopes, n_group, context)
    _PO(po, context.reshape(n_kv * n_group * d), threads)
    _add_(x, po[1])
    _rms(x.size, x, ffn_norm, eps, h)
    _PGU(pg, pu, pu, h[0], threads)
    _silu(pg[1].size, pg[1], pu[1])
    _PD(pd, pg[1][0], threads)
    _add_(x, pd[1])


ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_layers: dict[tuple[Product, ...], object] = {}


def _layer_build(products: tuple[Product, ...]):
    build = _layers.get(products)
    if build is None:
        consts = {"_PQKV": _group_build(products[:3]), "_PO": _product_build(products[3]),
                  "_PGU": _group_build(products[4:6]), "_PD": _product_build(products[6])}
        build = _layers[products] = specialize(_layer, "step_layer_" + "_".join(p.name for p in products), consts)
    return build


class CompiledLayers:
    """Model.forward's layers for one token of one sequence, each one compiled call (see the module's doc)."""

    def __init__(self, model, plans: list[tuple[tuple[Product, ...], list]]):
        self.model = model
        self.products = [products for products, _ in plans]      # per layer, how its 7 weights multiply
        c = model.config
        self._layers = [(_layer_build(products), args) for products, args in plans]
        self._h = np.empty((1, c.n_embd), np.float32)
        self._context = np.empty((c.n_head_kv, c.n_group, c.head_dim), np.float32)
        self._scale = np.float32(1.0 / math.sqrt(c.head_dim))

    def run(self, il: int, x: np.ndarray, cos, sin, start: int, cache) -> None:
        """Layer `il` for the token x (1, n_embd), in place, at position `start` of the F16 `cache`."""
        fn, args = self._layers[il]
        self._call(fn, args, x, cos, sin, start, cache.k[il][0].view(np.uint16), cache.v[il][0].view(np.uint16))

    def warm_up(self) -> None:
        """Compile each distinct layer build now (or load it from numba's cache), with one call on scratch state,
        so that the first decoded token does not pay for it: qtool generate counts this as load time, as llama.cpp's
        tools count their warm-up run."""
        c = self.model.config
        x = np.zeros((1, c.n_embd), np.float32)
        keys = np.zeros((c.n_head_kv, 1, c.head_dim), np.uint16)
        cos, sin = self.model._rope_tables(0, 1) if c.position == "rope" else (None, None)
        done = set()
        for fn, args in self._layers:
            if fn not in done:
                done.add(fn)
                self._call(fn, args, x, cos, sin, 0, keys, keys.copy())

    def _call(self, fn, args, x, cos, sin, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        c = self.model.config
        attn_norm, ffn_norm, q_norm, k_norm, products = args
        rope = cos is not None
        if not rope:
            cos = sin = np.empty((1, 0), np.float32)
        fn(x, attn_norm, ffn_norm, q_norm, k_norm, c.rms_eps, rope, cos, sin, c.rope_style == "neox", self._scale,
           keys, values, start, self.model.alibi, *products, self._h, self._context, get_num_threads())


def compiled_layers(model) -> CompiledLayers | None:
    """The compiled layers of `model` for one-token steps, or None where some layer needs forward."""
    c, w = model.config, model.weights
    if c.n_expert or c.attn_output_gate or any(c.is_recurrent(il) for il in range(c.n_layer)):
        return None
    if c.position not in ("rope", "alibi", "none") or c.ffn_norm != "ffn_norm":
        return None
    empty = np.empty(0, np.float32)
    plans = []
    for il in range(c.n_layer):
        p = f"blk.{il}."
        products, args = [], []
        for role in ROLES:
            weight = p + role + ".weight"
            qtype = w.qtype(weight)
            if w.dense(weight) is not None:
                return None
            kind = model._activation_kind(weight)
            codes = model._integer_codes(weight, kind, 1)
            if codes is None and (kind not in _ROUNDERS or matvec.kernel_for(qtype) is None):
                return None
            product = Product(qtype, codes, None if codes else kind)
            n_out, n_in = w.shape(weight)
            out = np.empty((1, n_out), np.float32)
            bias = w.get(p + role + ".bias") if w.has(p + role + ".bias") else empty
            products.append(product)
            args.append((w.stored(weight), out, np.ascontiguousarray(bias, np.float32)) + product.scratch(n_in))
        norms = [w.get(p + "attn_norm.weight"), w.get(p + "ffn_norm.weight")]
        norms += ([w.get(p + "attn_q_norm.weight"), w.get(p + "attn_k_norm.weight")] if c.qk_norm else [empty, empty])
        plans.append((tuple(products), [*(np.ascontiguousarray(n, np.float32) for n in norms), tuple(args)]))
    return CompiledLayers(model, plans)
