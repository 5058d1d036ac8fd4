"""README's two commands are what CI runs, and what they need is in the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".txt", ".json", ".hip", ".h", ""}


def bash_blocks():
    return [b.strip() for b in re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]


def project_files():
    """The project's own text files: what git tracks or would add (ignored files, e.g. a user's models or a
    base tree for benchmarks/compare_trees.sh, are not the project's); every file where git is missing."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        paths = [ROOT / rel for rel in listed if rel]
    except (OSError, subprocess.CalledProcessError):
        paths = ROOT.rglob("*")
    skip = {".git", ".cache", "__pycache__", "build", "dist", "models", ".pytest_cache"}
    for path in paths:
        rel = path.relative_to(ROOT)
        if path.is_file() and not skip & set(rel.parts) and path.suffix in TEXT_SUFFIXES \
                and path.stat().st_size < 1 << 20:
            yield rel, path.read_text(errors="replace")


def test_first_run_and_tests_are_the_first_two_blocks():
    first, tests = bash_blocks()[:2]
    assert "\n" not in first and "\n" not in tests  # one line each, run as written
    assert "export/make_checkpoint.py --preset tiny-chat --out models/tiny-chat" in first
    assert first.endswith('python run.py models/tiny-chat -m generate -p "Hello" -n 16')
    assert tests == "bash tools/setup-dev.sh && python -m pytest"


def test_ci_runs_the_readme_test_line_last():
    """CI's status is that line's: a failed set-up or pytest's exit 5 (no test) fails CI."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[-1] == bash_blocks()[1]
    assert "python3 tools/compile_kernels.py" in commands
    setup = (ROOT / "tools" / "setup-dev.sh").read_text()
    assert "-m pip install -q -r requirements-dev.txt" in setup and "bash .ci/install-eval.sh" in setup
    assert "wordnet-base" in (ROOT / ".ci" / "install-eval.sh").read_text()


def test_getp_example_uses_the_shipped_prompts():
    assert any("-m getp -i data/input.txt" in block for block in bash_blocks())
    assert (ROOT / "data" / "input.txt").is_file()


def test_nothing_reads_outside_the_repository_or_names_a_gone_command():
    hits = []
    for rel, text in project_files():
        if rel == Path("tests/test_readme.py"):
            continue
        # (spelled in pieces, so that this file itself names no path outside the repository)
        for bad in (".." + "/shared", "/work" + "/shared", '"shared"' + ' / "tokenizer"', "huggingface-cli"):
            if bad in text:
                hits.append(f"{rel}: {bad}")
    assert not hits
