"""HF checkpoint directory -> GGUF file: plan (names, shapes, types, metadata), then stream it out."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from qtool.errors import QtoolError
from qtool.gguf_io import (KV, PlannedTensor, Progress, preview_kvs, shard_paths, split_groups, tensor_nbytes,
                           write_gguf)

from .checkpoint import Checkpoint
from .models import (EXPERT_GGUF, EXPERT_PROJS, F32_WEIGHTS, ModelSpec, OutTensor, arch_kvs, expected_hf_tensors,
                     expert_hf_name, gguf_name, llama3_rope_factors, model_spec, normhead, parse_expert_name,
                     permute_rows, read_config, _SKIPPED_SUFFIXES)
from . import qwen35
from .tokenizer import export_vocab

OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_WEIGHT_QTYPE = {
    LlamaFileType.ALL_F32: GGMLQuantizationType.F32,
    LlamaFileType.MOSTLY_F16: GGMLQuantizationType.F16,
    LlamaFileType.MOSTLY_BF16: GGMLQuantizationType.BF16,
    LlamaFileType.MOSTLY_Q8_0: GGMLQuantizationType.Q8_0,
}


@dataclass
class ConversionPlan:
    model_dir: Path
    spec: ModelSpec
    ftype: LlamaFileType
    metadata: gguf.Metadata
    kvs: list[KV]                       # after general.* metadata: arch keys, quantization version, vocab
    tensors: list[OutTensor]
    notes: list[str] = field(default_factory=list)
    checkpoint: Checkpoint | None = None

    @property
    def outtype_label(self) -> str:
        return self.ftype.name.partition("_")[2]      # MOSTLY_Q8_0 -> Q8_0, as llama.cpp names files

    def default_filename(self, vocab_only: bool = False) -> str:
        m = self.metadata
        if vocab_only:
            stem = gguf.naming_convention(m.name, m.basename, m.finetune, m.version, size_label=None,
                                          output_type=None, model_type="vocab")
        else:
            stem = gguf.naming_convention(m.name, m.basename, m.finetune, m.version, m.size_label,
                                          self.outtype_label)
        return stem + ".gguf"

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


def plan_conversion(model_dir: Path, outtype: str = "auto", *, pre: str | None = None,
                    normhead_override: bool | None = None, model_name: str | None = None,
                    vocab_only: bool = False, no_mtp: bool = False) -> ConversionPlan:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QtoolError(f"{model_dir}: not a directory")
    config = read_config(model_dir)
    spec = model_spec(config, normhead=normhead_override, model_dir=model_dir, no_mtp=no_mtp)
    notes: list[str] = []

    ckpt = None if vocab_only else Checkpoint(model_dir)
    try:
        tensors = [] if ckpt is None else _plan_tensors(spec, ckpt, notes)
        ftype = _resolve_outtype(outtype, ckpt, tensors)
        tensors = [_with_type(t, ftype, notes) for t in tensors]

        total_params = sum(int(np.prod(t.shape)) for t in tensors)
        metadata = gguf.Metadata.load(None, model_dir, model_name, total_params)
        if metadata.name is None:
            metadata.name = model_dir.name
        if metadata.size_label is None and total_params > 0:
            metadata.size_label = gguf.size_label(*_parameter_counts(tensors))

        kvs, arch_notes = arch_kvs(spec, ftype)
        notes += arch_notes
        kvs.append(KV("general.quantization_version", gguf.GGML_QUANT_VERSION, GGUFValueType.UINT32))
        vocab, vocab_notes = export_vocab(model_dir, spec.hparams, spec.arch.vocab_kind, pre)
        notes += vocab_notes
        kvs += vocab
        _check_vocab_fits(spec, kvs)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    return ConversionPlan(model_dir, spec, ftype, metadata, kvs, tensors, notes, ckpt)


def _check_vocab_fits(spec: ModelSpec, kvs: list[KV]) -> None:
    tokens = next((kv.value for kv in kvs if kv.key == "tokenizer.ggml.tokens"), None)
    if tokens is not None and len(tokens) != spec.n_vocab:
        raise QtoolError(f"tokenizer has {len(tokens)} tokens but config.json vocab_size is {spec.n_vocab}")


def _resolve_outtype(outtype: str, ckpt: Checkpoint | None, tensors: list[OutTensor]) -> LlamaFileType:
    outtype = outtype.lower()
    if outtype in OUTTYPES:
        return OUTTYPES[outtype]
    if outtype != "auto":
        raise QtoolError(f"unknown --outtype {outtype!r}; choose one of: {', '.join([*OUTTYPES, 'auto'])}")
    # llama.cpp's rule: the dtype of the first tensor with two or more dims decides (bf16 stays bf16).
    if ckpt is not None:
        for t in tensors:
            if len(t.shape) >= 2 and t.source in ckpt.names:
                return LlamaFileType.MOSTLY_BF16 if ckpt.dtype(t.source) == "BF16" else LlamaFileType.MOSTLY_F16
    return LlamaFileType.MOSTLY_F16


def _parameter_counts(tensors: list[OutTensor]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) as gguf's GGUFWriter.get_total_parameter_count counts them."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = int(np.prod(t.shape))
        if "_exps." in t.name and len(t.shape) >= 3:
            n = t.shape[-2 if ".bias" in t.name else -3]
            expert += size // n
            expert_sum += n
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def _with_type(t: OutTensor, ftype: LlamaFileType, notes: list[str]) -> OutTensor:
    # Norms, biases, every 1-D tensor and the MoE routers stay F32 (llama.cpp's runtime expects that).
    if (len(t.shape) <= 1 or t.name.endswith("_norm.weight") or not t.name.endswith(".weight")
            or t.name.endswith(F32_WEIGHTS)):
        qtype = GGMLQuantizationType.F32
    else:
        qtype = _WEIGHT_QTYPE[ftype]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.shape[-1] % block:
            notes.append(f"{t.name}: row length {t.shape[-1]} is not a multiple of {block}; written as F16")
            qtype = GGMLQuantizationType.F16
    return OutTensor(t.name, t.shape, qtype, t.load, t.source)


def _plan_tensors(spec: ModelSpec, ckpt: Checkpoint, notes: list[str]) -> list[OutTensor]:
    if spec.arch.hybrid:
        return _plan_hybrid_tensors(spec, ckpt, notes)
    expected = expected_hf_tensors(spec)
    present = [n for n in ckpt.names if not n.endswith(_SKIPPED_SUFFIXES)]
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        raise QtoolError(f"unexpected tensor {unexpected[0]!r} in {ckpt.part_of(unexpected[0]).name} "
                         f"(not part of a {spec.hf_arch} with this config"
                         + (f"; {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + ")")
    optional = set() if spec.arch.output_required else {"lm_head.weight"}
    missing = [n for n in expected if n not in present and n not in optional]
    if missing:
        raise QtoolError(f"tensor {missing[0]!r} is missing from the checkpoint"
                         + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    for n in present:
        if tuple(ckpt.shape(n)) != expected[n]:
            raise QtoolError(f"tensor {n!r} has shape {list(ckpt.shape(n))}, but config.json implies {list(expected[n])}")

    out: list[OutTensor] = []
    factors = llama3_rope_factors(spec) if spec.arch.gguf_name == "llama" else None
    if factors is not None:
        out.append(OutTensor("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, lambda f=factors: f, ""))

    cache = _LastTensor(ckpt)
    experts_seen: dict[int, int] = {}
    for hf in present:
        if (expert := parse_expert_name(hf)) is not None:
            # llama.cpp emits a layer's three stacks where the last of its expert tensors comes in the checkpoint
            layer = expert[0]
            experts_seen[layer] = experts_seen.get(layer, 0) + 1
            if experts_seen[layer] == len(EXPERT_PROJS) * spec.n_expert:
                out += _stacked_experts(spec, layer, ckpt, cache)
            continue
        if hf.endswith("self_attn.W_pack.weight"):
            out += _split_w_pack(spec, hf, cache)
            continue
        name = gguf_name(hf)
        assert name is not None  # every expected tensor has a GGUF name
        load = cache.loader(hf)
        if spec.arch.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            load = _permuted(load, spec.n_head)
        elif spec.arch.permute_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            load = _permuted(load, spec.n_head_kv)
        elif hf == "lm_head.weight" and spec.is_baichuan2:
            load = _normheaded(load)
            notes.append("Baichuan2 NormHead applied: every output.weight row divided by its L2 norm (float32)")
        out.append(OutTensor(name, tuple(ckpt.shape(hf)), GGMLQuantizationType.F32, load, hf))
    return out


def _plan_hybrid_tensors(spec: ModelSpec, ckpt: Checkpoint, notes: list[str]) -> list[OutTensor]:
    """Qwen3.5 / Qwen3.5-MoE: every tensor in checkpoint order, one at a time (the fused experts of one layer are
    the largest thing in memory), the vision tower of a ConditionalGeneration checkpoint skipped."""
    hs = spec.hybrid
    assert hs is not None
    canonical_names: dict[str, str | None] = {n: qwen35.canonical_name(n, spec.n_layer) for n in ckpt.names
                                              if not n.endswith(_SKIPPED_SUFFIXES)}
    per_expert = spec.arch.moe and qwen35.per_expert_layout(c for c in canonical_names.values() if c)
    expected = qwen35.expected_tensors(spec, per_expert)
    present: dict[str, str] = {}           # canonical name -> checkpoint name
    skipped = left_out = 0
    for n, canonical in canonical_names.items():
        if canonical is None:
            skipped += 1
            continue
        if hs.no_mtp and qwen35.is_mtp(n):
            left_out += 1
            continue
        if canonical not in expected:
            raise QtoolError(f"unexpected tensor {n!r} in {ckpt.part_of(n).name} (not part of a {spec.hf_arch} "
                             "with this config: layer_types, mtp_num_hidden_layers and the expert layout decide "
                             "which tensors each layer has)")
        if canonical in present:
            raise QtoolError(f"tensors {present[canonical]!r} and {n!r} are the same model tensor")
        present[canonical] = n
    missing = [c for c in expected if c not in present and c != "lm_head.weight"]
    if missing:
        multimodal = any(n.startswith("model.language_model.") for n in present.values())
        first = qwen35.checkpoint_name(missing[0], spec.n_layer, multimodal)
        raise QtoolError(f"tensor {first!r} is missing from the checkpoint"
                         + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    for canonical, n in present.items():
        if tuple(ckpt.shape(n)) != expected[canonical][1]:
            raise QtoolError(f"tensor {n!r} has shape {list(ckpt.shape(n))}, but config.json implies "
                             f"{list(expected[canonical][1])}")
    if skipped:
        notes.append(f"{skipped} vision tensor(s) skipped: this is the text model only")
    if left_out:
        notes.append(f"{left_out} MTP tensor(s) left out (--no-mtp)")
    if not qwen35.torch_available():
        notes.append("torch is not installed: ssm_a = -exp(A_log) computed with numpy, which can differ from "
                     "llama.cpp's converter (torch) in the last bit of some values")

    cache = _LastTensor(ckpt)
    out: list[OutTensor] = []
    experts_seen: dict[int, int] = {}
    for canonical, n in present.items():
        name, shape = expected[canonical]
        if (expert := qwen35.parse_expert(canonical)) is not None:
            # as llama.cpp: a layer's three stacks go out where the last of its expert tensors comes
            layer = expert[0]
            experts_seen[layer] = experts_seen.get(layer, 0) + 1
            if experts_seen[layer] == len(qwen35.EXPERT_PROJS) * spec.n_expert:
                out += _stacked_hybrid_experts(spec, layer, present, ckpt, cache)
            continue

        def load(n: str = n, canonical: str = canonical) -> np.ndarray:
            return qwen35.transform(canonical, cache.get(n), hs)

        if canonical.endswith(qwen35.FUSED_GATE_UP):
            # [gate rows; up rows] per expert -> ffn_gate_exps, then ffn_up_exps (llama.cpp splits it the same way)
            half = (shape[0], shape[1] // 2, shape[2])
            for part, g in enumerate((name, name.replace("ffn_gate_exps", "ffn_up_exps"))):
                def half_load(n: str = n, lo: int = part * half[1], hi: int = (part + 1) * half[1]) -> np.ndarray:
                    return cache.get(n)[:, lo:hi]
                out.append(OutTensor(g, half, GGMLQuantizationType.F32, half_load, n))
            continue
        if canonical.endswith("linear_attn.conv1d.weight"):
            shape = (shape[0], shape[2])
        out.append(OutTensor(name, shape, GGMLQuantizationType.F32, load, n))
    return out


def _stacked_hybrid_experts(spec: ModelSpec, layer: int, present: dict[str, str], ckpt: Checkpoint,
                            cache: "_LastTensor") -> list[OutTensor]:
    """A per-expert Qwen3.5-MoE layer's experts as three stacks, each read only when it is written."""
    return [_expert_stack(f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight",
                          [present[f"model.layers.{layer}.mlp.experts.{x}.{proj}.weight"] for x in range(spec.n_expert)],
                          ckpt, cache)
            for proj in qwen35.EXPERT_PROJS]


