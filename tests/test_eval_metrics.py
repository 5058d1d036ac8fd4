"""evaluation/metrics.py, bertscore.py and wordnet_setup.py on hand-made pairs with known answers."""
import pytest

from evaluation import metrics
from evaluation.wordnet_setup import (LEXNAMES, REQUIRED_FILES, WordNetMissing, ensure_wordnet,
                                      find_source_dir, install_wordnet, lexnames_text)

SENTENCE = "the quick brown fox jumps over the lazy dog near the river bank"


@pytest.fixture(scope="module")
def wordnet():
    """METEOR runs for real: WordNet from Debian's wordnet-base (.ci/install-eval.sh installs it)."""
    ensure_wordnet()


# --- token metrics -------------------------------------------------------------------------------

@pytest.mark.parametrize("hyp, ref, prefix, divergence", [
    ([5, 6, 7], [5, 6, 7], 3, None),
    ([9, 6, 7], [5, 6, 7], 0, 0),
    ([5, 6, 8, 1], [5, 6, 7, 1], 2, 2),
    ([5, 6], [5, 6, 7], 2, 2),        # the submission stopped early
    ([5, 6, 7, 8], [5, 6, 7], 3, 3),  # the submission ran on
    ([], [4], 0, 0),
    ([], [], 0, None),
])
def test_common_prefix_and_first_divergence(hyp, ref, prefix, divergence):
    assert metrics.common_prefix(hyp, ref) == prefix
    assert metrics.first_divergence(hyp, ref) == divergence


