"""Every command a user runs: one exit-status convention (0 success, 1 ran but failed its check, 2 bad
usage or input, 130 interrupted; gptoss/cli.py, README "Exit status"), and output paths checked
before any work (decode.py -o, eval.py --json, export/*.py)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (script, argv that reaches the patched function, the function to make raise KeyboardInterrupt)
INTERRUPTIBLE = [
    ("run.py", ["-p", "x"], "gptoss.loader.resolve_model_path"),
    ("decode.py", ["-i", "{ids}"], "gptoss.tokenizer.tokenizer_from_option"),
    ("evaluation/eval.py", ["-m", "synthetic", "-s", "{ids}", "-r", "{ids}", "--bertscore", "off"],
     "gptoss.tokenizer.tokenizer_from_option"),
    ("evaluation/make_reference.py", ["m", "-i", "{ids}", "-o", "{tmp}/r.txt"], "subprocess.run"),
    ("evaluation/wordnet_setup.py", ["--data-dir", "{tmp}/nltk"], "nltk.data.find"),
    ("export/export_tokenizer_bin.py", ["--vocab", "{ids}", "-o", "{tmp}/t.bin"], "gptoss.tokenizer.load_tokenizer"),
    ("export/export_model_bin.py", ["--model", "{ids}", "--output", "{tmp}/m.bin"], "gptoss.weights.open_weights"),
    ("export/make_checkpoint.py", ["--preset", "tiny", "--out", "{tmp}/ck"], "gptoss.weights.write_hf_checkpoint"),
    ("tools/compile_kernels.py", ["--targets", "sm_90"], "gptoss.kernels.expanded_source"),
]


def run_script(script, argv, monkeypatch):
    """The script's own `__main__` block, in this process: its exit status."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return done.value.code


@pytest.mark.parametrize("script, argv, target", INTERRUPTIBLE, ids=[s for s, _, _ in INTERRUPTIBLE])
def test_ctrl_c_exits_130_with_one_line(script, argv, target, tmp_path, monkeypatch, capsys):
    import importlib

    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3\n")
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
    argv = [a.format(ids=ids, tmp=tmp_path) for a in argv]
    assert run_script(script, argv, monkeypatch) == 130
    err = capsys.readouterr().err
    prog = Path(script).name
    assert f"{prog}: interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("script", [s for s, _, _ in INTERRUPTIBLE])
