"""o200k_harmony offline (gptoss/tokenizer.py), tokenizer.bin, streaming text."""
import hashlib
import random
import socket
from pathlib import Path

import pytest

from gptoss import tokenizer as T
from gptoss.tokenizer import TokenizerError

# gpt-oss's special tokens (OpenAI's harmony format docs).
SPEC_SPECIALS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
}

@pytest.fixture(scope="module")
def tok():
    return T.get_tokenizer(T.SHIPPED_VOCABULARY)


@pytest.fixture(scope="module")
def reference(tok):
    """tiktoken's own o200k_harmony, from its cache (conftest puts the shipped copy there)."""
    import os

    import tiktoken

    cached = Path(os.environ["TIKTOKEN_CACHE_DIR"]) / "fb374d419588a4632f3f557e76b4b70aebbca790"
    assert cached.is_file(), "conftest.py did not fill tiktoken's cache: tiktoken would download"
    return tiktoken.get_encoding("o200k_harmony")


@pytest.fixture(scope="module")
def tokenizer_bin(tok, tmp_path_factory):
    from export.export_tokenizer_bin import main

    path = tmp_path_factory.mktemp("tok") / "tokenizer.bin"
    assert main(["-o", str(path)]) == 0
    return path


PIECES = ["hello", " world", "Hello, World!", "  \n\n\t", "1234567", "don't", "I'LL", "café", "naïve",
          "日本語のテキスト", "中文", "한국어", "Привет", "مرحبا", "שלום", "हिन्दी", "👍", "🧑‍💻", "e\u0301",
          "\r\n", " \u00a0", "x" * 40, "<|end|>", "<|start|>", "<|reserved_200500|>", "<|endofprompt|>",
          "<|", "|>", "```python\nprint(1)\n```", "\x00\x01", "\ufffd", "ǅ", "ⅷ", "3.14159"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.3:
                parts.append("".join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x300, 0xD7FF),
                                                     rng.randint(0xE000, 0x10FFFF)]))
                                     for _ in range(rng.randint(1, 6))))
            else:
                parts.append(rng.choice(PIECES))
        texts.append("".join(parts))
    return texts


def test_special_ids_match_the_spec(tok):
    assert tok.vocab_size == T.VOCAB_SIZE == 201088
    for name, token_id in SPEC_SPECIALS.items():
        assert tok.encode(name) == [token_id]
        assert tok.decode([token_id]) == name
    assert (T.START, T.END, T.MESSAGE, T.CHANNEL, T.RETURN, T.CALL, T.CONSTRAIN, T.ENDOFTEXT, T.STARTOFTEXT) == \
        (200006, 200007, 200008, 200005, 200002, 200012, 200003, 199999, 199998)
    assert tok.START == T.START and tok.CALL == T.CALL
    assert tok.stop_ids == T.STOP_IDS == {200002, 200012, 199999}
    assert tok.decode([200013]) == "<|reserved_200013|>"
    assert tok.decode([201087]) == "<|reserved_201087|>"


def test_identical_to_tiktoken_o200k_harmony(tok, reference):
    assert tok.encoding.name == reference.name == "o200k_harmony"
    assert tok.encoding._pat_str == reference._pat_str
    assert tok.encoding._mergeable_ranks == reference._mergeable_ranks
    assert list(tok.encoding._special_tokens.items()) == list(reference._special_tokens.items())
    for text in random_texts(1500):
        ids = tok.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert tok.encode(text, allow_special=False) == reference.encode_ordinary(text)
        assert tok.decode(ids) == reference.decode(ids)


def test_round_trips(tok):
    for text in PIECES + random_texts(300, seed=1):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allow_special=False)) == text
    assert tok.encode("Hello world") == [13225, 2375]
    plain = tok.encode("a<|end|>b", allow_special=False)
    assert T.END not in plain and tok.decode(plain) == "a<|end|>b"
    assert T.END in tok.encode("a<|end|>b")


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(tok):
    lead_byte = tok.encoding.encode_single_token(b"\xe2")  # starts a 3-byte character
    assert tok.decode_bytes([lead_byte]) == b"\xe2"
    assert tok.decode([lead_byte]) == "\ufffd"
    assert tok.decode(tok.encode("ok") + [lead_byte]) == "ok\ufffd"
    for bad in (201088, -1, 10**9):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([1, bad])


