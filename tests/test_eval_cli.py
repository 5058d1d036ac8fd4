"""evaluation/eval.py end to end on small id files: scores, thresholds and exit codes, input errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import eval as evaluate
from evaluation.wordnet_setup import ensure_wordnet

ROOT = Path(__file__).resolve().parent.parent
TEXT_A = "The quick brown fox jumps over the lazy dog. It was a sunny day and the children played outside."
TEXT_B = "The quick brown fox leaps over the lazy dog. It was a bright day and the kids played in the park."
TEXT_C = "Quantum chromodynamics describes strong interactions between quarks and gluons."


@pytest.fixture(scope="module")
def tok():
    from gptoss.tokenizer import get_tokenizer

    ensure_wordnet()
    return get_tokenizer()


def write_ids(path, tok, texts):
    path.write_text("".join(" ".join(map(str, tok.encode(t))) + "\n" for t in texts))
    return str(path)


def run_eval(*args):
    return evaluate.main(["--bertscore", "off", *args])


def test_identical_outputs_pass_every_threshold(tmp_path, tok, capsys):
    ref = write_ids(tmp_path / "ref.txt", tok, [TEXT_A, TEXT_C])
    sub = write_ids(tmp_path / "sub.txt", tok, [TEXT_A, TEXT_C])
    out = tmp_path / "scores.json"
    assert run_eval("-m", "20b", "-s", sub, "-r", ref, "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert "PASS (20b)" in text and "none (every output is identical" in text
    record = json.loads(out.read_text())
    assert record["means"]["exact_match"] == 1.0
    assert record["means"]["prefix_ratio"] == 1.0
    assert record["means"]["chrf"] == pytest.approx(1.0)
    assert record["means"]["meteor"] > 0.999
    assert record["failures"] == [] and record["bertscore_model"] is None


def test_scores_of_a_paraphrase(tmp_path, tok, capsys):
    ref = write_ids(tmp_path / "ref.txt", tok, [TEXT_A, TEXT_C])
    sub = write_ids(tmp_path / "sub.txt", tok, [TEXT_B, TEXT_C])
    out = tmp_path / "scores.json"
    assert run_eval("-m", "20b", "-s", sub, "-r", ref, "--details", "--json", str(out)) == 0
    record = json.loads(out.read_text())
    first, second = record["per_prompt"]
    prefix = len(tok.encode("The quick brown fox"))  # "jumps" / "leaps" is where they part
    assert first["common_prefix"] == first["first_divergence"] == prefix
    assert first["exact_match"] == 0.0 and second["exact_match"] == 1.0
    assert 0.5 < first["meteor"] < 0.99 and 0.5 < first["chrf"] < 0.99
    assert record["means"]["exact_match"] == 0.5
    assert record["means"]["meteor"] == pytest.approx((first["meteor"] + second["meteor"]) / 2)
    table = capsys.readouterr().out
    assert "diverges" in table and f"earliest at token {prefix} (prompt 1)" in table


def test_threshold_exit_code(tmp_path, tok, capsys):
    ref = write_ids(tmp_path / "ref.txt", tok, [TEXT_A, TEXT_C])
    sub = write_ids(tmp_path / "sub.txt", tok, [TEXT_C, TEXT_A])  # each answer on the wrong prompt
    assert run_eval("-m", "20b", "-s", sub, "-r", ref) == 1
    assert "FAIL (20b): METEOR" in capsys.readouterr().out

    strict = tmp_path / "t.json"
    strict.write_text(json.dumps({"mine": {"exact_match": 1.0, "common_prefix": 3}}))
    same = write_ids(tmp_path / "same.txt", tok, [TEXT_A, TEXT_C])
    assert run_eval("-m", "mine", "--threshold", str(strict), "-s", same, "-r", ref) == 0
    near = write_ids(tmp_path / "near.txt", tok, [TEXT_B, TEXT_C])
    assert run_eval("-m", "mine", "--threshold", str(strict), "-s", near, "-r", ref) == 1
    assert "exact match 0.500000 < 1.0" in capsys.readouterr().out


def test_check_thresholds_bertscore_is_per_model():
    thresholds = {"meteor": 0.4, "bertscore_f1": {"roberta-large": 0.97}}
    means = {"meteor": 0.5, "bertscore_f1": 0.5}
    failures, notes = evaluate.check_thresholds(means, thresholds, "all-MiniLM-L6-v2")
    assert failures == [] and "all-MiniLM-L6-v2 scored" in notes[0]
    failures, _ = evaluate.check_thresholds(means, thresholds, "roberta-large")
    assert failures == ["BERTScore F1 0.500000 < 0.97"]
    failures, notes = evaluate.check_thresholds({"meteor": 0.3}, thresholds, None)
    assert failures == ["METEOR 0.300000 < 0.4"] and "not computed" in notes[0]


def test_repository_thresholds_are_well_formed():
    path = str(ROOT / "evaluation" / "threshold.json")
    for model in ("20b", "120b", "synthetic"):
        entry = evaluate.load_thresholds(path, model)
        scales = [v for k, v in entry.items() if k not in ("bertscore_f1", "common_prefix")]
        assert entry and all(0 < v <= 1 for v in scales)
    assert evaluate.load_thresholds(path, "20b")["meteor"] < 0.49883  # under the original's score


@pytest.mark.parametrize("sub_text, ref_text, message", [
    ("1 2 3\n", "1 2 3\n4 5\n", "has 1 lines but"),
    ("1 2 x\n", "1 2 3\n", "line 1: not a list of space-separated token ids"),
    ("1 2 3\n-4\n", "1 2 3\n1\n", "line 2: token id -4 is outside the vocabulary"),
    ("1 2 3\n999999999\n", "1 2 3\n1\n", "line 2: token id 999999999 is outside the vocabulary"),
    ("", "1 2 3\n", "the file is empty"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tok, capsys, sub_text, ref_text, message):
    (tmp_path / "sub.txt").write_text(sub_text)
    (tmp_path / "ref.txt").write_text(ref_text)
    assert run_eval("-m", "20b", "-s", str(tmp_path / "sub.txt"), "-r", str(tmp_path / "ref.txt")) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("eval.py: error: ") and err.count("\n") == 1


def test_usage_errors(tmp_path, tok, capsys):
    ref = write_ids(tmp_path / "ref.txt", tok, [TEXT_A])
    assert run_eval("-m", "7b", "-s", ref, "-r", ref) == 2
    assert "no thresholds for model '7b' (it has: 120b, 20b, synthetic)" in capsys.readouterr().err
    assert run_eval("-m", "20b", "-s", str(tmp_path / "missing.txt"), "-r", ref) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"20b": {"bleu": 0.3}}))
    assert run_eval("-m", "20b", "--threshold", str(bad), "-s", ref, "-r", ref) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err
    assert evaluate.main(["-m", "20b", "-s", ref, "-r", ref, "--bertscore-model", str(tmp_path)]) == 2
    assert "BERTScore: " in capsys.readouterr().err


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "evaluation" / "eval.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--submission", "--reference", "--threshold", "--details", "--bertscore", "--json"):
        assert flag in out


def test_make_reference_command():
    from evaluation.make_reference import main, reference_command

    class Args:
        model, input, output, steps, input_format = "m", "p.txt", "r.txt", 16, "ids"
        ignore_eos, system, reasoning, tokenizer, quiet = True, None, None, None, True

    cmd = reference_command(Args)
    assert cmd[1].endswith("run.py") and cmd[2:] == [
        "m", "-m", "getp", "-i", "p.txt", "-o", "r.txt", "--device", "cpu", "-t", "0", "-n", "16",
        "--input-format", "ids", "--ignore-eos", "-q"]
    assert main(["m", "-i", "/nonexistent/prompts.txt", "-o", "r.txt"]) == 2


def test_make_reference_then_eval_on_a_tiny_model(tmp_path, tok):
    """The float32 reference is deterministic: scored against itself it is a perfect match."""
    synthetic = pytest.importorskip("gptoss.weights.synthetic")
    from evaluation.make_reference import main as make_reference
    from gptoss.config import TINY

    synthetic.write_hf_checkpoint(TINY, tmp_path / "tiny", "mxfp4", 0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3\n40 7\n300 301 302 303 304 305 306 307 308 309\n")
    for name in ("a.txt", "b.txt"):
        assert make_reference([str(tmp_path / "tiny"), "-i", str(prompts), "-o", str(tmp_path / name),
                               "-n", "6", "--input-format", "ids", "--ignore-eos", "-q"]) == 0
    lines = (tmp_path / "a.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 6 for line in lines)
    assert all(0 <= int(t) < TINY.vocab_size for line in lines for t in line.split())
    scores = tmp_path / "scores.json"
    assert run_eval("-m", "synthetic", "-s", str(tmp_path / "b.txt"), "-r", str(tmp_path / "a.txt"),
                    "--json", str(scores)) == 0
    assert json.loads(scores.read_text())["means"]["exact_match"] == 1.0


def test_missing_text_metric_packages(tmp_path, tok, capsys, monkeypatch):
    """Without nltk/sacrebleu: thresholds that do not need them still run (with a note); a METEOR
    threshold is a clear error (exit 2), never a traceback."""
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk raises ImportError
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    ref = write_ids(tmp_path / "ref.txt", tok, [TEXT_A, TEXT_C])
    sub = write_ids(tmp_path / "sub.txt", tok, [TEXT_A, TEXT_B])
    out = tmp_path / "scores.json"
    assert run_eval("-m", "synthetic", "-s", sub, "-r", ref, "--details", "--json", str(out)) == 0
    captured = capsys.readouterr()
    assert "METEOR not computed" in captured.err and "chrF not computed" in captured.err
    means = json.loads(out.read_text())["means"]
    assert "meteor" not in means and means["exact_match"] == 0.5
    assert run_eval("-m", "20b", "-s", sub, "-r", ref) == 2
    assert "METEOR" in capsys.readouterr().err