def test_bad_usage_exits_2(script, monkeypatch, capsys):
    assert run_script(script, ["--no-such-flag"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and f"{Path(script).name}: error: " in err  # argparse's own 2


@pytest.mark.parametrize("script, argv, message", [
    ("run.py", ["{tmp}/missing.bin", "-p", "x"], "missing.bin: no such file or directory"),
    ("decode.py", ["-i", "{tmp}/missing.txt"], "missing.txt: no such file"),
    ("evaluation/eval.py", ["-m", "nope", "-s", "{tmp}/a", "-r", "{tmp}/b"], "no thresholds for model 'nope'"),
    ("evaluation/make_reference.py", ["m", "-i", "{tmp}/missing.txt", "-o", "{tmp}/r.txt"], "no such file"),
    ("export/export_tokenizer_bin.py", ["--vocab", "{tmp}/missing", "-o", "{tmp}/t.bin"], "no such file"),
    ("export/export_model_bin.py", ["--model", "{tmp}/missing", "--output", "{tmp}/m.bin"], "no such file"),
    ("export/make_checkpoint.py", ["--config", "{tmp}/missing.json", "--out", "{tmp}/ck"], "no such file"),
    ("tools/compile_kernels.py", ["--families", "nope"], "unknown families ['nope']"),
])
def test_bad_input_exits_2_with_one_line(script, argv, message, tmp_path, monkeypatch, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run_script(script, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wordnet_missing_exits_2(tmp_path, monkeypatch, capsys):
    import nltk

    from evaluation import wordnet_setup

    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(wordnet_setup, "SOURCE_DIRS", ())
    monkeypatch.setattr(nltk.data, "path", [])
    assert wordnet_setup.main(["--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("wordnet_setup.py: error: no WordNet database found")


# ---- outputs checked before any work -----------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from gptoss.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture
def ids(tmp_path, tok):
    path = tmp_path / "ids.txt"
    path.write_text("".join(" ".join(map(str, tok.encode(t))) + "\n" for t in ("Hello", "world")))
    return path


def one_error(capsys, prog) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err[len(f"{prog}: error: "):-1]


def test_decode_never_replaces_its_input_and_asks_for_force(ids, tmp_path, capsys):
    from decode import main

    before = ids.read_text()
    assert main(["-i", str(ids), "-o", str(ids), "--force"]) == 2
    assert one_error(capsys, "decode.py") == f"{ids} is also an input of this run; write to another file"
    assert ids.read_text() == before
    out = tmp_path / "text.txt"
    out.write_text("mine\n")
    assert main(["-i", str(ids), "-o", str(out)]) == 2
    assert one_error(capsys, "decode.py") == f"{out} exists; pass --force to overwrite it"
    assert out.read_text() == "mine\n"
    assert main(["-i", str(ids), "-o", str(out), "--force"]) == 0
    assert out.read_text() == "Hello\nworld\n"
    assert main(["-i", str(ids), "-o", str(tmp_path / "nope" / "t.txt")]) == 2
    assert one_error(capsys, "decode.py") == f"{tmp_path / 'nope'}: no such directory (create it first)"
    assert main(["-i", str(ids), "-o", str(tmp_path)]) == 2
    assert "is a directory" in one_error(capsys, "decode.py")
    assert main(["-i", str(ids), "--tokenizer", str(ids)]) == 2
    assert "not a tokenizer" in one_error(capsys, "decode.py")


def test_eval_json_is_checked_before_scoring(ids, tmp_path, capsys):
    from evaluation.eval import main

    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"mine": {"exact_match": 1.0}}))
    base = ["-m", "mine", "--threshold", str(thresholds), "-s", str(ids), "-r", str(ids), "--meteor", "off",
            "--bertscore", "off"]
    scores = tmp_path / "scores.json"
    scores.write_text("{}")
    for json_path, message in (
            (scores, f"{scores} exists; pass --force to overwrite it"),
            (tmp_path / "nope" / "s.json", f"{tmp_path / 'nope'}: no such directory (create it first)"),
            (tmp_path, f"{tmp_path} is a directory; give a file name, e.g. {tmp_path / 'out.txt'}")):
        assert main(base + ["--json", str(json_path)]) == 2
        assert one_error(capsys, "eval.py") == message
        assert capsys.readouterr().out == ""  # nothing was scored
    assert main(base + ["--json", str(ids), "--force"]) == 2
    assert "is also an input" in one_error(capsys, "eval.py")
    assert main(base + ["--json", str(scores), "--force"]) == 0
    assert json.loads(scores.read_text())["means"]["exact_match"] == 1.0


def test_export_tokenizer_bin_output_rules(tmp_path, tok, capsys):
    from export.export_tokenizer_bin import main

    vocab = tmp_path / "tokenizer.bin"
    from gptoss.tokenizer import write_tokenizer_bin

    write_tokenizer_bin(tok.vocabulary, vocab)
    assert main(["--vocab", str(vocab), "-o", "/nope/tok.bin"]) == 2
    assert one_error(capsys, "export_tokenizer_bin.py") == "/nope: no such directory (create it first)"
    assert not Path("/nope").exists()
    assert main(["--vocab", str(vocab), "-o", str(vocab), "--force"]) == 2
    assert "is also an input" in one_error(capsys, "export_tokenizer_bin.py")
    out = tmp_path / "copy.bin"
    assert main(["--vocab", str(vocab), "-o", str(out)]) == 0
    assert main(["--vocab", str(vocab), "-o", str(out)]) == 2
    assert one_error(capsys, "export_tokenizer_bin.py") == f"{out} exists; pass --force to overwrite it"
    assert main(["--vocab", str(vocab), "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == vocab.read_bytes()


def test_export_model_bin_never_replaces_its_source(tmp_path, capsys):
    from export.export_model_bin import main
    from gptoss.config import TINY
    from gptoss.weights import random_weights, write_bin, write_hf_checkpoint

    model = tmp_path / "tiny.bin"
    write_bin(model, random_weights(TINY, "mxfp4", seed=0))
    before = model.read_bytes()
    assert main(["--model", str(model), "--output", str(model), "--force", "--quiet"]) == 2
    assert one_error(capsys, "export_model_bin.py") == f"{model} is also an input of this run; write to another file"
    assert model.read_bytes() == before
    hf = write_hf_checkpoint(TINY, tmp_path / "hf", "mxfp4", seed=0)
    shard = hf / "model.safetensors"
    assert main(["--model", str(hf), "--output", str(shard), "--force", "--quiet"]) == 2
    assert one_error(capsys, "export_model_bin.py") == f"{shard} is inside {hf}, which this run reads; write to " \
                                                        "another file"


def test_make_checkpoint_never_replaces_its_config(tmp_path, capsys):
    from export.make_checkpoint import main

    assert main(["--preset", "tiny", "--out", str(tmp_path / "ck"), "--quiet"]) == 0
    config = tmp_path / "ck" / "config.json"
    before = config.read_text()
    assert main(["--config", str(tmp_path / "ck"), "--out", str(tmp_path / "ck"), "--force", "--quiet"]) == 2
    assert one_error(capsys, "make_checkpoint.py") == f"{config} is the config.json this would replace; copy " \
                                                      "it elsewhere first"
    assert config.read_text() == before


def test_eval_below_threshold_is_the_only_1(ids, tmp_path, tok, capsys):
    from evaluation.eval import main

    other = tmp_path / "other.txt"
    other.write_text("".join(" ".join(map(str, tok.encode(t))) + "\n" for t in ("Bye", "world")))
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"mine": {"exact_match": 1.0}}))
    argv = ["-m", "mine", "--threshold", str(thresholds), "-s", str(other), "-r", str(ids), "--meteor", "off",
            "--bertscore", "off"]
    assert main(argv) == 1
    assert "FAIL (mine): exact match 0.500000 < 1.0" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bench_decode", "bench_getp", "bench_kernels", "bench_long_prompt",
                                  "kernel_attention", "kernel_gemm", "kernel_moe", "kernel_routing",
                                  "kv_accuracy"])