def test_exact_match_and_prefix_ratio():
    assert metrics.exact_match([1, 2, 3], [1, 2, 3]) == 1.0
    assert metrics.exact_match([1, 2], [1, 2, 3]) == 0.0
    assert metrics.exact_match([], []) == 1.0
    assert metrics.prefix_ratio([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert metrics.prefix_ratio([1, 2, 9, 9], [1, 2, 3, 4]) == 0.5
    assert metrics.prefix_ratio([1, 2], [1, 2, 3, 4, 5, 6, 7, 8]) == 0.25  # share of the longer one
    assert metrics.prefix_ratio([7], [1, 2]) == 0.0
    assert metrics.prefix_ratio([], []) == 1.0


# --- METEOR --------------------------------------------------------------------------------------

def test_meteor_identical_texts(wordnet):
    # A perfect match is one chunk: nltk's penalty 0.5·(1/n)³ is all that keeps it under 1.
    n = len(SENTENCE.split())
    assert metrics.meteor(SENTENCE, SENTENCE) == pytest.approx(1 - 0.5 / n**3, abs=1e-12)
    assert metrics.meteor(SENTENCE, SENTENCE) > 0.9997
    assert metrics.meteor("hello", "hello") == pytest.approx(0.5)


def test_meteor_disjoint_texts(wordnet):
    assert metrics.meteor("quantum chromodynamics lattice gauge", SENTENCE) == 0.0


def test_meteor_uses_wordnet_synonyms(wordnet):
    # "auto" matches "car" only through WordNet (car.n.01's lemmas), so all 3 words match in one chunk:
    # Fmean = 1, penalty 0.5·(1/3)³. "pen" matches nothing: P = R = 2/3 in one chunk of 2, so
    # 2/3 − (2/3)·0.5·(1/2)³ = 0.625. (nltk looks synonyms up for the Porter stem: "large" → "larg"
    # finds none, so big/large would not show it.)
    assert metrics.meteor("a red auto", "a red car") == pytest.approx(1 - 0.5 / 27, abs=1e-12)
    assert metrics.meteor("a red pen", "a red car") == pytest.approx(0.625, abs=1e-12)


def test_meteor_is_case_insensitive_and_stems(wordnet):
    assert metrics.meteor("The Dogs RAN", "the dogs ran") == pytest.approx(1 - 0.5 / 27, abs=1e-12)
    assert metrics.meteor("the dog running", "the dog runs") == pytest.approx(1 - 0.5 / 27, abs=1e-12)


def test_meteor_known_value(wordnet):
    # The worked example of nltk's docs (Lavie & Agarwal 2007's sentence pair): 0.6944.
    hyp = "It is a guide to action which ensures that the military always obeys the commands of the party"
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert metrics.meteor(hyp, ref) == pytest.approx(0.6944, abs=5e-5)


def test_empty_texts(wordnet):
    for fn in (metrics.meteor, metrics.chrf):
        assert fn("", "") == 1.0
        assert fn("  \n", "") == 1.0
        assert fn("", "some words") == 0.0
        assert fn("some words", "") == 0.0


# --- chrF ----------------------------------------------------------------------------------------

def test_chrf_identical_and_disjoint():
    assert metrics.chrf(SENTENCE, SENTENCE) == pytest.approx(1.0)
    assert metrics.chrf("xyz xyz", "abc abc") == 0.0


def test_chrf_partial_overlap_is_between():
    close = metrics.chrf("the quick brown fox jumps over the lazy cat", SENTENCE)
    far = metrics.chrf("a slow red hen walks", SENTENCE)
    assert 0.0 < far < close < 1.0


def test_chrf_is_sacrebleu_over_100():
    from sacrebleu.metrics import CHRF

    hyp = "the quick brown fox jumps over the lazy cat"
    assert metrics.chrf(hyp, SENTENCE) == pytest.approx(CHRF().sentence_score(hyp, [SENTENCE]).score / 100)


# --- WordNet setup -------------------------------------------------------------------------------

def test_lexnames_table():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45
    category = {"noun": "1", "verb": "2", "adj": "3", "adv": "4"}
    for i, line in enumerate(lines):
        number, name, cat = line.split("\t")
        assert number == f"{i:02d}"
        assert cat == category[name.split(".")[0]]
    assert LEXNAMES[3][1] == "noun.Tops" and LEXNAMES[44][1] == "adj.ppl"


def test_install_wordnet_copies_and_writes_lexnames(tmp_path):
    source = find_source_dir()
    if source is None:
        pytest.skip("no system WordNet (apt-get install wordnet-base)")
    target = install_wordnet(source, tmp_path)
    assert target == tmp_path / "corpora" / "wordnet"
    for name in REQUIRED_FILES + ("lexnames", "index.sense"):
        assert (target / name).is_file(), name
    assert (target / "data.noun").stat().st_size == (source / "data.noun").stat().st_size
    assert list(tmp_path.joinpath("corpora").iterdir()) == [target]  # no staging folder left


def test_install_wordnet_refuses_a_folder_without_wordnet(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(WordNetMissing, match="not a WordNet database"):
        install_wordnet(tmp_path / "src", tmp_path / "data")


def test_nltk_reads_the_installed_wordnet(wordnet):
    from nltk.corpus import wordnet as wn

    names = {lemma.name() for synset in wn.synsets("car") for lemma in synset.lemmas()}
    assert {"auto", "automobile"} <= names
    assert wn.synsets("dog")[0].lexname() == "noun.animal"  # read through lexnames


# --- BERTScore (only where bert-score and a model are installed) ---------------------------------

@pytest.fixture(scope="module")
def bert_model():
    from evaluation.bertscore import BertScoreUnavailable, check_installed, find_model

    try:
        check_installed()
        return find_model()
    except BertScoreUnavailable as e:
        pytest.skip(f"BERTScore: {e}")


def test_bertscore_known_pairs(bert_model):
    from evaluation.bertscore import bertscore_f1

    unrelated = "Quantum chromodynamics describes the strong force between quarks and gluons."
    paraphrase = "A fast brown fox leaps over a lazy dog close to the riverbank."
    f1 = bertscore_f1([SENTENCE, paraphrase, unrelated, "", ""], [SENTENCE, SENTENCE, SENTENCE, "", "x"],
                      bert_model, device="cpu")
    assert f1[0] == pytest.approx(1.0, abs=1e-4)
    assert f1[2] < f1[1] < f1[0]
    assert f1[2] < 0.9  # roberta-large without rescaling gives unrelated English ~0.8; MiniLM ~0.1
    assert f1[3:] == [1.0, 0.0]


def test_bertscore_model_choice(bert_model, tmp_path):
    from evaluation.bertscore import BertScoreUnavailable, find_model

    assert bert_model.name in ("roberta-large", "all-MiniLM-L6-v2")
    assert bert_model.num_layers == (17 if bert_model.name == "roberta-large" else 6)
    assert find_model(str(bert_model.path)).num_layers == bert_model.num_layers
    with pytest.raises(BertScoreUnavailable, match="no config.json"):
        find_model(str(tmp_path))