class _LastTensor:
    """Loads checkpoint tensors, keeping only the last one: W_pack is read once for its three parts."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.name: str | None = None
        self.data: np.ndarray | None = None

    def get(self, name: str) -> np.ndarray:
        if name != self.name:
            self.name, self.data = None, None
            data = self.ckpt.load(name)
            if not np.isfinite(data).all():
                bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
                raise QtoolError(f"tensor {name!r} contains {bad} NaN/Inf value(s)")
            self.name, self.data = name, data
        assert self.data is not None
        return self.data

    def loader(self, name: str) -> Callable[[], np.ndarray]:
        return lambda: self.get(name)


def _permuted(load: Callable[[], np.ndarray], n_head: int) -> Callable[[], np.ndarray]:
    return lambda: permute_rows(load(), n_head)


def _normheaded(load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    return lambda: normhead(load())


def _split_w_pack(spec: ModelSpec, hf: str, cache: _LastTensor) -> list[OutTensor]:
    """Baichuan's fused W_pack rows are [q; k; v]; q and k get the rotary permutation (Baichuan is MHA)."""
    layer = int(hf.split(".")[2])
    rows = spec.n_embd
    shape = (rows, spec.n_embd)

    def part(i: int, permute: bool) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            w = cache.get(hf)[i * rows:(i + 1) * rows]
            return permute_rows(w, spec.n_head) if permute else w
        return load

    return [OutTensor(f"blk.{layer}.attn_q.weight", shape, GGMLQuantizationType.F32, part(0, True), hf),
            OutTensor(f"blk.{layer}.attn_k.weight", shape, GGMLQuantizationType.F32, part(1, True), hf),
            OutTensor(f"blk.{layer}.attn_v.weight", shape, GGMLQuantizationType.F32, part(2, False), hf)]