def test_tokenizer_bin_loads_identical_to_tiktoken(tok, reference, tokenizer_bin):
    from_bin = T.load_tokenizer(tokenizer_bin)
    assert from_bin.vocabulary == tok.vocabulary
    assert from_bin.vocab_size == 201088
    assert from_bin.encoding._pat_str == reference._pat_str
    assert from_bin.encoding._mergeable_ranks == reference._mergeable_ranks
    assert list(from_bin.encoding._special_tokens.items()) == list(reference._special_tokens.items())
    for text in random_texts(2000, seed=2):
        ids = from_bin.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert from_bin.decode(ids) == text


def test_corrupted_tokenizer_bin_is_refused(tokenizer_bin, tmp_path):
    data = tokenizer_bin.read_bytes()
    cases = {
        "flipped.bin": data[:5000] + bytes([data[5000] ^ 0x40]) + data[5001:],
        "truncated.bin": data[: len(data) // 2],
        "tiny.bin": data[:10],
        "tokenizer.bin": b"NOTMAGIC" + data[8:],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(TokenizerError, match="export_tokenizer_bin.py") as err:
            T.load_tokenizer(path)
        assert "\n" not in str(err.value)
    with pytest.raises(TokenizerError, match="GPTOSSTK"):
        T.get_tokenizer(tmp_path / "tokenizer.bin")  # by its name it is a tokenizer, not a model
    with pytest.raises(TokenizerError, match="checksum"):
        T.load_tokenizer(tmp_path / "flipped.bin")
    future = bytearray(data)
    future[8] = 2  # version 2
    (tmp_path / "future.bin").write_bytes(bytes(future))
    with pytest.raises(TokenizerError, match="version 2"):
        T.load_tokenizer(tmp_path / "future.bin")


def test_export_cli(tmp_path, capsys):
    from export.export_tokenizer_bin import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert main(["--vocab", str(tmp_path / "missing.tiktoken"), "-o", str(tmp_path / "t.bin")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export_tokenizer_bin.py: error:") and err.count("\n") == 1
    assert not (tmp_path / "t.bin").exists()


def test_search_order(tok, tokenizer_bin, tmp_path, monkeypatch):
    monkeypatch.delenv("GPTOSS_TOKENIZER", raising=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = model_dir / "model.bin"
    model.write_bytes(b"GPTOSS model weights, not a tokenizer" * 4)
    # Nothing next to the model: the copy shipped in the package.
    assert T.find_vocabulary(model) == T.find_vocabulary() == T.SHIPPED_VOCABULARY
    assert T.get_tokenizer(model) is tok
    # A tokenizer.bin next to the model file, or in the model directory.
    (model_dir / "tokenizer.bin").write_bytes(tokenizer_bin.read_bytes())
    assert T.find_vocabulary(model) == model_dir / "tokenizer.bin"
    assert T.find_vocabulary(model_dir) == model_dir / "tokenizer.bin"
    loaded = T.get_tokenizer(model)
    assert loaded.source == str(model_dir / "tokenizer.bin") and loaded.vocabulary == tok.vocabulary
    assert T.get_tokenizer(model) is loaded
    # $GPTOSS_TOKENIZER comes before the model's neighbour; an explicit tokenizer path before both.
    monkeypatch.setenv("GPTOSS_TOKENIZER", str(tokenizer_bin))
    assert T.find_vocabulary(model) == tokenizer_bin
    assert T.find_vocabulary(model_dir / "tokenizer.bin") == model_dir / "tokenizer.bin"
    monkeypatch.setenv("GPTOSS_TOKENIZER", str(tmp_path / "nope.bin"))
    with pytest.raises(TokenizerError, match="GPTOSS_TOKENIZER"):
        T.find_vocabulary(model)
    with pytest.raises(TokenizerError, match="no such file"):
        T.get_tokenizer(tmp_path / "no_model_here")


def test_the_shipped_vocabulary_is_o200k_base():
    assert T.SHIPPED_VOCABULARY.is_file()
    data = T.SHIPPED_VOCABULARY.read_bytes()
    assert hashlib.sha256(data).hexdigest() == T.O200K_BASE_SHA256 == \
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    assert len(data.splitlines()) == 199998


def test_loads_without_the_network(tmp_path, monkeypatch):
    """A fresh process state (no recipe, no loaded tokenizer, an empty tiktoken cache) with sockets
    refused still builds the tokenizer: nothing is downloaded."""
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GPTOSS_TOKENIZER", raising=False)
    monkeypatch.setattr(T, "_recipe", None)
    monkeypatch.setattr(T, "_tokenizers", {})
    tok = T.get_tokenizer()
    assert tok.source == str(T.SHIPPED_VOCABULARY)
    assert tok.encode("Hello world") == [13225, 2375]
    assert not (tmp_path / "empty-cache").exists()


def test_a_damaged_or_missing_vocabulary_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTOSS_TOKENIZER", raising=False)
    data = bytearray(T.SHIPPED_VOCABULARY.read_bytes())
    data[1000] ^= 0x01
    damaged = tmp_path / "data" / "o200k_base.tiktoken"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    # A user's own file that is not o200k_base.
    with pytest.raises(TokenizerError, match="sha256 differs.*give another file") as err:
        T.load_tokenizer(damaged)
    assert "\n" not in str(err.value)
    # The package's own copy, damaged or missing.
    monkeypatch.setattr(T, "_tokenizers", {})
    monkeypatch.setattr(T, "SHIPPED_VOCABULARY", damaged)
    with pytest.raises(TokenizerError, match="sha256 differs.*gptoss's own copy is damaged") as err:
        T.get_tokenizer()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(T, "SHIPPED_VOCABULARY", tmp_path / "gone" / "o200k_base.tiktoken")
    with pytest.raises(TokenizerError, match="is missing: gptoss is installed without its package data"):
        T.get_tokenizer()


# --- streaming text ---------------------------------------------------------------------------------

def test_stream_decoder_never_splits_a_character(tok):
    text = "héllo 👍 € 日本 🧑‍💻!"
    byte_ids = [tok.encoding.encode_single_token(bytes([b])) for b in text.encode()]
    stream = T.StreamDecoder(tok)
    deltas = [stream.push(i) for i in byte_ids]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[byte_ids.index(tok.encoding.encode_single_token(b"\xf0"))] == ""  # 👍's first byte waits
    # update() takes the whole growing list.
    grow, ids, out = T.StreamDecoder(tok), [], []
    for i in byte_ids:
        ids.append(i)
        out.append(grow.update(ids))
    assert out == deltas
    # An unfinished character at the end becomes U+FFFD on flush.
    tail = T.StreamDecoder(tok)
    assert tail.update(byte_ids[:8]) == "héllo " and tail.flush() == "\ufffd"


def test_stream_decoder_equals_decode_on_random_ids(tok):
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(0, 256), rng.randrange(0, 199998),
                           tok.encoding.encode_single_token(bytes([rng.randrange(128, 256)]))])
               for _ in range(rng.randint(1, 12))]
        stream = T.StreamDecoder(tok)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_a_tokenizer_bin_whose_pattern_does_not_compile_is_refused(tmp_path):
    """The split pattern comes from the file: one that is not a regex (its checksum intact) is a
    TokenizerError naming the file, not tiktoken's ValueError."""
    specials = {name: i for i, name in T.SPECIAL_NAMES.items()}
    path = tmp_path / "tokenizer.bin"
    T.write_tokenizer_bin(T.Vocabulary("o200k_harmony", r"[\w", [bytes([i]) for i in range(256)], specials), path)
    with pytest.raises(TokenizerError) as err:
        T.load_tokenizer(path)
    message = str(err.value)  # the middle is tiktoken's own wording
    assert message.startswith(f"{path}: not a usable vocabulary (") and "\n" not in message
    assert message.endswith("); rebuild it with export/export_tokenizer_bin.py")
