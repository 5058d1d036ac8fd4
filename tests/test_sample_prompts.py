"""data/input.txt, the sample prompts README's getp example uses: well-formed, varied, and getp runs them."""
import re
import subprocess
import sys
from pathlib import Path

from gptoss.config import TINY_CHAT
from gptoss.harmony import Message, encode_chat
from gptoss.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "data" / "input.txt"

SCRIPTS = {"French": "[àâçéèêëîïôûùœ]", "Chinese": "[\u4e00-\u9fff]", "Japanese kana": "[\u3040-\u30ff]",
           "Vietnamese": "[ạảấầẩẫậắằẳẵặẹẻẽếềểễệịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđ]", "Arabic": "[\u0600-\u06ff]"}


def lines():
    return PROMPTS.read_bytes().decode("utf-8").split("\n")  # strict UTF-8: a bad byte raises


def test_one_well_formed_prompt_per_line():
    text = lines()
    assert text[-1] == "" and "\r" not in PROMPTS.read_text(encoding="utf-8")  # ends with a newline, no CRs
    prompts = text[:-1]
    assert len(prompts) >= 30
    for number, prompt in enumerate(prompts, 1):
        assert prompt.strip() == prompt != "", f"line {number} is blank or has surrounding spaces"
    assert len(set(prompts)) == len(prompts)
    assert max(map(len, prompts)) >= 1000  # a long one
    assert any(re.search(r"def |SQL|bash|Python|JavaScript", p) for p in prompts)  # code
    for script, letters in SCRIPTS.items():
        assert any(re.search(letters, p) for p in prompts), f"no prompt in {script}"


def test_every_prompt_tokenizes_and_round_trips():
    tok = get_tokenizer()
    template = encode_chat([Message("user", "")])
    head, end = template[:-3], template[-3:]  # end: <|end|><|start|>assistant
    for prompt in lines()[:-1]:
        ids = tok.encode(prompt, allow_special=False)
        assert ids and tok.decode(ids) == prompt
        assert encode_chat([Message("user", prompt)]) == head + ids + end


def test_getp_on_the_first_prompts(tmp_path):
    """README's getp example on the tiny-chat model and the CPU: one output line of ids per prompt."""
    from gptoss.weights import write_hf_checkpoint

    model = write_hf_checkpoint(TINY_CHAT, tmp_path / "tiny-chat", seed=0)
    first = tmp_path / "first.txt"
    first.write_text("".join(line + "\n" for line in lines()[:4]), encoding="utf-8")
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "run.py", str(model), "-m", "getp", "-i", str(first), "-o", str(out),
                           "-n", "3", "--device", "cpu", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 4
    for row in rows:
        ids = [int(t) for t in row.split()]
        assert 1 <= len(ids) <= 3 and all(0 <= i < TINY_CHAT.vocab_size for i in ids)
