"""A small byte-level BPE tokenizer trained offline with the ``tokenizers`` package.

Digits are split one per token before BPE, so every number is spelled digit by digit: the
arithmetic then uses the same ten digit tokens whatever the numbers (a merged "15" token would be
one more symbol whose value the model has to learn separately).
"""

from __future__ import annotations

from typing import List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_tokenizer(texts: List[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class TextCodec:
    """The few calls the study needs, with the special ids at hand."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def load(cls, path: str) -> "TextCodec":
        return cls(Tokenizer.from_file(path))

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
