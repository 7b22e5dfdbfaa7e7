"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer (the oracle) on a few thousand varied
strings, truncation warnings, tokenizer folders and their errors, and BPE training."""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffedit.models.tokenizer as tokenizer_module
from diffedit.errors import ModelLoadError, OutputFileError, ParameterError, PromptError
from diffedit.models.tokenizer import BOS, EOS, Tokenizer, TruncationWarning, UnknownWordWarning, train_bpe
from reference_models import CLIP_BPE, clip_vocab_files

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"
N_STRINGS = 2400


# ---------------------------------------------------------------------- a varied, deterministic corpus

WORDS = ("a photo of cat dog bowl full fruits oranges apples horse zebra riding on beach mountain lake sunset "
         "painting by van gogh portrait highly detailed 4k trending artstation red blue green square circle "
         "background the and with in an old man woman child car bicycle tree house castle night sky").split()
PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + [
    "...", "--", "!!", "?!", "!!!", "''", "``", "«", "»", "“", "”", "‘", "’", "—", "–", "…", "•", "©", "®", "™",
    "°", "±", "×", "÷", "€", "£", "¥", "§", "¶", "¿", "¡", ":)", ";-)", "(x)", "[[", "]]", "{{", "}}", "|>", "<|"]
NUMBERS = ["0", "7", "42", "1999", "3.14", "1,000,000", "2nd", "4K", "8k", "100%", "½", "²", "٣", "५", "Ⅻ", "①",
           "１２３", "0x1F", "1e-3", "-5", "+7", "24/7", "10:30"]
UNICODE_WORDS = ["naïve", "Ελληνικά", "ΣΟΦΙΑ", "ΣΑΣ", "Москва", "ПРИВЕТ", "مرحبا", "שלום", "नमस्ते", "ภาษาไทย",
                 "ქართული", "Straße", "ẞ", "İstanbul", "DİYARBAKIR", "ıi", "ǅungla", "ﬁne", "ﬀ", "ＡＢＣｄｅｆ",
                 "\u212aelvin", "\u2126m", "ŉ", "ᎠᎡᎢ", "ꭰꭱ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "Æsir", "Ørsted", "Łódź",
                 "Ĳssel", "ǈ", "Ꙁ", "ⰀⰁ", "Ａ", "ʼn", "ǰ", "ΐ"]
CJK = ["猫", "一只猫坐在桌子上", "東京タワー", "ひらがな", "カタカナ", "한국어", "漢字", "「引用」", "。", "、",
       "ｱｲｳ", "中文，标点！", "日本語の文", "𠜎𠜱"]
EMOJI = ["🐱", "🐶🐕", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "☀", "✨🎉", "🏳️‍🌈", "🤖", "😀😃😄", "1️⃣", "🫠", "©️"]
ACCENTED = ["café", "crème brûlée", "jalapeño", "Ångström", "façade", "Việt Nam", "résumé", "São Paulo", "Zürich",
            "Dvořák", "Ἀθῆναι", "한국어", "ÉCOLE", "Ǹ", "ḱ", "ﬂambé"]
ODD_MARKS = ["q\u0301", "e\u0301\u0301", "\u0301", "a\u0308\u0323", "\u0345", "o\u0338", "\u20dd"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\u2028", "\x0b", "\x0c",
              "\u0085", " \t \n ", "\u202f", "\u1680", "    "]
APOSTROPHES = ["it's", "IT'S", "we'll", "I'm", "you're", "they've", "he'd", "don't", "can't", "'s", "'ll", "''",
               "o'clock", "rock'n'roll", "it’s", "'tis", "'Twas", "dogs'", "'d'", "l'amour", "'re'm", "'sss",
               "''ll", "'", "'''s", "we'LL", "I'D", "'S"]
HTML = ["&amp;", "&lt;b&gt;", "&#39;", "&quot;quoted&quot;", "&nbsp;", "<b>bold</b>", "<br/>", "&#x1F600;",
        "a &amp; b", '<a href="x">link</a>', "&amp;amp;", "&copy;", "<|im_start|>", "</w>", "w</w>"]
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "<|endoftext|><|endoftext|>",
           "x<|startoftext|>y", "<| endoftext |>"]
CONTROL = ["\x00", "\x01", "\x7f", "\x1b[31m", "\ufeff", "\ufffd", "\U0010fffd", "\ue000", "\u200d", "\u00ad"]
POOLS = [WORDS, PUNCTUATION, NUMBERS, UNICODE_WORDS, CJK, EMOJI, ACCENTED, ODD_MARKS, APOSTROPHES, HTML, SPECIAL,
         CONTROL]


def cased(rng: random.Random, text: str) -> str:
    return rng.choice([text, text, text.upper(), text.title(), text.swapcase(),
                       "".join(c.upper() if rng.random() < 0.5 else c for c in text)])


def accented(rng: random.Random, text: str) -> str:
    return unicodedata.normalize(rng.choice(["NFC", "NFD", "NFKC", "NFKD"]), text)


def random_prompt(rng: random.Random, pools: list[list[str]], n_pieces: int) -> str:
    pieces = []
    for _ in range(n_pieces):
        pieces.append(cased(rng, accented(rng, rng.choice(rng.choice(pools)))))
        pieces.append(rng.choice([" "] * 8 + [""] * 3 + WHITESPACE))
    return "".join(pieces).strip() if rng.random() < 0.5 else "".join(pieces)


def random_codepoints(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7f), (0xa0, 0x2000), (0x2000, 0x3100), (0x3100, 0xa000), (0xac00, 0xd7a4), (0x1f300, 0x1fa00)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(n))


def make_corpus(seed: int = 0, n: int = N_STRINGS) -> list[str]:
    rng = random.Random(seed)
    corpus = ["", " ", "\t\n", "\u00a0\u00a0", "a", "A", "!", "!" * 300, "a" * 500, "1234567890" * 20,
              "word " * 100, "it's a cat's toy, isn't it? we'll see; I'd say you've done it."]
    for pool in POOLS + [NUMBERS, WHITESPACE]:            # every pool entry verbatim, and cased/decomposed
        corpus += [*pool, *(cased(rng, accented(rng, p)) for p in pool)]
    while len(corpus) < n:
        kind = rng.random()
        if kind < 0.45:                                   # a prompt mixing all kinds of text
            corpus.append(random_prompt(rng, POOLS, rng.randint(1, 15)))
        elif kind < 0.6:                                  # a typical prompt with a little noise
            corpus.append(random_prompt(rng, [WORDS] * 6 + [PUNCTUATION, APOSTROPHES, ACCENTED], rng.randint(3, 20)))
        elif kind < 0.75:                                 # longer than the 75 text tokens
            corpus.append(random_prompt(rng, [WORDS] * 4 + POOLS, rng.randint(60, 160)))
        else:                                             # random code points
            corpus.append(random_codepoints(rng, rng.randint(1, 40)))
    return corpus


# ---------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return clip_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def oracles(clip_files):
    from transformers import CLIPTokenizer
    vocab, merges = clip_files
    return {pad: CLIPTokenizer(str(vocab), str(merges), pad_token=pad) for pad in (SD1_PAD, SD2_PAD)}


@pytest.fixture(scope="module")
def tokenizers():
    return {pad: Tokenizer.default(pad_token=pad) for pad in (SD1_PAD, SD2_PAD)}


def oracle_call(oracle, texts: list[str]):
    out = oracle(texts, padding="max_length", max_length=77, truncation=True)
    return out.input_ids, out.attention_mask


def quiet_call(tokenizer: Tokenizer, texts) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        warnings.simplefilter("ignore", UnknownWordWarning)
        return tokenizer(texts)


# ---------------------------------------------------------------------- parity with the oracle

def test_vocabulary_is_clips(tokenizers, clip_files):
    tokenizer = tokenizers[SD1_PAD]
    assert tokenizer.vocab == json.loads(clip_files[0].read_text(encoding="utf-8"))
    assert tokenizer.vocab_size == 49408 and len(tokenizer.merges) == 48894
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, 49407)
    assert tokenizers[SD2_PAD].pad_id == 0 and tokenizer.max_length == 77
    assert Tokenizer.from_clip_bpe(CLIP_BPE).vocab == tokenizer.vocab


def test_corpus_is_varied(corpus, tokenizers):
    assert len(corpus) >= 2000 and len(set(corpus)) >= 1900
    lengths = [len(tokenizers[SD1_PAD].encode(s)) for s in corpus]
    assert sum(n > 75 for n in lengths) >= 200 and sum(n == 0 for n in lengths) >= 5
    assert any(unicodedata.normalize("NFD", s) == s != unicodedata.normalize("NFC", s) for s in corpus)
    assert sum("!" in s for s in corpus) >= 100


def test_ids_match_transformers_sd1(corpus, tokenizers, oracles):
    expected, _ = oracle_call(oracles[SD1_PAD], corpus)
    ids = quiet_call(tokenizers[SD1_PAD], corpus)
    assert ids.shape == (len(corpus), 77) and ids.dtype == torch.long
    mismatches = [s for s, row, exp in zip(corpus, ids.tolist(), expected) if row != exp]
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} strings differ, e.g. {mismatches[:5]!r}"


def test_ids_match_transformers_sd2(corpus, tokenizers, oracles):
    """SD 2.x pads with "!" (id 0). transformers also reads every "!" typed in a prompt as that pad token;
    we keep it as text, as OpenCLIP does: for those prompts the oracle is the SD 1.x ids with padding 0."""
    ids = quiet_call(tokenizers[SD2_PAD], corpus).tolist()
    sd2_ids, _ = oracle_call(oracles[SD2_PAD], corpus)
    sd1_ids, sd1_mask = oracle_call(oracles[SD1_PAD], corpus)
    mismatches = []
    for s, row, exp2, exp1, mask1 in zip(corpus, ids, sd2_ids, sd1_ids, sd1_mask):
        expected = exp2 if "!" not in s else [i if m else 0 for i, m in zip(exp1, mask1)]
        if row != expected:
            mismatches.append(s)
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} strings differ, e.g. {mismatches[:5]!r}"


def test_exclamation_mark_is_text_under_sd2_padding(tokenizers):
    # OpenCLIP's ids for "! !! !!!", quoted in diffusers issue #4153.
    expected = [49406, 256, 748, 995, 49407] + [0] * 72
    assert tokenizers[SD2_PAD]("! !! !!!")[0].tolist() == expected


def test_encode_and_decode_match_transformers(corpus, tokenizers, oracles):
    oracle, tokenizer = oracles[SD1_PAD], tokenizers[SD1_PAD]
    expected = oracle(corpus, add_special_tokens=False).input_ids
    assert [tokenizer.encode(s) for s in corpus] == expected
    plain = [(s, ids) for s, ids in zip(corpus, expected) if "<|" not in s]
    assert [tokenizer.decode(ids) for _, ids in plain] == [oracle.decode(ids, skip_special_tokens=True) for _, ids in plain]
    assert tokenizer.decode(tokenizer("A photo of a Cat!")[0]) == "a photo of a cat !"


# ---------------------------------------------------------------------- truncation

def dropped_count(record) -> list[int]:
    found = [re.search(r"(\d+) tokens? dropped", str(w.message)) for w in record if w.category is TruncationWarning]
    return [int(m.group(1)) for m in found]


@pytest.mark.parametrize("n_words", [20, 38, 60, 150])
def test_truncation_warning_counts_dropped_tokens(n_words, tokenizers, oracles):
    rng = random.Random(n_words)
    prompt = " ".join(rng.choice(WORDS + ["it's", "!!", "😀", "crème"]) for _ in range(n_words))
    n_tokens = len(oracles[SD1_PAD](prompt, add_special_tokens=False).input_ids)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ids = tokenizers[SD1_PAD](prompt)
    assert ids[0].tolist() == oracle_call(oracles[SD1_PAD], [prompt])[0][0]
    assert dropped_count(record) == ([n_tokens - 75] if n_tokens > 75 else [])
    assert issubclass(TruncationWarning, UserWarning)


def test_truncation_boundary(tokenizers):
    tokenizer = tokenizers[SD1_PAD]
    for n_tokens, dropped in ((74, []), (75, []), (76, [1]), (87, [12])):
        prompt = "a " * n_tokens                          # "a</w>" is one token
        assert len(tokenizer.encode(prompt)) == n_tokens
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ids = tokenizer([prompt, "a cat"])
        assert dropped_count(record) == dropped
        assert ids[0, -1] == (tokenizer.eos_id if n_tokens >= 75 else tokenizer.pad_id)
    with pytest.warns(TruncationWarning, match=r"prompt truncated to 77 tokens: 12 tokens dropped \('a a a"):
        tokenizer("cat " * 75 + "a " * 12)


# ---------------------------------------------------------------------- property test

@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD])
@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_layout_property(pad, texts, tokenizers):
    tokenizer = tokenizers[pad]
    ids = quiet_call(tokenizer, texts)
    assert ids.shape == (len(texts), 77) and ids.dtype == torch.long
    for text, row in zip(texts, ids.tolist()):
        tokens = tokenizer.encode(text)[:75]
        n = len(tokens)
        assert row[0] == tokenizer.bos_id and row[1:n + 1] == tokens and row[n + 1] == tokenizer.eos_id
        assert all(i == tokenizer.pad_id for i in row[n + 2:])
        if BOS not in text and EOS not in text:  # typed special tokens are special: test below
            assert tokenizer.eos_id not in tokens and tokenizer.bos_id not in tokens


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD])
@pytest.mark.parametrize("text", ["<|startoftext|>", "a <|endoftext|> cat", "<|startoftext|>a", "<|endoftext|>"])
def test_special_token_strings_in_a_prompt_are_special_as_in_clip(pad, text, tokenizers, oracles):
    """CLIPTokenizer turns a literal "<|startoftext|>" or "<|endoftext|>" in the text into the special
    token (hypothesis found such a prompt): the ids are the oracle's, bit for bit."""
    ids = quiet_call(tokenizers[pad], [text])
    assert ids[0].tolist() == oracle_call(oracles[pad], [text])[0][0]
    assert {tokenizers[pad].bos_id, tokenizers[pad].eos_id} & set(tokenizers[pad].encode(text))


