"""o200k_harmony, gpt-oss's tokenizer, through tiktoken and offline: encode, decode, stream text.

Where the vocabulary comes from (get_tokenizer; the first found wins, nothing is ever downloaded):
  1. an explicit tokenizer path (run.py --tokenizer), else $GPTOSS_TOKENIZER: a tokenizer.bin or an
     o200k_base.tiktoken file;
  2. tokenizer.bin (or o200k_base.tiktoken) next to the model file, or inside the model directory;
  3. the copy shipped in the package, gptoss/data/o200k_base.tiktoken (3.6 MB).
Every .tiktoken file is checked against o200k_base's sha256 at load.
The Encoding is built here from the merges, so no cache directory is needed. The pattern string and
the special tokens come at run time from the installed tiktoken_ext.openai_public (its o200k_harmony
constructor is run once with the merge loader swapped for a recorder, so it reads nothing). .tiktoken
files are parsed here, not with tiktoken.load.load_tiktoken_bpe, which copies local files into the cache.

tokenizer.bin (export/export_tokenizer_bin.py writes it once; all integers little-endian):
  header, 32 bytes:  magic b"GPTOSSTK" | u32 version (1) | u32 n_tokens | u32 n_special
                     | u32 name_len | u32 pattern_len | u32 token_bytes_len
  name               name_len bytes, UTF-8 ("o200k_harmony")
  pattern            pattern_len bytes, UTF-8: the pre-tokenizer regex
  token lengths      n_tokens x u16: byte length of the token of rank 0, 1, ..., n_tokens - 1
  token bytes        token_bytes_len bytes: the tokens' bytes concatenated in rank order
  specials           n_special x (u32 id | u16 len | len bytes UTF-8 name), in tiktoken's order
  checksum           u32 zlib.crc32 of every byte before it
Loading it gives an Encoding identical to tiktoken's o200k_harmony (tests/test_tokenizer.py checks).

The harmony chat format (prompts, replies) is gptoss/harmony.py's.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from .errors import GptossError

VOCABULARY_NAME = "o200k_base.tiktoken"
SHIPPED_VOCABULARY = Path(__file__).resolve().parent / "data" / VOCABULARY_NAME  # package data
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Special token ids of o200k_harmony; checked against the vocabulary at load.
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
VOCAB_SIZE = 201088
STOP_IDS = frozenset({RETURN, CALL, ENDOFTEXT})
SPECIAL_NAMES = {
    STARTOFTEXT: "<|startoftext|>", ENDOFTEXT: "<|endoftext|>", RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>", CHANNEL: "<|channel|>", START: "<|start|>", END: "<|end|>",
    MESSAGE: "<|message|>", CALL: "<|call|>",
}


class TokenizerError(GptossError, ValueError):
    """The vocabulary cannot be found or read; the message (one line) says what to do."""


# ---------------------------------------------------------------------------------------------------
# What tiktoken's o200k_harmony is made of, read from the installed tiktoken_ext at run time.

@dataclass(frozen=True)
class HarmonyRecipe:
    name: str
    pattern: str
    specials: dict  # name -> id, in tiktoken's order


_recipe: HarmonyRecipe | None = None
_recipe_lock = threading.Lock()


def harmony_recipe() -> HarmonyRecipe:
    """Run tiktoken_ext's o200k_harmony constructor with its merge loader replaced by a recorder,
    so nothing is read or downloaded: we get the pattern and the specials, and check that its merges
    are o200k_base's (by their sha256), the ones shipped in gptoss/data."""
    global _recipe
    with _recipe_lock:
        if _recipe is None:
            try:
                from tiktoken_ext import openai_public
                constructor = openai_public.o200k_harmony
            except (ImportError, AttributeError):
                raise TokenizerError(f"tiktoken {tiktoken.__version__} has no o200k_harmony encoding; "
                                     "upgrade it: pip install -U 'tiktoken>=0.11'") from None
            seen = {}

            def record(url, expected_hash=None):
                seen["sha256"] = expected_hash
                return {}

            loader = openai_public.load_tiktoken_bpe
            openai_public.load_tiktoken_bpe = record
            try:
                spec = constructor()
            finally:
                openai_public.load_tiktoken_bpe = loader
            if seen["sha256"] != O200K_BASE_SHA256:
                raise TokenizerError(f"tiktoken {tiktoken.__version__}'s o200k_harmony is built on "
                                     f"merges with sha256 {seen['sha256']}, not on o200k_base's "
                                     f"{O200K_BASE_SHA256}; install a tiktoken whose o200k_harmony "
                                     "uses o200k_base")
            _recipe = HarmonyRecipe(spec["name"], spec["pat_str"], dict(spec["special_tokens"]))
    return _recipe


# ---------------------------------------------------------------------------------------------------
# Vocabulary files: o200k_base.tiktoken and tokenizer.bin, both read into a Vocabulary.

@dataclass(frozen=True)
class Vocabulary:
    name: str
    pattern: str
    tokens: list      # bytes of the token of each rank, in rank order
    specials: dict    # special name -> id