def _stacked_experts(spec: ModelSpec, layer: int, ckpt: Checkpoint, cache: _LastTensor) -> list[OutTensor]:
    """One layer's routed experts as three (n_expert, rows, cols) tensors, each stacked only when it is written.

    At most one stack is in memory at a time (plus one expert), so a checkpoint of any size converts in the memory
    of its largest layer stack. Float16 experts stack as float16; anything else (bf16, f32) as float32, as
    llama.cpp's converter widens them before torch.stack.
    """
    return [_expert_stack(f"blk.{layer}.{EXPERT_GGUF[proj]}",
                          [expert_hf_name(layer, x, proj) for x in range(spec.n_expert)], ckpt, cache)
            for proj in EXPERT_PROJS]


def _expert_stack(gguf_name: str, names: list[str], ckpt: Checkpoint, cache: "_LastTensor") -> OutTensor:
    """The experts `names` (HF tensors, in expert order) as one (n_expert, rows, cols) tensor, read when written."""
    dtype = np.float16 if all(ckpt.dtype(n) == "F16" for n in names) else np.float32

    def load() -> np.ndarray:
        first = cache.get(names[0])
        stack = np.empty((len(names), *first.shape), dtype=dtype)
        for x, name in enumerate(names):
            stack[x] = cache.get(name)
        return stack

    return OutTensor(gguf_name, (len(names), *ckpt.shape(names[0])), GGMLQuantizationType.F32, load, names[0])


