"""What each tensor's type costs in KL divergence, measured, and the best mix for a bits-per-weight target.

The model of the cost: quantizing tensor i to type t adds
    KLD_i(t) = g_i · E_i(t),    E_i(t) = Σ_rows Σ_cols imatrix[col] · (W - deq(quant_t(W)))²[row, col]
and tensors add up: KLD(mix) = Σ_i KLD_i(t_i).

* E_i(t) is exact and cheap: the tensor is quantized with the very kernel (and imatrix) `quantize_model` will use,
  and E is the expected squared error of the product's output per token (the imatrix holds the mean squared
  input of each column), i.e. the noise the type injects where the tensor acts.
* g_i turns that noise into KL divergence of the next-token distribution, and it is *measured*: the tensor alone
  is replaced by its quantization to a reference type (the admissible candidate closest to 4.5 bpw), the model
  runs on calibration text, and g_i = ΔKLD / E_i(reference). For small perturbations KLD is quadratic in the
  logit change, hence linear in the injected power E, so one point per tensor fixes the line; using a real
  quantization error as the probe (not synthetic noise) keeps its structure — per-block scales, outliers, the
  imatrix's influence — the one the other types produce. Measuring per tensor instead of per tensor class or
  layer group catches what the hand-written rules cannot see (the first and last layers, attn_v vs attn_k, the
  tied embedding being also the output projection, which counts once in the budget and in the sensitivity).
* Cost: one forward pass over the calibration chunks per quantizable tensor (211 for SmolLM2-135M), in float32
  activations so the unperturbed model is the exact reference. With the default 1 chunk of 512 tokens that is
  ~211 chunk passes, well under one llama-perplexity run over WikiText-2 (~580 chunks). A Fisher/gradient
  estimate would need a backward pass the numpy model does not have; perturbing whole layer groups would save
  passes but could no longer tell the tensors of a group apart, which is exactly the choice to be made.

The choice itself is a multiple-choice knapsack solved by mix.solve_budget. Tensors llama-quantize never
quantizes (norms, 1-D) keep their type and their bytes count in the budget, as they count in the file's bpw.

It lives in qtool/, beside pipeline.py, because it composes two stages: quantize/ (errors, the solver, the mix
file) and evaluate/ (the forward passes). quantize/ never imports evaluate/ (evaluate/ asks quantize/formats.py to
decode, and nothing else of it), so code that runs the model to price a quantization belongs above both.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.gguf_io import tensor_nbytes
from qtool.quantize import formats
from qtool.quantize.mix import MixFile, admissible_types, file_type_for_mix, parse_candidates, solve_budget
from qtool.quantize.formats import bits_per_weight
from qtool.quantize.mixtures import FLOAT_TYPES, FileType, layer_of, layer_spans

REFERENCE_BPW = 4.5          # the operating point where each tensor's gain is measured
DEFAULT_CTX = 512


@dataclass
class TensorSensitivity:
    name: str
    shape: tuple[int, ...]
    types: list[T]                  # what this tensor may become (admissible candidates, or its one forced type)
    nbytes: list[int]
    error: list[float]              # imatrix-weighted squared error of each type (0 for a lossless one)
    reference: T | None = None      # the probe type (None: every type is lossless, nothing to measure)
    reference_error: float = 0.0
    kld_at_reference: float = 0.0   # measured mean KLD with only this tensor quantized to the reference type

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def gain(self) -> float:
        if self.reference is None or self.reference_error <= 0:
            return 0.0
        return self.kld_at_reference / self.reference_error

    def predicted_kld(self, j: int) -> float:
        return self.gain * self.error[j]


@dataclass
class Sensitivity:
    source: Path
    source_sha256: str
    imatrix: str | None
    imatrix_sha256: str | None
    candidates: list[T]
    calibration: str
    calibration_tokens: int
    n_params: int
    fixed_bytes: int                          # tensors llama-quantize never quantizes, kept as they are
    tensors: list[TensorSensitivity]
    error_seconds: float = 0.0
    gain_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def restricted(self, candidates: Sequence[T] | str) -> "Sensitivity":
        """The same measurement with fewer candidate types (the gains stay valid: they do not depend on the set)."""
        keep = parse_candidates(candidates)
        tensors = []
        for t in self.tensors:
            if len(t.types) == 1 and t.types[0] not in self.candidates:     # forced (F16): not a candidate
                tensors.append(t)
                continue
            js = [j for j, qtype in enumerate(t.types) if qtype in keep]
            if not js:
                raise QtoolError(f"no candidate left for tensor {t.name}: it admits only "
                                 + ", ".join(q.name for q in t.types))
            tensors.append(replace(t, types=[t.types[j] for j in js], nbytes=[t.nbytes[j] for j in js],
                                   error=[t.error[j] for j in js]))
        return replace(self, candidates=[c for c in self.candidates if c in keep], tensors=tensors)

    @property
    def min_bpw(self) -> float:
        return 8.0 * (self.fixed_bytes + sum(min(t.nbytes) for t in self.tensors)) / self.n_params

    @property
    def max_bpw(self) -> float:
        return 8.0 * (self.fixed_bytes + sum(max(t.nbytes) for t in self.tensors)) / self.n_params


@dataclass
class MixChoice:
    sensitivity: Sensitivity
    target_bpw: float
    chosen: list[int]                          # index into each tensor's types

    @property
    def types(self) -> dict[str, T]:
        return {t.name: t.types[j] for t, j in zip(self.sensitivity.tensors, self.chosen)}

    @property
    def nbytes(self) -> int:
        return self.sensitivity.fixed_bytes + sum(t.nbytes[j] for t, j in zip(self.sensitivity.tensors, self.chosen))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.sensitivity.n_params

    @property
    def predicted_kld(self) -> float:
        return sum(t.predicted_kld(j) for t, j in zip(self.sensitivity.tensors, self.chosen))

    @property
    def file_type(self) -> FileType:
        return file_type_for_mix(self.types, {t.name: t.n_elements for t in self.sensitivity.tensors})

    def mix_file(self) -> MixFile:
        s = self.sensitivity
        provenance = {
            "made_by": "qtool quantize --target-bpw",
            "target_bpw": self.target_bpw, "achieved_bpw": round(self.bits_per_weight, 6),
            "tensor_bytes": self.nbytes, "predicted_kld": self.predicted_kld,
            "source": str(s.source), "source_sha256": s.source_sha256,
            "imatrix": s.imatrix, "imatrix_sha256": s.imatrix_sha256,
            "candidates": [t.name for t in s.candidates],
            "calibration": s.calibration, "calibration_tokens": s.calibration_tokens,
            "sensitivity_seconds": round(s.error_seconds + s.gain_seconds, 1),
        }
        return MixFile(self.types, provenance)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def weighted_error(x: np.ndarray, qtype: T, weights: np.ndarray | None, column_weight: np.ndarray) -> float:
    """Σ column_weight[col] · (x - deq(quant(x)))² over a (rows, cols) float32 tensor; `weights` is what the
    quantizer gets (the imatrix, or None), `column_weight` what the error is measured with."""
    n = x.shape[-1]
    if qtype in FLOAT_TYPES:
        if qtype == T.F32:
            return 0.0
        diff = formats.dequantize(formats.quantize(x, qtype), qtype, n) - x
    else:
        diff = formats.dequantize(formats.quantize(x, qtype, weights), qtype, n) - x
    return float(np.einsum("rc,rc->c", diff, diff, dtype=np.float64) @ column_weight.astype(np.float64))


Progress = Callable[[str, int, int], None]      # (phase, done, total)


def measure_sensitivity(input_path: str | Path, *, imatrix: str | Path | None, calibration: str,
                        candidates: Sequence[T] | str | None = None, n_chunks: int = 1, n_ctx: int = DEFAULT_CTX,
                        allow_requantize: bool = False, target_bpw: float | None = None,
                        progress: Progress | None = None) -> Sensitivity:
    """Every quantizable tensor's error under every admissible candidate, and its measured KLD gain.

    `target_bpw`, when given, is only checked against the smallest size these candidates allow (before the work).
    """
    from qtool.quantize.quantizer import QuantizeOptions, plan_quantization

    candidates = parse_candidates(candidates)
    if n_chunks <= 0:
        raise QtoolError("--chunks must be positive")
    input_path = Path(input_path)
    # the plan with a 32-element type validates the model and the imatrix exactly as the real run will
    plan = plan_quantization(input_path, QuantizeOptions(FileType.Q8_0, imatrix=imatrix,
                                                         allow_requantize=allow_requantize), dry_run=True)
    fixed_bytes, todo = 0, []
    for c in plan.choices:
        if not c.quantizable:
            fixed_bytes += tensor_nbytes(c.shape, c.source_type)
        elif c.source_type not in FLOAT_TYPES and not allow_requantize:
            raise QtoolError(f"tensor {c.name} is already quantized ({c.source_type.name}); choose a mix from an "
                             f"F32/F16/BF16 file, or pass --allow-requantize")
        else:
            todo.append(c)
    n_params = sum(c.n_elements for c in plan.choices)
    if target_bpw is not None:      # before minutes of measuring
        smallest = fixed_bytes + sum(min(tensor_nbytes(c.shape, t) for t in
                                         admissible_types(candidates, c.shape[-1]) or [T.F16]) for c in todo)
        _check_target(target_bpw, 8.0 * smallest / n_params, candidates)

    t0 = time.perf_counter()
    tensors: list[TensorSensitivity] = []
    for k, c in enumerate(todo):
        types = admissible_types(candidates, c.shape[-1]) or [T.F16]   # llama-quantize's last resort too
        mats, weights = _matrices(plan, c)
        errors = [sum(weighted_error(x, t, w, np.ones(x.shape[-1], np.float32) if w is None else w)
                      for x, w in zip(mats, weights)) for t in types]
        ts = TensorSensitivity(c.name, tuple(c.shape), types, [tensor_nbytes(c.shape, t) for t in types], errors)
        lossy = [j for j, e in enumerate(errors) if e > 0]
        if lossy:
            j = min(lossy, key=lambda j: (abs(bits_per_weight(types[j]) - REFERENCE_BPW), j))
            ts.reference, ts.reference_error = types[j], errors[j]
        tensors.append(ts)
        if progress is not None:
            progress("errors", k + 1, len(todo))
    error_seconds = time.perf_counter() - t0

    sens = Sensitivity(input_path, file_sha256(input_path), None if imatrix is None else str(imatrix),
                       None if imatrix is None else file_sha256(imatrix), candidates, "", 0, n_params, fixed_bytes,
                       tensors, error_seconds, notes=list(plan.notes))
    t1 = time.perf_counter()
    measure_gains(plan, sens, calibration, n_chunks=n_chunks, n_ctx=n_ctx, progress=progress)
    sens.gain_seconds = time.perf_counter() - t1
    return sens


def _matrices(plan, choice) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """The tensor as float32 (rows, cols) matrices (one per expert of a 3-D tensor) and the imatrix slice each
    is quantized with — the same as quantize_model uses (None where it quantizes without one)."""
    info = plan.infos[choice.name]
    n_cols = choice.shape[-1]
    n_mat = choice.shape[0] if len(choice.shape) >= 3 else 1
    x = plan.source.array(info).reshape(n_mat, -1, n_cols)
    w = plan.weights.get(choice.name)
    if w is None or w.size != n_cols * n_mat:      # llama-quantize's exception for the token embedding, too
        return list(x), [None] * n_mat
    return list(x), [w[m * n_cols:(m + 1) * n_cols] for m in range(n_mat)]


def measure_gains(plan, sens: Sensitivity, calibration: str, *, n_chunks: int, n_ctx: int,
                  progress: Progress | None = None) -> None:
    """Fill each tensor's kld_at_reference: mean KL(model || model with that one tensor at its reference type)
    over every position of `n_chunks` calibration chunks, float32 activations."""
    from qtool.evaluate.datasets import load_eval_text
    from qtool.evaluate.model import Model
    from qtool.evaluate.perplexity import chunk_inputs, chunked_tokens, kl_divergence, log_softmax_nll
    from qtool.evaluate.weights import GGUFWeights

    class SwappedWeights(GGUFWeights):
        """The model's weights with some tensors replaced (the probe), whatever the memory mode."""

        def __init__(self, path: Path):
            super().__init__(path)
            self.swapped: dict[str, np.ndarray] = {}

        def dense(self, name: str) -> np.ndarray | None:
            return self.swapped[name] if name in self.swapped else super().dense(name)

        def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
            return self.swapped[name][np.asarray(ids)] if name in self.swapped else super().rows(name, ids)

    weights = SwappedWeights(sens.source)
    model = Model(weights, activations="float32")
    if n_ctx > model.config.context_length:
        raise QtoolError(f"--ctx {n_ctx} exceeds the model's context length {model.config.context_length}")
    text = load_eval_text(calibration)
    tokens, n, bos = chunked_tokens(weights.gguf, text.text, n_ctx, n_chunks, what=f"calibration text {text.name}")
    inputs, _ = chunk_inputs(tokens, 0, n, n_ctx, bos)
    sens.calibration, sens.calibration_tokens = text.name, n * n_ctx
    if n < n_chunks:
        sens.notes.append(f"the calibration text has {n} chunks of {n_ctx} tokens; measured on those")

    def logits_of(chunk: np.ndarray) -> np.ndarray:
        return model.forward(chunk[None])[0]

    base = [logits_of(inputs[i]) for i in range(n)]
    base_log_z = [log_softmax_nll(b, np.zeros(len(b), np.int64))[0] for b in base]
    measured = [t for t in sens.tensors if t.reference is not None]
    for k, ts in enumerate(measured):
        choice = next(c for c in plan.choices if c.name == ts.name)
        mats, ws = _matrices(plan, choice)
        r = ts.reference
        probe = np.stack([formats.dequantize(formats.quantize(x, r, w), r, x.shape[-1]) for x, w in zip(mats, ws)])
        weights.swapped[ts.name] = probe.reshape(plan.infos[ts.name].shape)
        try:
            klds = [kl_divergence(base[i], base_log_z[i], logits_of(inputs[i])) for i in range(n)]
        finally:
            weights.swapped.clear()
        ts.kld_at_reference = float(np.mean(np.concatenate(klds)))
        if progress is not None:
            progress("gains", k + 1, len(measured))


