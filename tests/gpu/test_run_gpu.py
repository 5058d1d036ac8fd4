"""run.py's modes on the GPU path (tiny synthetic models): generate and chat stream, getp writes one line
per prompt in order and resumes, decode.py reads its output back."""
import json
from pathlib import Path

import pytest

from tests.test_run_cli import chat_model, ids_model, run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu


def test_generate_on_gpu(chat_model):  # noqa: F811
    proc = run("run.py", str(chat_model), "-m", "generate", "-p", "Hello there", "-n", "8", "--device", "gpu")
    assert proc.stdout.startswith("Hello there") and len(proc.stdout) > len("Hello there")
    assert "generated" in proc.stderr


def test_chat_on_gpu(chat_model):  # noqa: F811
    proc = run("run.py", str(chat_model), "-m", "chat", "-n", "6", "--device", "gpu", stdin="Hi!\n")
    assert "generated" in proc.stderr


def test_getp_text_on_gpu_then_decode(chat_model, tmp_path):  # noqa: F811
    prompts = ["What is 2 + 2?", "Name a colour.", "Write one word."]
    inp, out = tmp_path / "prompts.txt", tmp_path / "out.txt"
    inp.write_text("".join(p + "\n" for p in prompts))
    run("run.py", str(chat_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "7", "--device", "gpu",
        "--ignore-eos", "-q", "--json", str(tmp_path / "rec.json"))
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 7 for line in lines)
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["generated_tokens"] == 21 and rec["backend"].startswith("gpu")
    assert rec["engine"]["slots"] >= 3 and rec["peak_gpu_memory_bytes"] > 0
    run("decode.py", "-i", str(out), "-o", str(tmp_path / "out.txt.decoded"))
    assert len((tmp_path / "out.txt.decoded").read_text().splitlines()) >= 3


def test_getp_resume_on_gpu(ids_model, tmp_path):  # noqa: F811
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    inp, out = tmp_path / "prompts.txt", tmp_path / "out.txt"
    inp.write_text("1 2 3\n4 5\n6\n")
    fp = run_fingerprint(SamplingParams(max_tokens=4, ignore_eos=True), ids_model, [[1, 2, 3], [4, 5], [6]])
    Path(str(out) + ".partial").write_text(json.dumps({"fingerprint": fp}) + "\n" +
                                           json.dumps({"i": 1, "ids": [9, 9, 9, 9]}) + "\n")
    run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "4", "--device", "gpu",
        "--input-format", "ids", "--ignore-eos", "-q", "--resume")
    lines = out.read_text().splitlines()
    assert lines[1] == "9 9 9 9"  # kept from the partial file
    assert len(lines[0].split()) == 4 and len(lines[2].split()) == 4
    assert not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize("mode", ["portable", "auto"])
def test_getp_kernels_flag(chat_model, tmp_path, mode, monkeypatch):  # noqa: F811
    """run.py --kernels picks the kernel mode whatever GPTOSS_KERNELS says; the JSON record names it."""
    inp, out = tmp_path / "prompts.txt", tmp_path / "out.txt"
    inp.write_text("What is 2 + 2?\nName a colour.\n")
    monkeypatch.setenv("GPTOSS_KERNELS", "auto" if mode == "portable" else "portable")
    run("run.py", str(chat_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "5", "--device", "gpu",
        "--ignore-eos", "-q", "--kernels", mode, "--json", str(tmp_path / "rec.json"))
    assert [len(line.split()) for line in out.read_text().splitlines()] == [5, 5]
    backend = json.loads((tmp_path / "rec.json").read_text())["backend"]
    assert backend.startswith("gpu") and ("portable kernels" in backend) == (mode == "portable")