def _prepare_general(plan: ConversionPlan) -> Callable[[gguf.GGUFWriter], None]:
    def prepare(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        plan.metadata.set_gguf_meta_model(writer)
    return prepare


def all_kvs(plan: ConversionPlan) -> list[KV]:
    """Every key the file will carry, in order (general.* included), for --dry-run and tests."""
    return preview_kvs(plan.spec.arch.gguf_name, plan.kvs, _prepare_general(plan))


def write_plan(plan: ConversionPlan, outfile: Path, *, vocab_only: bool = False, split_max_tensors: int = 0,
               split_max_size: int = 0, force: bool = False, progress: Progress | None = None) -> list[Path]:
    tensors = [] if vocab_only else [PlannedTensor(t.name, t.shape, t.qtype, t.load) for t in plan.tensors]
    if vocab_only and (split_max_tensors or split_max_size):
        raise QtoolError("--vocab-only cannot be combined with splitting")
    return write_gguf(outfile, plan.spec.arch.gguf_name,
                      [(kv.key, kv.value, kv.type, kv.sub_type) for kv in plan.kvs], tensors,
                      split_max_tensors=split_max_tensors, split_max_size=split_max_size, force=force,
                      progress=progress, prepare=_prepare_general(plan))


def output_path(plan: ConversionPlan, outfile: str | Path | None, *, vocab_only: bool = False,
                default_dir: Path | None = None) -> Path:
    """--outfile (a file, a directory, or a template with {ftype}/{outtype}) or llama.cpp's default name."""
    if outfile is None:
        return (default_dir or plan.model_dir) / plan.default_filename(vocab_only)
    out = Path(outfile)
    if out.is_dir():
        return out / plan.default_filename(vocab_only)
    return out.parent / gguf.fill_templated_filename(out.name, plan.outtype_label)


def planned_shards(plan: ConversionPlan, outfile: Path, split_max_tensors: int, split_max_size: int) -> list[tuple[Path, int, int]]:
    """(path, tensor count, bytes) per output file, as write_gguf will split them."""
    sizes = {t.name: tensor_nbytes(t.shape, t.qtype) for t in plan.tensors}
    planned = [PlannedTensor(t.name, t.shape, t.qtype, lambda: None) for t in plan.tensors]
    groups = split_groups(planned, split_max_tensors, split_max_size)
    return [(p, len(g), sum(sizes[n] for n in g)) for p, g in zip(shard_paths(outfile, len(groups)), groups)]
