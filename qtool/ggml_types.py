"""GGML tensor types that the pinned llama.cpp has and the installed `gguf` package does not know yet.

qtool uses gguf's `GGMLQuantizationType` and `GGML_QUANT_SIZES` everywhere (the GGUF reader and writer look types up
there). The llama.cpp that qtool is checked against (the pinned llama-cpp-python sdist) writes Q2_0 (type 42: blocks
of 64 values, an fp16 scale and 2-bit codes), which gguf 0.19.0, the newest on PyPI, lacks. This module adds such
types to gguf's enum and size table, once, at `import qtool`; where the installed gguf has a type already, it is
left alone (it must agree with the table below, or import stops with one clear error).
"""

from __future__ import annotations

import gguf
from gguf import GGMLQuantizationType

# name -> (type id, values per block, bytes per block): ggml.h and ggml-common.h of the pinned llama.cpp
MISSING_FROM_GGUF = {"Q2_0": (42, 64, 2 + 16)}


def _add_member(enum_cls: type, name: str, value: int) -> None:
    # what `enum` does for each member while it builds the class, done afterwards for one more member
    member = int.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)


def ensure_types() -> None:
    for name, (value, block, size) in MISSING_FROM_GGUF.items():
        existing = GGMLQuantizationType._member_map_.get(name)
        if existing is None:
            if value in GGMLQuantizationType._value2member_map_:
                raise ImportError(f"gguf uses GGML type id {value} for "
                                  f"{GGMLQuantizationType(value).name}, qtool expects {name} there")
            _add_member(GGMLQuantizationType, name, value)
        elif int(existing) != value:
            raise ImportError(f"gguf gives {name} the type id {int(existing)}, qtool expects {value}")
        qtype = GGMLQuantizationType[name]
        known = gguf.GGML_QUANT_SIZES.setdefault(qtype, (block, size))
        if tuple(known) != (block, size):
            raise ImportError(f"gguf gives {name} blocks of {known}, qtool expects {(block, size)}")


ensure_types()
