"""getp's files (run.py -m getp, in process, on the CPU reference): outputs checked before the model
loads and never over an input, --force, --resume and OUTPUT.partial in every state, blank lines,
--tokenizer that is not a tokenizer, Ctrl-C."""
import json
from pathlib import Path

import pytest

import run as run_py
from gptoss.config import TINY, TINY_CHAT

PROMPTS = "1 2 3\n4 5\n6\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """tiny (512-token vocabulary) as a .bin file."""
    from gptoss.weights import random_weights, write_bin

    path = tmp_path_factory.mktemp("getp_files") / "tiny.bin"
    write_bin(path, random_weights(TINY, "mxfp4", seed=1))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """tiny-chat (the real vocabulary, for the chat and text input formats) as a .bin file."""
    from gptoss.weights import random_weights, write_bin

    path = tmp_path_factory.mktemp("getp_files_chat") / "tiny-chat.bin"
    write_bin(path, random_weights(TINY_CHAT, "mxfp4", seed=2))
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def getp(model, inp, out, *extra, fmt="ids"):
    return run_py.main([str(model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "2", "--device", "cpu",
                        "--input-format", fmt, "--ignore-eos", "-q", *map(str, extra)])


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("run.py: error: ") and "Traceback" not in err
    return lines[-1][len("run.py: error: "):]


def test_the_model_prompts_and_tokenizer_are_never_replaced(model, prompts, tmp_path, capsys):
    weights = model.read_bytes()
    assert getp(model, prompts, model, "--force") == 2
    assert one_error(capsys) == f"{model} is also an input of this run; write to another file"
    assert model.read_bytes() == weights
    assert getp(model, prompts, prompts, "--force") == 2
    assert "is also an input" in one_error(capsys) and prompts.read_text() == PROMPTS
    tok = tmp_path / "tokenizer.bin"
    tok.write_bytes(b"GPTOSSTK")
    assert getp(model, prompts, tok, "--force", "--tokenizer", tok) == 2
    assert "is also an input" in one_error(capsys) and tok.read_bytes() == b"GPTOSSTK"
    assert getp(model, prompts, tmp_path / "out.txt", "--json", model, "--force") == 2
    assert "is also an input" in one_error(capsys) and model.read_bytes() == weights


def test_an_existing_output_needs_force(model, prompts, tmp_path, capsys):
    out, stats = tmp_path / "out.txt", tmp_path / "stats.json"
    out.write_text("earlier results\n")
    assert getp(model, prompts, out) == 2
    assert one_error(capsys) == f"{out} exists; pass --force to overwrite it"
    assert out.read_text() == "earlier results\n"
    assert getp(model, prompts, out, "--force") == 0
    assert [len(line.split()) for line in out.read_text().splitlines()] == [2, 2, 2]
    stats.write_text("{}")
    assert getp(model, prompts, tmp_path / "new.txt", "--json", stats) == 2
    assert one_error(capsys) == f"{stats} exists; pass --force to overwrite it"
    assert not (tmp_path / "new.txt").exists() and stats.read_text() == "{}"  # refused before the run
    assert getp(model, prompts, out, "--json", out, "--force") == 2
    assert one_error(capsys) == "--json and -o name the same file"


@pytest.mark.parametrize("flag", ["-o", "--json"])
def test_bad_output_paths_are_refused_before_the_model_loads(prompts, tmp_path, capsys, flag):
    """The model here is not a model at all: the error about the path shows it was checked first."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    base = ["-o", tmp_path / "out.txt"] if flag == "--json" else []
    for bad, message in ((tmp_path / "nope" / "x.txt", f"{tmp_path / 'nope'}: no such directory (create it first)"),
                         (tmp_path, f"{tmp_path} is a directory; give a file name, e.g. {tmp_path / 'out.txt'}")):
        args = [junk, "-m", "getp", "-i", prompts, *base, flag, bad, "--device", "cpu", "--input-format", "ids"]
        if flag == "-o":
            args = args[:5] + ["-o", bad] + args[7:]
        assert run_py.main([str(a) for a in args]) == 2
        assert one_error(capsys) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.bin", "prompts.txt"]  # no .tmp, no .partial


def test_output_flags_belong_to_getp(model, tmp_path, capsys):
    assert run_py.main([str(model), "-p", "1", "-o", str(tmp_path / "o.txt"), "--device", "cpu"]) == 2
    assert one_error(capsys) == "-o is for -m getp (generate writes to standard output)"


def test_blank_lines_are_errors_in_every_format_or_skipped(model, chat_model, tmp_path, capsys):
    for fmt, lines, which in (("ids", ["1 2", "", "3"], 2), ("text", ["Hello", "world", "   "], 3),
                              ("chat", ["", "Hi", ""], 1)):
        inp = tmp_path / f"{fmt}.txt"
        inp.write_text("".join(line + "\n" for line in lines))
        out = tmp_path / f"{fmt}.out"
        m = model if fmt == "ids" else chat_model
        assert getp(m, inp, out, fmt=fmt) == 2
        more = " (and 1 more)" if fmt == "chat" else ""
        assert one_error(capsys) == (f"{inp}: line {which} is blank{more}; remove it, or pass --skip-blank to "
                                     "leave the output line of a blank line empty")
        assert not out.exists()
        assert getp(m, inp, out, "--skip-blank", fmt=fmt) == 0
        got = out.read_text().splitlines()
        assert [line == "" for line in got] == [not line.strip() for line in lines]
        blanks = sum(not line.strip() for line in lines)
        err = capsys.readouterr().err
        assert f"getp: {blanks} line{'s' * (blanks > 1)} skipped as blank" in err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    assert getp(junk, tmp_path / "ids.txt", tmp_path / "new.out") == 2  # found before the model loads
    assert one_error(capsys).endswith("line 2 is blank; remove it, or pass --skip-blank to leave the output "
                                      "line of a blank line empty")