def parse_tiktoken_bytes(data: bytes, source: str) -> Vocabulary:
    """o200k_base.tiktoken: lines "base64(token) rank", ranks 0, 1, ...; checked by its sha256."""
    recipe = harmony_recipe()
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        fix = ("gptoss's own copy is damaged: restore it (git checkout or pip install --force-reinstall)"
               if Path(source) == SHIPPED_VOCABULARY else "give another file, or none to use the copy gptoss ships")
        raise TokenizerError(f"{source}: this is not o200k_base.tiktoken (its sha256 differs from "
                             f"{O200K_BASE_SHA256}); {fix}")
    tokens = []
    for number, line in enumerate(data.splitlines()):
        token_b64, rank = line.split()
        if int(rank) != number:
            raise TokenizerError(f"{source}: line {number + 1} has rank {int(rank)}, expected {number}")
        tokens.append(base64.b64decode(token_b64))
    return Vocabulary(recipe.name, recipe.pattern, tokens, dict(recipe.specials))


def read_tiktoken_file(path) -> Vocabulary:
    return parse_tiktoken_bytes(Path(path).read_bytes(), str(path))


MAGIC = b"GPTOSSTK"
VERSION = 1
HEADER = struct.Struct("<8s6I")
SPECIAL_ENTRY = struct.Struct("<IH")


def tokenizer_bin_bytes(vocab: Vocabulary) -> bytes:
    """The tokenizer.bin image of a vocabulary (format in the module docstring)."""
    name, pattern = vocab.name.encode(), vocab.pattern.encode()
    lengths = b"".join(struct.pack("<H", len(t)) for t in vocab.tokens)
    blob = b"".join(vocab.tokens)
    specials = b"".join(SPECIAL_ENTRY.pack(i, len(n.encode())) + n.encode() for n, i in vocab.specials.items())
    body = (HEADER.pack(MAGIC, VERSION, len(vocab.tokens), len(vocab.specials), len(name), len(pattern),
                        len(blob)) + name + pattern + lengths + blob + specials)
    return body + struct.pack("<I", zlib.crc32(body))


