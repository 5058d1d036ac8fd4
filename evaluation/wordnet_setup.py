#!/usr/bin/env python3
"""Make an offline WordNet usable by nltk (METEOR's synonym stage), with no download.

Debian's `wordnet-base` package installs the WordNet 3.0 database in /usr/share/wordnet. nltk cannot
read it there: it opens corpora only inside its data path (and refuses symlinks that lead outside
it), and it needs the `lexnames` table, which the package leaves out. So this copies the files nltk
reads into an nltk data folder (default: <repo>/.cache/nltk_data) and writes `lexnames` from the
fixed table of WordNet's lexicographer files (documented in `man 5 lexnames`).

  python evaluation/wordnet_setup.py                 # set up (if needed) and print where WordNet is
  python evaluation/wordnet_setup.py --data-dir DIR  # into another nltk data folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / ".cache" / "nltk_data"
SOURCE_DIRS = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/share/wordnet/dict")

# The database files nltk's WordNetCorpusReader reads for lemmas and synsets (what METEOR uses).
POS_FILES = ("noun", "verb", "adj", "adv")
REQUIRED_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in POS_FILES) \
    + tuple(f"{pos}.exc" for pos in POS_FILES)
# cntlist.rev: sense frequencies (Lemma.count). index.sense (Debian's wordnet-sense-index): sense keys;
# nltk opens it when it loads WordNet, to map sense keys of other WordNet versions for its
# multilingual data, and in lemma_from_key. METEOR uses neither, so an empty index.sense stands in
# where the package is not installed (sense-key lookups then find nothing).
OPTIONAL_FILES = ("cntlist.rev", "index.sense")

# WordNet 3.0's 45 lexicographer files: (number, name, syntactic category 1 noun 2 verb 3 adj 4 adv).
LEXNAMES = [
    (0, "adj.all", 3), (1, "adj.pert", 3), (2, "adv.all", 4), (3, "noun.Tops", 1), (4, "noun.act", 1),
    (5, "noun.animal", 1), (6, "noun.artifact", 1), (7, "noun.attribute", 1), (8, "noun.body", 1),
    (9, "noun.cognition", 1), (10, "noun.communication", 1), (11, "noun.event", 1), (12, "noun.feeling", 1),
    (13, "noun.food", 1), (14, "noun.group", 1), (15, "noun.location", 1), (16, "noun.motive", 1),
    (17, "noun.object", 1), (18, "noun.person", 1), (19, "noun.phenomenon", 1), (20, "noun.plant", 1),
    (21, "noun.possession", 1), (22, "noun.process", 1), (23, "noun.quantity", 1), (24, "noun.relation", 1),
    (25, "noun.shape", 1), (26, "noun.state", 1), (27, "noun.substance", 1), (28, "noun.time", 1),
    (29, "verb.body", 2), (30, "verb.change", 2), (31, "verb.cognition", 2), (32, "verb.communication", 2),
    (33, "verb.competition", 2), (34, "verb.consumption", 2), (35, "verb.contact", 2),
    (36, "verb.creation", 2),
    (37, "verb.emotion", 2), (38, "verb.motion", 2), (39, "verb.perception", 2),
    (40, "verb.possession", 2), (41, "verb.social", 2), (42, "verb.stative", 2), (43, "verb.weather", 2),
    (44, "adj.ppl", 3),
]


class WordNetMissing(RuntimeError):
    """No WordNet database to give nltk."""


def lexnames_text() -> str:
    """The `lexnames` file: "NN<TAB>name<TAB>category" per line, numbered from 00."""
    return "".join(f"{number:02d}\t{name}\t{category}\n" for number, name, category in LEXNAMES)


def find_source_dir() -> Path | None:
    """A directory holding the WordNet database files: $WNSEARCHDIR, then the usual install places."""
    candidates = [os.environ["WNSEARCHDIR"]] if os.environ.get("WNSEARCHDIR") else []
    for candidate in candidates + list(SOURCE_DIRS):
        path = Path(candidate)
        if all((path / name).is_file() for name in REQUIRED_FILES):
            return path
    return None


def install_wordnet(source: Path, data_dir: Path) -> Path:
    """Copy WordNet from `source` into data_dir/corpora/wordnet (plus lexnames); return that folder.

    The copy is built in a temporary folder and renamed into place, so a reader never sees half of it.
    """
    missing = [name for name in REQUIRED_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetMissing(f"{source}: not a WordNet database (no {missing[0]})")
    target = data_dir / "corpora" / "wordnet"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    os.chmod(staging, 0o755)
    try:
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        if not (staging / "index.sense").is_file():
            (staging / "index.sense").write_bytes(b"")
        if (source / "lexnames").is_file():
            shutil.copyfile(source / "lexnames", staging / "lexnames")
        else:
            (staging / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        # another process put a complete copy in place first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _usable(found: str) -> bool:
    path = Path(found)
    return path.suffix == ".zip" or all((path / name).is_file() for name in ("lexnames", "index.sense"))


def ensure_wordnet(data_dir: Path | str | None = None) -> str:
    """Make `nltk.corpus.wordnet` loadable offline; return where nltk finds WordNet.

    A WordNet nltk already has (nltk.download or an earlier setup) is used as it is; otherwise the
    system's copy is installed into `data_dir` (default <repo>/.cache/nltk_data), which goes first
    on nltk's data path.
    """
    import nltk

    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_dir))
    try:
        found = str(nltk.data.find("corpora/wordnet"))
        if _usable(found):
            return found
    except LookupError:
        pass
    source = find_source_dir()
    if source is None:
        raise WordNetMissing("no WordNet database found: install Debian's wordnet-base "
                             "(apt-get install wordnet-base, or .ci/install-eval.sh), or set "
                             "WNSEARCHDIR to a WordNet 3.0 dict folder")
    install_wordnet(source, data_dir)
    return str(nltk.data.find("corpora/wordnet"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wordnet_setup.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help=f"nltk data folder to install WordNet into (default {DEFAULT_DATA_DIR})")
    args = p.parse_args(argv)
    try:
        where = ensure_wordnet(args.data_dir)
        from nltk.corpus import wordnet

        synsets = len(wordnet.synsets("dog"))
    except WordNetMissing as e:
        print(f"wordnet_setup.py: error: {e}", file=sys.stderr)
        return 2
    print(f"WordNet for nltk: {where} ('dog' has {synsets} synsets)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gptoss.cli import run_main

    sys.exit(run_main("wordnet_setup.py", main))