def _check_target(target_bpw: float, min_bpw: float, candidates: Sequence[T]) -> None:
    if not math.isfinite(target_bpw) or target_bpw <= 0:
        raise QtoolError(f"--target-bpw must be a positive number, got {target_bpw}")
    if target_bpw < min_bpw:
        smallest = min(candidates, key=bits_per_weight)
        raise QtoolError(f"--target-bpw {target_bpw:g} is below the smallest this model admits with these "
                         f"candidates: {min_bpw:.4f} bpw (every tensor at its smallest admissible type, e.g. "
                         f"{smallest.name}; norms stay as they are)")


def choose_mix(sens: Sensitivity, target_bpw: float) -> MixChoice:
    """The mix of least predicted KLD whose tensor data is at most target_bpw bits per weight (all tensors)."""
    _check_target(target_bpw, sens.min_bpw, sens.candidates)
    budget = math.floor(target_bpw * sens.n_params / 8)
    chosen = solve_budget([t.nbytes for t in sens.tensors], [[t.predicted_kld(j) for j in range(len(t.types))]
                                                                for t in sens.tensors], budget - sens.fixed_bytes)
    return MixChoice(sens, target_bpw, chosen)


def mix_rows(types: dict[str, T]) -> list[tuple[str, str]]:
    """(tensor class, its types by layer) — `0-2 Q5_0 · 3-29 Q4_0` — for printing a mix compactly."""
    by_class: dict[str, list[tuple[int, str]]] = {}
    for name, qtype in types.items():
        layer = layer_of(name)
        key = name.split(".", 2)[2].removesuffix(".weight") if layer >= 0 else name.removesuffix(".weight")
        by_class.setdefault(key, []).append((layer, qtype.name))
    rows = []
    for key, items in by_class.items():
        items.sort()
        if items[0][0] < 0:
            rows.append((key, ", ".join(t for _, t in items)))
            continue
        rows.append((key, " · ".join(f"{a}{'' if a == b else f'-{b}'} {t}" for a, b, t in layer_spans(items))))
    order = {c: i for i, c in enumerate(("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output",
                                         "ffn_gate", "ffn_up", "ffn_down"))}
    return sorted(rows, key=lambda r: (order.get(r[0], len(order)), r[0]))


