"""MODEL_DIR may be a Hub repo id: fetch only what conversion needs, through huggingface_hub's cache."""
from __future__ import annotations

import re
from pathlib import Path

from qtool.errors import QtoolError

# Weights, config and tokenizer files; never README-sized extras like onnx/gguf/images.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json", "README.md", "LICENSE*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot directory for `repo_id` (honours HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and HF_TOKEN)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a dependency
        raise QtoolError("huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise QtoolError(f"{repo_id}: not in the local Hub cache and the Hub is unreachable or offline "
                         "(HF_HUB_OFFLINE=1?)") from None
    except RepositoryNotFoundError:
        raise QtoolError(f"{repo_id}: no such repository on the Hub (or it is gated/private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise QtoolError(f"{repo_id}: Hub request failed: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise QtoolError(f"{repo_id}: {str(e).splitlines()[0]}") from None
    return Path(path)