# ---------------------------------------------------------------------- folders, files and errors

def test_from_folder_diffusers_layouts(tmp_path, clip_files, tokenizers, corpus):
    vocab, merges = clip_files
    sd1, sd2 = tmp_path / "sd1", tmp_path / "sd2"
    for folder in (sd1, sd2):
        folder.mkdir()
        (folder / "vocab.json").write_bytes(vocab.read_bytes())
        (folder / "merges.txt").write_bytes(merges.read_bytes())
    (sd1 / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>"}))
    (sd1 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    (sd2 / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 1e30, "pad_token": {"__type": "AddedToken", "content": "!", "normalized": True}}))
    for folder, pad in ((sd1, SD1_PAD), (sd2, SD2_PAD)):
        loaded = Tokenizer.from_folder(folder)
        assert (loaded.pad_token, loaded.max_length) == (pad, 77)
        assert torch.equal(quiet_call(loaded, corpus[:300]), quiet_call(tokenizers[pad], corpus[:300]))
    # When the two files disagree, special_tokens_map.json wins, as in transformers.
    (sd2 / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (sd2 / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "model_max_length": 77}))
    from transformers import CLIPTokenizer
    assert Tokenizer.from_folder(sd2).pad_token == CLIPTokenizer.from_pretrained(sd2).pad_token == SD2_PAD


