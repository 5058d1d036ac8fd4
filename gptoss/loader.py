"""Which model to run: a path given (a .bin file or a Hugging Face checkpoint directory), else
$GPTOSS_MODEL, else ./model.bin, else a local Hugging Face cache copy of openai/gpt-oss-20b; or
`synthetic:PRESET`, random weights of a preset's shape made in memory (gptoss.weights.open_weights
opens any of them)."""
from __future__ import annotations

import os
from pathlib import Path

from .weights import SYNTHETIC_PREFIX


def resolve_model_path(model: str | None) -> Path | str:
    """MODEL argument, else $GPTOSS_MODEL, else ./model.bin, else a local Hugging Face cache copy;
    `synthetic:PRESET` as given."""
    if model and str(model).startswith(SYNTHETIC_PREFIX):
        return str(model)
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{model}: no such file or directory")
        return path
    if os.environ.get("GPTOSS_MODEL"):
        path = Path(os.environ["GPTOSS_MODEL"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"$GPTOSS_MODEL={path}: no such file or directory")
        return path
    candidates = [Path("model.bin")]
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    candidates += sorted(hub.glob("models--openai--gpt-oss-20b/snapshots/*"))
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        "no model given and none found ($GPTOSS_MODEL, ./model.bin, the Hugging Face cache).\n"
        "Get one:\n"
        "  hf download openai/gpt-oss-20b --local-dir gpt-oss-20b\n"
        "  python export/export_model_bin.py --model gpt-oss-20b --output model.bin\n"
        "or make a tiny random one to try things out:\n"
        "  python export/make_checkpoint.py --preset tiny-chat --out models/tiny-chat")