def test_a_tokenizer_option_that_is_not_a_tokenizer(chat_model, prompts, tmp_path, capsys):
    out = tmp_path / "out.txt"
    assert getp(chat_model, prompts, out, "--tokenizer", prompts, fmt="text") == 2
    assert one_error(capsys) == (f"{prompts}: not a tokenizer (--tokenizer takes a tokenizer.bin or an "
                                 "o200k_base.tiktoken, or a folder holding one)")
    assert getp(chat_model, prompts, out, "--tokenizer", tmp_path, fmt="text") == 2
    assert one_error(capsys) == f"{tmp_path}: holds no tokenizer.bin or o200k_base.tiktoken"
    assert not out.exists()


# ---- OUTPUT.partial ------------------------------------------------------------------------------

def partial_of(out) -> Path:
    return Path(str(out) + ".partial")


def test_garbage_partial_is_named_and_says_what_to_do(model, prompts, tmp_path, capsys):
    out = tmp_path / "out.txt"
    partial_of(out).write_text("this is not json\n")
    for extra in ((), ("--resume",), ("--resume", "--force")):
        assert getp(model, prompts, out, *extra) == 2
        assert one_error(capsys) == (f"{partial_of(out)}: not a getp partial file (its first line is not getp's "
                                     "header); delete it, or pass --force without --resume to start over")
    partial_of(out).write_text(json.dumps({"fingerprint": "f"}) + "\n[1, 2]\n")
    assert getp(model, prompts, out, "--resume") == 2
    assert "line 2 is not a finished prompt's record" in one_error(capsys)
    assert getp(model, prompts, out, "--force") == 0
    assert "--force: replacing" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3 and not partial_of(out).exists()


@pytest.mark.parametrize("content", ["", json.dumps({"fingerprint": "another run"}) + "\n", '{"fingerpr'])
def test_a_partial_without_finished_prompts_starts_over(model, prompts, tmp_path, capsys, content):
    """Empty, header only (of any run), or a header cut short: nothing to lose, so no error."""
    for extra in ((), ("--resume",)):
        out = tmp_path / f"out{len(extra)}.txt"
        partial_of(out).write_text(content)
        assert getp(model, prompts, out, *extra) == 0
        err = capsys.readouterr().err
        assert f"getp: note: {partial_of(out)} holds no finished prompts; starting from the beginning" in err
        assert len(out.read_text().splitlines()) == 3


def test_resume_after_a_cut_line_and_force_discards(model, prompts, tmp_path, capsys):
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    out = tmp_path / "out.txt"
    assert getp(model, prompts, tmp_path / "want.txt") == 0
    want = (tmp_path / "want.txt").read_text()
    fp = run_fingerprint(SamplingParams(max_tokens=2, ignore_eos=True), model, [[1, 2, 3], [4, 5], [6]])
    header = json.dumps({"fingerprint": fp}) + "\n"
    first = json.dumps({"i": 0, "ids": [int(t) for t in want.splitlines()[0].split()]}) + "\n"
    partial_of(out).write_text(header + first + '{"i": 1, "ids": [3')  # cut by the interruption
    assert getp(model, prompts, out, "--resume") == 0
    assert out.read_text() == want and not partial_of(out).exists()

    out.unlink()
    partial_of(out).write_text(header + json.dumps({"i": 0, "ids": [9, 9]}) + "\n")
    assert getp(model, prompts, out) == 2
    assert one_error(capsys) == (f"{partial_of(out)} holds 1 finished prompt of an interrupted run: continue "
                                 "it with --resume, or pass --force to start over")
    assert getp(model, prompts, out, "--force") == 0
    assert f"--force: discarding {partial_of(out)} (1 finished prompt of an earlier run)" in capsys.readouterr().err
    assert out.read_text() == want  # started over: line 1 is not the partial's 9 9


def test_ctrl_c_keeps_finished_prompts_and_resume_completes(model, prompts, tmp_path, capsys, monkeypatch):
    from gptoss.engine import Engine

    out = tmp_path / "out.txt"
    assert getp(model, prompts, tmp_path / "want.txt") == 0
    real = Engine.step
    finished = []

    def interrupted_after_one_prompt(engine):
        if finished:  # Ctrl-C in the step after the one that finished a prompt
            raise KeyboardInterrupt
        step = real(engine)
        finished.extend(step.request_id[step.done].tolist())
        return step

    monkeypatch.setattr(Engine, "step", interrupted_after_one_prompt)
    assert getp(model, prompts, out, "-b", 1) == 130  # one prompt at a time
    err = capsys.readouterr().err
    assert f"run.py: interrupted; the finished prompts are kept in {partial_of(out)}: continue with the same " \
           "command and --resume" in err
    assert not out.exists() and len(partial_of(out).read_text().splitlines()) == 2  # header + one prompt
    monkeypatch.setattr(Engine, "step", real)
    assert getp(model, prompts, out, "--resume") == 0
    assert out.read_text() == (tmp_path / "want.txt").read_text()


def test_a_cut_line_is_dropped_before_new_records_are_appended(tmp_path):
    from gptoss.getp import PartialResults, read_partial

    out = tmp_path / "out.txt"
    partial_of(out).write_text(json.dumps({"fingerprint": "f"}) + "\n" + json.dumps({"i": 0, "ids": [1]})
                               + '\n{"i": 1, "ids": [2, ')
    results = PartialResults(out, "f", n_prompts=3, resume=True)
    assert results.done == {0: [1]}
    results.add(2, [7, 8])
    results.close()
    assert read_partial(partial_of(out)).done == {0: [1], 2: [7, 8]}  # not glued to the cut line