def test_from_folder_reads_transformers_save(tmp_path, oracles, tokenizers, corpus):
    """transformers 5 saves tokenizer.json + tokenizer_config.json (no vocab.json / merges.txt)."""
    oracles[SD2_PAD].save_pretrained(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    assert (loaded.pad_token, loaded.max_length, loaded.vocab) == (SD2_PAD, 77, tokenizers[SD2_PAD].vocab)
    assert torch.equal(quiet_call(loaded, corpus[:300]), quiet_call(tokenizers[SD2_PAD], corpus[:300]))


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD])
def test_save_loads_in_transformers(pad, tmp_path, tokenizers, corpus):
    from transformers import CLIPTokenizer
    tokenizers[pad].save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "special_tokens_map.json",
                                                   "tokenizer_config.json"}
    oracle = CLIPTokenizer.from_pretrained(tmp_path)
    assert (oracle.pad_token, oracle.model_max_length) == (pad, 77)
    texts = [s for s in corpus[:600] if "!" not in s]
    assert oracle_call(oracle, texts)[0] == quiet_call(tokenizers[pad], texts).tolist()
    reloaded = Tokenizer.from_folder(tmp_path)
    assert (reloaded.vocab, reloaded.merges, reloaded.pad_token) == (tokenizers[pad].vocab, tokenizers[pad].merges, pad)


