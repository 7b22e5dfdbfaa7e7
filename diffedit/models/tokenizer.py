"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), the one every SD 1.x/2.x text encoder reads.

    prompts  ->  ids (B, 77):  <|startoftext|>, up to 75 text tokens, <|endoftext|>, padding

Text pipeline, built from the pieces of the `tokenizers` library:
    1. normalise: Unicode NFC, every whitespace run to one space, lower case;
    2. split with CLIP's regex into contractions, letter runs, single digits and runs of other
       symbols (whitespace is dropped);
    3. map each piece's UTF-8 bytes to 256 printable characters (GPT-2's reversible byte table);
    4. byte-pair merges, in rank order, inside each piece; a piece's last symbol carries "</w>".
<|startoftext|> and <|endoftext|> typed in a prompt are read as the special tokens.

Differences from OpenAI's reference code (which transformers' CLIPTokenizer shares): no ftfy repair
and no HTML unescaping ("&amp;" stays three tokens), as in transformers. Unlike transformers, the
SD 2.x padding token "!" is only used for padding: a "!" typed in a prompt is the ordinary token
"!</w>" (256), as in OpenCLIP, which SD 2's text encoder was trained with (diffusers issue #4153).

Vocabulary layout (CLIP's, and that of `train_bpe`): the 256 byte characters, the same with "</w>",
one token per merge, then <|startoftext|> and <|endoftext|>.
"""

from __future__ import annotations

import gzip
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
import torch
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, trainers

from diffedit.errors import ModelLoadError, OutputFileError, ParameterError, PromptError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77                       # positions of the text encoder: BOS + 75 + EOS
CLIP_MERGES = 49408 - 2 * 256 - 2         # 48,894 merges used out of OpenAI's list
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
CLIP_BPE_FILE = WEIGHTS / "clip" / "bpe_simple_vocab_16e6.txt.gz"

Merges = list[tuple[str, str]]


CLOSED_VOCABULARY = 4096   # fewer tokens: a vocabulary learnt on a closed world (the embedded model's has 583)


class TruncationWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the end was dropped."""


class UnknownWordWarning(UserWarning):
    """A prompt has words a closed vocabulary does not hold whole: its model never read them."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte table: printable Latin-1 bytes stand for themselves, the 68 others
    (control characters, space, NBSP, soft hyphen) are moved to U+0100..U+0143, in byte order.
    The dict's order (printable bytes first) is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clip_vocab(merges: Merges) -> dict[str, int]:
    """CLIP's vocabulary layout for a merge list: bytes, bytes + "</w>", merges, BOS, EOS."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelLoadError("the merge list creates the same token twice; it is not a byte-level BPE merge list.")
    return vocab


def clip_pipeline(bpe: models.BPE) -> tokenizers.Tokenizer:
    """A `tokenizers` pipeline around `bpe` that normalises and splits text as CLIP does."""
    pipeline = tokenizers.Tokenizer(bpe)
    pipeline.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),        # CLIP's whitespace_clean (the split drops spaces anyway)
        normalizers.Lowercase(),
    ])
    # invert=True: the regex matches the pieces to keep, and what lies between them (whitespace) is
    # removed. ByteLevel's own GPT-2 split (use_regex) then changes one thing only: a special-token
    # lookalike that lower-casing produced ("<|ENDOFTEXT|>") is cut into "<|", "endoftext", "|>", as
    # in transformers (OpenAI's code would read it as <|endoftext|>).
    pipeline.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return pipeline


