"""`qtool info`: what is in a GGUF file (ours or anyone's)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import gguf

from qtool.model_file import GGUFModel

def summarize(path: Path) -> dict[str, Any]:
    path = Path(path)
    model = GGUFModel.open(path)
    kv = model.values()
    arch = kv.get("general.architecture", "?")

    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    for t in model.tensors.values():
        entry = per_type[t.qtype.name]
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
        entry["params"] += t.n_elements
    n_params, n_bytes = model.n_params, model.tensor_bytes

    def arch_key(suffix: str) -> Any:
        return kv.get(f"{arch}.{suffix}")

    tokens = kv.get("tokenizer.ggml.tokens")
    tok: dict[str, Any] = {}
    if "tokenizer.ggml.model" in kv:
        tok = {"model": kv.get("tokenizer.ggml.model"), "pre": kv.get("tokenizer.ggml.pre"),
               "tokens": len(tokens) if tokens is not None else 0,
               "merges": len(kv.get("tokenizer.ggml.merges") or []),
               "add_bos": kv.get("tokenizer.ggml.add_bos_token"), "add_eos": kv.get("tokenizer.ggml.add_eos_token"),
               "add_space_prefix": kv.get("tokenizer.ggml.add_space_prefix"),
               "chat_template": "tokenizer.chat_template" in kv}
        for role in ("bos", "eos", "unknown", "padding"):
            tid = kv.get(f"tokenizer.ggml.{role}_token_id")
            if tid is not None:
                tok[role] = {"id": int(tid), "text": tokens[tid] if tokens is not None and tid < len(tokens) else None}

    file_size = model.size_bytes
    ftype = kv.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else None
    except ValueError:
        ftype_name = f"unknown ({ftype})"
    return {
        "path": str(path),
        "files": [str(f.path) for f in model.files],
        "file_size": file_size,
        "architecture": arch,
        "name": kv.get("general.name"),
        "file_type": ftype_name,
        "hparams": {k: arch_key(k) for k in (
            "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "rope.freq_base", "rope.dimension_count",
            "rope.scaling.type", "rope.scaling.factor", "attention.layer_norm_rms_epsilon", "vocab_size")
            if arch_key(k) is not None},
        "tensor_count": len(model.tensors),
        "parameters": n_params,
        "tensor_bytes": n_bytes,
        "bits_per_weight": (8.0 * n_bytes / n_params) if n_params else None,
        "types": {k: dict(v) for k, v in sorted(per_type.items(), key=lambda kv_: -kv_[1]["bytes"])},
        "tokenizer": tok,
        "metadata": {k: _short(v) for k, v in kv.items()},
    }


def _short(v: Any) -> Any:
    if isinstance(v, list):
        return {"array": len(v), "first": [_short(x) for x in v[:3]]}
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + "…"
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v