def write_tokenizer_bin(vocab: Vocabulary, path) -> None:
    """Write atomically: a partial file never carries the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(tokenizer_bin_bytes(vocab))
    os.replace(tmp, path)


def read_tokenizer_bin(path) -> Vocabulary:
    path = Path(path)
    data = path.read_bytes()

    def damaged(why: str) -> TokenizerError:
        return TokenizerError(f"{path}: not a usable tokenizer.bin ({why}); write a new one with "
                              "python export/export_tokenizer_bin.py -o tokenizer.bin")

    if not data.startswith(MAGIC):
        raise damaged("no GPTOSSTK header")
    if len(data) < HEADER.size + 4:
        raise damaged("truncated")
    _, version, n_tokens, n_special, name_len, pattern_len, blob_len = HEADER.unpack_from(data)
    if version != VERSION:
        raise damaged(f"format version {version}; this code reads version {VERSION}")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise damaged("checksum mismatch: the file is truncated or corrupted")
    try:
        at = HEADER.size
        name = body[at:at + name_len].decode()
        at += name_len
        pattern = body[at:at + pattern_len].decode()
        at += pattern_len
        lengths = struct.unpack_from(f"<{n_tokens}H", body, at)
        at += 2 * n_tokens
        blob = body[at:at + blob_len]
        at += blob_len
        if sum(lengths) != blob_len or len(blob) != blob_len:
            raise damaged("token lengths do not add up")
        tokens, offset = [], 0
        for n in lengths:
            tokens.append(blob[offset:offset + n])
            offset += n
        specials = {}
        for _ in range(n_special):
            token_id, n = SPECIAL_ENTRY.unpack_from(body, at)
            at += SPECIAL_ENTRY.size
            specials[body[at:at + n].decode()] = token_id
            at += n
    except (struct.error, UnicodeDecodeError) as e:
        raise damaged(f"unreadable section: {e}") from None
    if at != len(body):
        raise damaged(f"{len(body) - at} unexpected trailing bytes")
    return Vocabulary(name, pattern, tokens, specials)


def looks_like_tokenizer_file(path: Path) -> bool:
    """True for a tokenizer.bin (by name or magic) or a .tiktoken file (by suffix or first line)."""
    if path.name == "tokenizer.bin" or path.suffix == ".tiktoken":
        return True
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(MAGIC):
        return True
    return re.match(rb"[A-Za-z0-9+/=]+ 0\n", head) is not None


def read_vocabulary(path) -> Vocabulary:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    return read_tokenizer_bin(path) if head == MAGIC or path.suffix == ".bin" else read_tiktoken_file(path)


# ---------------------------------------------------------------------------------------------------
# The tokenizer.

class Tokenizer:
    """o200k_harmony: encode / decode, vocab_size, the harmony special ids."""

    STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN, CHANNEL = STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN, CHANNEL
    START, END, MESSAGE, CALL = START, END, MESSAGE, CALL
    stop_ids = STOP_IDS

    def __init__(self, vocab: Vocabulary, source: str):
        ranks = {token: rank for rank, token in enumerate(vocab.tokens)}
        if len(ranks) != len(vocab.tokens):
            raise TokenizerError(f"{source}: the vocabulary repeats a token; it is not o200k_base")
        wrong = {i: n for i, n in SPECIAL_NAMES.items() if vocab.specials.get(n) != i}
        if wrong:
            raise TokenizerError(f"{source}: special tokens differ from o200k_harmony's "
                                 f"(expected {wrong}); rebuild it with export/export_tokenizer_bin.py")
        self.vocabulary = vocab
        self.source = source
        try:
            self.encoding = tiktoken.Encoding(vocab.name, pat_str=vocab.pattern, mergeable_ranks=ranks,
                                              special_tokens=vocab.specials)
        except ValueError as e:  # the split pattern does not compile
            raise TokenizerError(f"{source}: not a usable vocabulary ({e}); rebuild it with "
                                 "export/export_tokenizer_bin.py") from None
        self.vocab_size = self.encoding.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoding.name}, {self.vocab_size} ids, from {self.source})"

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """allow_special=False encodes special-token strings as plain text."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, ids) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.encoding.decode_bytes(ids)

    def decode(self, ids) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a tokenizer.bin or an o200k_base.tiktoken file."""
    return Tokenizer(read_vocabulary(path), str(path))


def find_vocabulary(model_path=None) -> Path:
    """The vocabulary file to use (search order in the module docstring).

    model_path is a tokenizer file (used as is) or a model file/directory (searched next to)."""
    model_dir = None
    if model_path is not None and not str(model_path).startswith("synthetic:"):  # random weights: no folder
        path = Path(model_path).expanduser()
        if not path.exists():
            raise TokenizerError(f"{path}: no such file or directory")
        if path.is_file() and looks_like_tokenizer_file(path):
            return path
        model_dir = path if path.is_dir() else path.parent
    env = os.environ.get("GPTOSS_TOKENIZER")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise TokenizerError(f"GPTOSS_TOKENIZER={env}: no such file; point it at a tokenizer.bin "
                                 f"or an {VOCABULARY_NAME}, or unset it")
        return path
    candidates = [model_dir / "tokenizer.bin", model_dir / VOCABULARY_NAME] if model_dir else []
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return found
    if not SHIPPED_VOCABULARY.is_file():
        raise TokenizerError(f"{SHIPPED_VOCABULARY} is missing: gptoss is installed without its package "
                             "data; restore it (git checkout or pip install --force-reinstall)")
    return SHIPPED_VOCABULARY


_tokenizers: dict[str, Tokenizer] = {}
_last_loaded: Tokenizer | None = None


def get_tokenizer(model_path=None) -> Tokenizer:
    """The o200k_harmony tokenizer, loaded once per vocabulary file.

    model_path: a tokenizer.bin / .tiktoken file, or the model file or directory to look next to."""
    global _last_loaded
    path = find_vocabulary(model_path)
    key = str(path.resolve())
    if key not in _tokenizers:
        _tokenizers[key] = load_tokenizer(path)
    _last_loaded = _tokenizers[key]
    return _last_loaded


def tokenizer_from_option(option=None, model_path=None) -> Tokenizer:
    """The tokenizer a command's --tokenizer names: a tokenizer.bin or .tiktoken file, or a folder
    holding one (TokenizerError for anything else, e.g. a prompt file); None: get_tokenizer(model_path)."""
    if option is None:
        return get_tokenizer(model_path)
    path = Path(option).expanduser()
    if path.is_dir():
        found = [path / name for name in ("tokenizer.bin", VOCABULARY_NAME) if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"{path}: holds no tokenizer.bin or {VOCABULARY_NAME}")
        path = found[0]
    elif not path.is_file():
        raise TokenizerError(f"{path}: no such file or directory")
    elif not looks_like_tokenizer_file(path):
        raise TokenizerError(f"{path}: not a tokenizer (--tokenizer takes a tokenizer.bin or an "
                             f"{VOCABULARY_NAME}, or a folder holding one)")
    return get_tokenizer(path)


def default_tokenizer() -> Tokenizer:
    """The tokenizer get_tokenizer returned last (any copy of o200k_harmony gives the same ids)."""
    return _last_loaded if _last_loaded is not None else get_tokenizer()


# ---------------------------------------------------------------------------------------------------
# Streaming text.

class StreamDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte UTF-8 character between deltas:
    the bytes of an unfinished character wait for the next id. Concatenated deltas (and flush())
    equal tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or default_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.seen = 0

    def push(self, token: int) -> str:
        self.seen += 1
        return self._utf8.decode(self.tokenizer.decode_bytes([token]))

    def update(self, ids) -> str:
        """ids: the whole growing list of generated ids; decodes those not seen yet."""
        new = list(ids[self.seen:])
        self.seen += len(new)
        return self._utf8.decode(self.tokenizer.decode_bytes(new))

    def flush(self) -> str:
        """What is left at the end (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