class Tokenizer:
    """Prompts to the (B, 77) token ids of a CLIP text encoder."""

    def __init__(self, vocab: dict[str, int], merges: Merges, pad_token: str = EOS, max_length: int = CONTEXT_LENGTH):
        for token, role in ((BOS, "start"), (EOS, "end"), (pad_token, "padding")):
            if token not in vocab:
                raise ModelLoadError(f"the {role} token {token!r} is not in the vocabulary; use CLIP's vocabulary "
                                     "(or a pad token that is in it).")
        missing = [c for c in bytes_to_unicode().values() for t in (c, c + END_OF_WORD) if t not in vocab]
        if missing:
            raise ModelLoadError(f"the vocabulary lacks {len(missing)} of the 512 byte tokens (e.g. {missing[0]!r}), "
                                 "so some text could not be encoded; use a byte-level CLIP vocabulary.")
        if not 2 <= max_length <= CONTEXT_LENGTH:
            raise ParameterError(f"max_length must be between 2 and {CONTEXT_LENGTH} (BOS and EOS included), "
                                 f"got {max_length}.")
        merges = [tuple(m) for m in merges]
        try:
            bpe = models.BPE(vocab=dict(vocab), merges=merges, end_of_word_suffix=END_OF_WORD,
                             continuing_subword_prefix="", fuse_unk=False)
        except Exception as e:
            raise ModelLoadError(f"the vocabulary and merges do not fit together ({e}); "
                                 "use the vocab.json and merges.txt of one tokenizer.") from None
        self._pipeline = clip_pipeline(bpe)
        # Typed exactly, <|startoftext|> and <|endoftext|> are cut out of the raw text before normalisation.
        self._pipeline.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
        self.vocab, self.merges = dict(vocab), merges
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._pad_token, self._max_length = pad_token, max_length

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, pad_token: str = EOS,
                   max_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """A vocab.json and merges.txt pair (the transformers / diffusers files)."""
        return cls(read_vocab(Path(vocab_json)), read_merges(Path(merges_txt)), pad_token, max_length)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """The tokenizer/ folder of a diffusers-layout model: vocab.json and merges.txt (or a
        transformers tokenizer.json), plus special_tokens_map.json and/or tokenizer_config.json,
        which say the padding token (SD 1.x "<|endoftext|>", SD 2.x "!") and the maximum length."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a folder; pass the tokenizer/ folder of a diffusers-layout model.")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = read_vocab(folder / "vocab.json"), read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise ModelLoadError(f"{folder} has no vocab.json and merges.txt (nor a tokenizer.json); "
                                 "copy the tokenizer files of the model there.")
        special_map, config = folder / "special_tokens_map.json", folder / "tokenizer_config.json"
        if not special_map.is_file() and not config.is_file():
            raise ModelLoadError(f"{folder} has neither special_tokens_map.json nor tokenizer_config.json, so its "
                                 "padding token (SD 1.x '<|endoftext|>', SD 2.x '!') is unknown; copy them from the model.")
        special = _read_json(special_map) if special_map.is_file() else {}
        config = _read_json(config) if config.is_file() else {}
        pad_token = _token_text(special.get("pad_token") or config.get("pad_token") or EOS, folder)
        max_length = config.get("model_max_length", CONTEXT_LENGTH)
        if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or max_length != max_length \
                or max_length < 2:
            raise ModelLoadError(f"{folder / 'tokenizer_config.json'} has model_max_length {max_length!r}; "
                                 f"set it to {CONTEXT_LENGTH}.")
        return cls(vocab, merges, pad_token, int(min(max_length, CONTEXT_LENGTH)))

    @classmethod
    def from_clip_bpe(cls, path: str | Path, pad_token: str = EOS) -> Tokenizer:
        """OpenAI's bpe_simple_vocab_16e6.txt.gz: the vocabulary is rebuilt from the merges."""
        vocab, merges = _read_clip_bpe(str(Path(path).resolve()))
        return cls(vocab, merges, pad_token)

    @classmethod
    def default(cls, pad_token: str = EOS) -> Tokenizer:
        """CLIP's tokenizer from the merge list shipped in the repository's weights/clip/."""
        if not CLIP_BPE_FILE.is_file():
            raise ModelLoadError(f"CLIP's merge list {CLIP_BPE_FILE} is missing; install diffedit-sd from its "
                                 "repository (editable), or load a model folder that has a tokenizer/.")
        return cls.from_clip_bpe(CLIP_BPE_FILE, pad_token)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json, the
        layout that diffusers and transformers' CLIPTokenizer.from_pretrained read."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
            merges = "".join(f"{a} {b}\n" for a, b in self.merges)
            (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
            special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
            (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
            config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special}
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as e:
            raise OutputFileError(f"cannot write the tokenizer to {folder} ({e.strerror}); choose a writable folder.") from None

    # ------------------------------------------------------------------ properties

    @property
    def pad_token(self) -> str:
        return self._pad_token

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]

    @property
    def pad_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def max_length(self) -> int:
        return self._max_length

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        """The text's token ids, without BOS/EOS and without truncation."""
        return self._pipeline.encode(_check_prompt(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text back from ids. BOS is skipped and the first EOS ends the text (what follows is padding);
        the text comes back normalised (lower case, single spaces) as the encoder saw it."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pieces = []
        for i in ids:
            if i == self.eos_id:
                break
            if i == self.bos_id:
                continue
            token = self._id_to_token.get(i)
            if token is None:
                raise ParameterError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}).")
            word_end = token.endswith(END_OF_WORD)
            pieces.append(bytes(self._char_to_byte[c] for c in (token[:-len(END_OF_WORD)] if word_end else token)))
            if word_end:
                pieces.append(b" ")
        return b"".join(pieces).decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length): BOS, the prompt's tokens, EOS, then padding. Longer prompts keep
        their first max_length - 2 tokens and raise a TruncationWarning that says what was dropped."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)):
            raise PromptError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}.")
        encodings = self._pipeline.encode_batch([_check_prompt(p) for p in prompts], add_special_tokens=False)
        room = self.max_length - 2
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            if len(tokens) > room:
                self._warn_truncated(tokens[room:])
                tokens = tokens[:room]
            ids[row, :len(tokens) + 2] = torch.tensor([self.bos_id, *tokens, self.eos_id])
        if self.vocab_size < CLOSED_VOCABULARY:
            self._warn_unknown(encodings)
        return ids

    def _warn_unknown(self, encodings) -> None:
        """A closed vocabulary (the embedded model's) holds every word its training captions use as
        one token; a word spelt in several pieces is one the model never read: say which."""
        unknown = {}
        for encoding in encodings:
            pieces: dict[int, list[int]] = {}
            for word, token in zip(encoding.word_ids, encoding.ids):
                pieces.setdefault(word, []).append(token)
            unknown.update(dict.fromkeys(self.decode(ids) for ids in pieces.values() if len(ids) > 1))
        if unknown:
            words = ", ".join(repr(w) for w in list(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
            these, them = ("these words", "them, so they do") if len(unknown) > 1 else ("this word", "it, so it does")
            warnings.warn(f"this model's {self.vocab_size}-token vocabulary does not hold {these}: {words}; its "
                          f"model never read {them} not steer the image (its model card lists the words it knows).",
                          UnknownWordWarning, stacklevel=3)

    def _warn_truncated(self, dropped: list[int]) -> None:
        text = self.decode(dropped)
        text = text if len(text) <= 80 else text[:77] + "..."
        warnings.warn(f"prompt truncated to {self.max_length} tokens: {len(dropped)} "
                      f"token{'s' if len(dropped) != 1 else ''} dropped ({text!r})", TruncationWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r}, max_length={self.max_length})"


def train_bpe(captions: Iterable[str], vocab_size: int, pad_token: str = EOS) -> Tokenizer:
    """A CLIP-style byte-level BPE learnt on `captions` with CLIP's normalisation and split: the 512
    byte tokens, the learnt merges, then <|startoftext|> and <|endoftext|>. `vocab_size` is an upper
    bound: a small corpus may run out of pairs to merge first (see `.vocab_size`)."""
    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0:
        raise ParameterError(f"vocab_size must be at least {2 * 256 + 2} (512 byte tokens, BOS, EOS), got {vocab_size}.")
    pipeline = clip_pipeline(models.BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    # The trainer's vocabulary also counts the byte alphabet (<= 512 symbols), so asking for
    # vocab_size leaves room for at least n_merges merges.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix=END_OF_WORD, show_progress=False)
    pipeline.train_from_iterator((_check_prompt(c) for c in captions), trainer)
    learnt = json.loads(pipeline.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt][:n_merges]
    return Tokenizer(clip_vocab(merges), merges, pad_token)


# ---------------------------------------------------------------------- files

def read_vocab(path: Path, vocab=None) -> dict[str, int]:
    vocab = _read_json(path) if vocab is None else vocab
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in vocab.values()):
        raise ModelLoadError(f"{path} is not a vocabulary (a JSON object of token -> id); restore the file.")
    return vocab


def read_merges(path: Path) -> Merges:
    """merges.txt: an optional "#version" header, then one "left right" pair per line, by rank."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; a CLIP tokenizer needs its merges.txt.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} cannot be read ({e}); restore the file.") from None
    return _parse_merges(lines[1:] if lines and lines[0].startswith("#version") else lines, path)


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], Merges]:
    """The vocabulary and merges inside a `tokenizers` tokenizer.json (what transformers 5 saves)."""
    model = _read_json(path).get("model", {})
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ModelLoadError(f"{path} is not a CLIP tokenizer (a BPE with '</w>' word ends); "
                             "use the tokenizer/ folder of a Stable Diffusion 1.x/2.x model.")
    merges = model.get("merges", [])
    merges = [m.split(" ") if isinstance(m, str) else m for m in (merges if isinstance(merges, list) else [None])]
    if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in merges):
        raise ModelLoadError(f"{path} has malformed merges; restore the file.")
    return read_vocab(path, model.get("vocab", {})), [tuple(m) for m in merges]


@lru_cache(maxsize=2)
def _read_clip_bpe(path: str) -> tuple[dict[str, int], Merges]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; pass the path of CLIP's bpe_simple_vocab_16e6.txt.gz.") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} cannot be read as a gzipped text file ({e}); restore the file.") from None
    if len(lines) < 1 + CLIP_MERGES:
        raise ModelLoadError(f"{path} has {len(lines) - 1} merges, fewer than CLIP's {CLIP_MERGES}; restore the file.")
    merges = _parse_merges(lines[1:1 + CLIP_MERGES], Path(path))
    return clip_vocab(merges), merges


def _parse_merges(lines: list[str], path: Path) -> Merges:
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ModelLoadError(f"{path}: merge {number} is {line!r}, not two tokens separated by a space; "
                                 "restore the file.")
        merges.append((pair[0], pair[1]))
    return merges


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; copy the tokenizer files of the model there.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); restore the file.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the file.")
    return data


def _token_text(token, folder: Path) -> str:
    """A special token as written by transformers: a string, or an AddedToken dict with "content"."""
    text = token.get("content") if isinstance(token, dict) else token
    if not isinstance(text, str):
        raise ModelLoadError(f"the pad_token in {folder} is {token!r}, not a token; restore the tokenizer files.")
    return text


def _check_prompt(text) -> str:
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(f"the prompt {text[:40]!r} contains a lone surrogate character, which is not text; "
                          "remove it.") from None
    return text
