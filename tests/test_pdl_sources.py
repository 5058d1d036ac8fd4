"""Every kernel may be launched with programmatic dependent launch (gptoss/kernels/launch.py): it can start
while the kernel before it still runs, so each `__global__` function's body must begin with
GPTOSS_WAIT_PRIOR_GRID() (common.h) before it reads or writes global memory. A static scan of every kernel
source (the *.hip files and our headers), as written: comments blanked, macro line continuations joined,
so that kernels defined by macros (GEMM_KERNEL(...) and the like) are checked through their #define.
"""
import re

import pytest

from gptoss.kernels import KERNEL_DIR

WAIT = "GPTOSS_WAIT_PRIOR_GRID"
LAUNCH = "GPTOSS_LAUNCH_DEPENDENTS"
_IDENT = re.compile(r"[A-Za-z_][\w#]*")  # `##` pastes names in macro-defined kernels (gemm_##NAME)


def strip_comments(text: str) -> str:
    """Comments blanked (string literals kept: asm text has no comment markers)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def _balanced(text: str, start: int, open_: str, close: str) -> int:
    """The index just past the bracket that closes the one at text[start]."""
    assert text[start] == open_, text[start:start + 40]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} at offset {start}")


def global_functions(text: str) -> list[tuple[str, str]]:
    """(name, body) of every __global__ function definition in a kernel source: the name as written
    (`gemm_##NAME` inside a macro) and the text between its braces. Declarations without a body are
    skipped. Handles `extern "C"`, templates, `__launch_bounds__(...)` and macro continuations."""
    code = strip_comments(text).replace("\\\n", " \n")
    found = []
    for m in re.finditer(r"\b__global__\b", code):
        i, name = m.end(), None
        while True:  # return type, attributes, then the name and its parameter list
            while code[i].isspace():
                i += 1
            if code.startswith("__launch_bounds__", i):
                i = _balanced(code, code.index("(", i), "(", ")")
            elif code[i] == "(":
                break
            else:
                word = _IDENT.match(code, i)
                if word is None:
                    raise ValueError(f"cannot parse the __global__ at offset {m.start()}: {code[i:i + 40]!r}")
                name, i = word.group(0), word.end()
        i = _balanced(code, i, "(", ")")
        while code[i].isspace():
            i += 1
        if code[i] == ";":
            continue  # a declaration
        end = _balanced(code, i, "{", "}")
        found.append((name, code[i + 1:end - 1]))
    return found


def _sources():
    return sorted(KERNEL_DIR.glob("*.hip")) + sorted(KERNEL_DIR.glob("*.h"))


def test_every_kernel_starts_with_the_wait_and_then_lets_dependents_launch():
    kernels, bad = 0, []
    for path in _sources():
        for name, body in global_functions(path.read_text()):
            kernels += 1
            statements = [s.strip() for s in body.split(";")]
            if not re.fullmatch(rf"{WAIT}\s*\(\s*\)", statements[0]):
                bad.append(f"{path.name}: {name} does not start with {WAIT}(); it starts {body.strip()[:60]!r}")
            elif LAUNCH not in body:
                bad.append(f"{path.name}: {name} never calls {LAUNCH}() (its dependents launch only at its end)")
    assert kernels >= 30  # every family's kernels were found (a parser that finds none checks nothing)
    assert not bad, "\n".join(bad)


def test_the_scan_finds_kernels_in_every_form_and_catches_a_missing_wait():
    src = r'''
    // __global__ void in_a_comment() {}
    extern "C" __global__ void __launch_bounds__(256, 2) plain(const float* x, int n) {
        GPTOSS_WAIT_PRIOR_GRID();
        GPTOSS_LAUNCH_DEPENDENTS();
        if (n) { x += 1; }
    }
    template <int N> __global__ void templ(float* y) { y[0] = N; GPTOSS_WAIT_PRIOR_GRID(); }
    __global__ void declared(int);
    #define KERNEL(NAME, T)                                                     \
        extern "C" __global__ void __launch_bounds__(32 * (T)) k_##NAME(int a) { \
            GPTOSS_WAIT_PRIOR_GRID(); body<T>(a);                               \
        }
    #define EMPTY(NAME) extern "C" __global__ void NAME(int a) {}
    '''
    found = dict(global_functions(src))
    assert list(found) == ["plain", "templ", "k_##NAME", "NAME"]
    assert found["plain"].split(";")[0].strip() == "GPTOSS_WAIT_PRIOR_GRID()"
    assert found["templ"].strip().startswith("y[0] = N")  # the test above would reject it
    assert found["NAME"].strip() == ""
    with pytest.raises(ValueError, match="unbalanced"):
        global_functions("__global__ void broken(int a) { if (a) {")


def test_the_macros_are_empty_off_nvidia_sm90():
    """The PTX exists only on NVIDIA sm_90+ outside the portable build (an AMD or portable compile sees
    no griddepcontrol)."""
    common = (KERNEL_DIR / "common.h").read_text()
    block = common[common.index("#if defined(GPTOSS_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900"):]
    block = block[:block.index("#endif")]
    nvidia, other = block.split("#else")
    assert "griddepcontrol.wait" in nvidia and "griddepcontrol.launch_dependents" in nvidia
    assert f"#define {WAIT}() ((void)0)" in other and f"#define {LAUNCH}() ((void)0)" in other