def read_mix_for(mix_path: str | Path, input_path: str | Path, imatrix: str | Path | None,
                 warn: Callable[[str], None]) -> tuple[MixFile, float | None]:
    """A mix file to apply to `input_path` (with `imatrix`): the mix and its predicted mean KLD, None when the
    prediction does not hold for this input (each reason goes to `warn`)."""
    from qtool.quantize.mix import read_mix

    mix = read_mix(mix_path)
    warnings = mix_warnings(mix, input_path, imatrix)
    for warning in warnings:
        warn(warning)
    return mix, None if warnings else mix.predicted_kld


def mix_warnings(mix: MixFile, input_path: str | Path, imatrix: str | Path | None) -> list[str]:
    """A mix applied to another file or with another imatrix than it was chosen for still works, but its
    predicted KLD no longer holds: say so."""
    p = mix.provenance
    notes = []
    if p.get("source_sha256") and Path(input_path).is_file() and file_sha256(input_path) != p["source_sha256"]:
        notes.append(f"warning: the mix was chosen for another file ({p.get('source')}); its predicted KLD does "
                     f"not apply to {input_path}")
    wanted = p.get("imatrix_sha256")
    given = file_sha256(imatrix) if imatrix is not None and Path(imatrix).is_file() else None
    if wanted != given and (wanted or given) and "source_sha256" in p:
        notes.append("warning: the mix was chosen with " + (f"imatrix {p.get('imatrix')}" if wanted else "no imatrix")
                     + "; this run quantizes " + (f"with {imatrix}" if given else "without one"))
    return notes