def test_benchmark_json_is_checked_before_the_run(name, tmp_path, capsys):
    """The benchmarks need a GPU to run; their --json is refused first, without one."""
    import importlib

    main = importlib.import_module(f"benchmarks.{name}").main
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert main(["--json", str(existing)]) == 2
    assert one_error(capsys, f"{name}.py") == f"{existing} exists; pass --force to overwrite it"
    assert main(["--json", str(tmp_path / "nope" / "r.json")]) == 2
    assert one_error(capsys, f"{name}.py") == f"{tmp_path / 'nope'}: no such directory (create it first)"
    assert existing.read_text() == "{}"


@pytest.mark.parametrize("name, argv, message", [
    ("bench_long_prompt", ["--preset", "nope"], "unknown preset 'nope' (one of "),
    ("bench_long_prompt", ["--tokens", "0"], "--tokens must be at least 1 (got 0)"),
    ("bench_long_prompt", ["--tokens", "131072"], "--tokens 131072 leaves no room for a token in the "),
    ("bench_decode", ["--experts", "bf16", "--dense-experts"],
     "--dense-experts is for MXFP4 experts; these are bf16 already"),
    ("kv_accuracy", ["--cpu", "--prompt", "0"], "need 1 <= --prompt <= --length <= 512 and --sequences >= 1 "
                                                "(got --prompt 0, --length 384, --sequences 8)"),
    ("kv_accuracy", ["--cpu", "--length", "513"], "need 1 <= --prompt <= --length <= 512"),
    ("kernel_moe", ["--variants", "nope"], "unknown expert kernel 'nope': --variants takes mlp1 kernels ("),
    ("kernel_moe", ["--variants", "moe_mlp2_fp4_m64_wg"], "unknown expert kernel 'moe_mlp2_fp4_m64_wg'"),
    ("kernel_moe", ["--experts", "bf16", "--variants", "moe_mlp1_fp4_m64"],
     "moe_mlp1_fp4_m64 is for MXFP4 experts, not bf16"),
    ("kernel_moe", ["--copies", "0"], "--copies must be at least 1 (got 0)"),
    ("kernel_moe", ["--preset", "nope"], "unknown preset 'nope' (one of "),
])
def test_benchmark_bad_arguments_are_one_line_errors(name, argv, message, capsys):
    """Checked before anything loads (no GPU needed): one line, status 2."""
    import importlib

    assert importlib.import_module(f"benchmarks.{name}").main(argv) == 2
    assert one_error(capsys, f"{name}.py").startswith(message)


def test_kernel_moe_variants_come_with_their_mlp2_twins():
    from benchmarks.kernel_moe import expert_kernel_pairs

    pairs = expert_kernel_pairs(["moe_mlp1_fp4_m128_wg", "moe_mlp1_fp4_m16_std"], "mxfp4")
    assert [(a.name, b.name) for a, b in pairs] == [("moe_mlp1_fp4_m128_wg", "moe_mlp2_fp4_m128_wg"),
                                                     ("moe_mlp1_fp4_m16_std", "moe_mlp2_fp4_m16_std")]
    assert all(a.mlp1 and not b.mlp1 and (a.bm, a.bn, a.bk) == (b.bm, b.bn, b.bk) for a, b in pairs)
