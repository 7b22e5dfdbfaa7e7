"""A closed vocabulary (the embedded model's 583 tokens, learnt on its 19-word world) says which
words of a prompt its model never read; CLIP's open vocabulary says nothing (a rare word spelt in
pieces is still a word SD was trained on)."""

import warnings

import pytest

from diffedit.models.tokenizer import Tokenizer, UnknownWordWarning
from diffedit.pipeline import EMBEDDED_MODEL, DiffEditPipeline
from diffedit.shapes.scene import vocabulary


@pytest.fixture(scope="module")
def closed() -> Tokenizer:
    return Tokenizer.from_folder(EMBEDDED_MODEL / "tokenizer")


def test_words_outside_a_closed_vocabulary_are_named(closed):
    with pytest.warns(UnknownWordWarning, match=r"583-token vocabulary does not hold these words: 'purple', 'hexagon'; its model never read them, so they"):
        closed(["a purple circle on a gray background", "a red hexagon and a purple square"])
    with pytest.warns(UnknownWordWarning, match=r"does not hold this word: 'reds'; its model never read it"):
        closed("a reds circle")


def test_every_word_of_the_world_passes_silently(closed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closed([" ".join(vocabulary()), "a red circle and a green square on a gray background", ""])


def test_an_open_vocabulary_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.default()(["a bowl of fruits", "a xylophonist's antidisestablishmentarianism"])


def test_the_pipeline_says_it_once_per_prompt():
    pipe = DiffEditPipeline.from_pretrained()
    with pytest.warns(UnknownWordWarning, match="'purple'"):
        pipe.encode_prompt("a purple circle on a gray background")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_prompt("a purple circle on a gray background")    # kept: encoded, and said, once