def one_sentence(error: Exception) -> bool:
    message = str(error)
    return message.endswith(".") and "\n" not in message and len(message) < 300


def test_from_folder_errors(tmp_path, clip_files):
    vocab, merges = clip_files
    cases = {}
    cases["not a folder"] = tmp_path / "nowhere"
    cases["empty"] = tmp_path / "empty"
    cases["no pad token info"] = tmp_path / "no_config"
    cases["corrupt vocab"] = tmp_path / "corrupt_vocab"
    cases["bad merges"] = tmp_path / "bad_merges"
    cases["unknown pad"] = tmp_path / "unknown_pad"
    cases["merge out of vocab"] = tmp_path / "merge_oov"
    for name, folder in cases.items():
        if name == "not a folder":
            continue
        folder.mkdir()
        if name == "empty":
            continue
        (folder / "vocab.json").write_bytes(vocab.read_bytes())
        (folder / "merges.txt").write_bytes(merges.read_bytes())
        if name != "no pad token info":
            (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>" if name == "unknown pad" else "!"}))
    (cases["corrupt vocab"] / "vocab.json").write_text('{"a": 0,')
    (cases["bad merges"] / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n")
    (cases["merge out of vocab"] / "merges.txt").write_text("#version: 0.2\ni n\nzz qq\n")
    for name, folder in cases.items():
        with pytest.raises(ModelLoadError) as error:
            Tokenizer.from_folder(folder)
        assert one_sentence(error.value), (name, str(error.value))


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="missing"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "not.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(ModelLoadError, match="gzipped"):
        Tokenizer.from_clip_bpe(tmp_path / "not.gz")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version\ni n\n"))
    with pytest.raises(ModelLoadError, match="fewer than"):
        Tokenizer.from_clip_bpe(short)
    monkeypatch.setattr(tokenizer_module, "CLIP_BPE_FILE", tmp_path / "weights" / "clip" / "missing.txt.gz")
    with pytest.raises(ModelLoadError, match="is missing") as error:
        Tokenizer.default()
    assert one_sentence(error.value)
    with pytest.raises(OutputFileError):
        Tokenizer.from_clip_bpe(CLIP_BPE).save(tmp_path / "not.gz" / "sub")


def test_input_errors(tokenizers):
    tokenizer = tokenizers[SD1_PAD]
    for bad in (123, ["a cat", None], [b"bytes"]):
        with pytest.raises(PromptError):
            tokenizer(bad)
    with pytest.raises(PromptError, match="surrogate"):
        tokenizer("a \ud800 cat")
    with pytest.raises(ParameterError):
        tokenizer.decode([49408])
    with pytest.raises(ParameterError):
        Tokenizer(tokenizer.vocab, tokenizer.merges, max_length=78)
    assert tokenizer([]).shape == (0, 77)


# ---------------------------------------------------------------------- training

COLORS = "red green blue yellow purple orange black white gray pink".split()
SHAPES = "circle square triangle star hexagon cross ring diamond".split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first, second = (f"{rng.choice(['a', 'a small', 'a large'])} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
                         for _ in range(2))
        relation = rng.choice(["and", "above", "below", "left of", "right of", "next to"])
        out.append(f"{first} {relation} {second} on a {rng.choice(COLORS)} background")
    return out


def test_train_bpe(tmp_path):
    from transformers import CLIPTokenizer
    captions = synthetic_captions(400)
    tokenizer = train_bpe(captions, vocab_size=700)
    assert 600 < tokenizer.vocab_size <= 700
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (tokenizer.vocab_size - 2, tokenizer.vocab_size - 1,
                                                                      tokenizer.vocab_size - 1)
    assert all(tokenizer.decode(tokenizer.encode(c)) == c for c in captions)
    assert all(len(tokenizer.encode(word)) == 1 for word in COLORS + SHAPES + ["background"])
    unseen = ["A Purple Hexagon!? 123 ünïcödé 🐱", "it's a RED circle\tand a cat", "", "猫 " * 40]
    texts = captions[:200] + unseen
    tokenizer.save(tmp_path)
    oracle = CLIPTokenizer.from_pretrained(tmp_path)
    assert oracle_call(oracle, texts)[0] == quiet_call(tokenizer, texts).tolist()
    with pytest.warns(UnknownWordWarning, match=re.escape("does not hold these words: '!?', 'ünïcödé', '🐱';")):
        assert tokenizer.decode(tokenizer(unseen[0])[0]) == "a purple hexagon !? 1 2 3 ünïcödé 🐱"
    assert torch.equal(quiet_call(Tokenizer.from_folder(tmp_path), texts), quiet_call(tokenizer, texts))
    with pytest.raises(ParameterError):
        train_bpe(captions, vocab_size=100)
