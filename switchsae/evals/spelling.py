"""The first-letter task of feature absorption (SAEBench; Chanin et al. 2024): single-token words of
the model's vocabulary in an in-context spelling prompt, and the model's activation on each word.

Vocabulary: every token that decodes to a space followed by ASCII letters only (``" cat"``), its
class the word's first letter. A random ``words`` of them (seeded) are split ``train_fraction`` /
rest into train and test words, as SAEBench splits the vocabulary.

Prompt (SAEBench's template ``"{word} has the first letter:"``, answer ``" C"``, lines joined by
``"\\n"`` and a leading ``"\\n"``), built from token ids so that every word stays one token::

    BOS \\n w_1 has the first letter: W_1 \\n w_2 has the first letter: W_2 \\n ...

SAEBench writes one prompt per word (10 random example lines of the same split, then the word) and
reads the activation at the word. To spend a forward pass on many words, a prompt here holds
``icl_examples`` example lines and then ``words_per_prompt`` more lines whose words are all read:
every read word, like SAEBench's, follows at least ``icl_examples`` completed example lines of its
split (and at most ``icl_examples + words_per_prompt − 1``). Each word is read once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from switchsae.sources.hooks import HookPoint, capture

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE_SUFFIX = " has the first letter:"


def first_letter_vocab(tokenizer) -> list[tuple[int, str]]:
    """``(token id, word)`` of every token decoding to a space then ASCII letters, in id order."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            words.append((token_id, text))
    return words


@dataclass
class SpellingSplit:
    """Activations at the words of one split: ``acts: [n, d]``, ``letters: [n]`` (0 = a), ``words``."""

    acts: Tensor
    letters: Tensor
    words: list[str]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _line_parts(tokenizer) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """Token ids of the line separator, the template after the word, and each letter's answer."""
    answers = {letter: _ids(tokenizer, " " + letter.upper()) for letter in LETTERS}
    if len({len(ids) for ids in answers.values()}) != 1:
        raise ValueError("The tokenizer splits some first-letter answers (' A' ... ' Z') into more tokens than "
                         "others, so the spelling prompts would not line up.")
    return _ids(tokenizer, "\n"), _ids(tokenizer, TEMPLATE_SUFFIX), answers


def spelling_prompts(tokenizer, words: list[tuple[int, str]], icl_examples: int, words_per_prompt: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts (module doc) reading every word of ``words`` once: ``ids [P, L]``, the read
    positions ``[P, words_per_prompt]`` and which word each reads (``-1``: padding)."""
    newline, suffix, answers = _line_parts(tokenizer)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    order = torch.randperm(len(words), generator=generator).tolist()
    prompts, positions, readers = [], [], []
    for start in range(0, len(order), words_per_prompt):
        targets = order[start:start + words_per_prompt]
        pool = torch.randperm(len(words), generator=generator).tolist()
        examples = [i for i in pool if i not in targets][:icl_examples]
        targets = targets + [examples[i % len(examples)] for i in range(words_per_prompt - len(targets))]
        ids, read = bos + newline, []
        for line, index in enumerate(examples + targets):
            token_id, word = words[index]
            if line >= len(examples):
                read.append(len(ids))
            ids = ids + [token_id] + suffix + answers[word[1].lower()] + newline
        prompts.append(ids)
        positions.append(read)
        real = order[start:start + words_per_prompt]
        readers.append(real + [-1] * (words_per_prompt - len(real)))
    return torch.tensor(prompts), torch.tensor(positions), torch.tensor(readers)


@torch.no_grad()
def spelling_split(model: nn.Module, tokenizer, hook: HookPoint, words: list[tuple[int, str]], icl_examples: int,
                   words_per_prompt: int, generator: torch.Generator, batch_size: int = 8,
                   progress: bool = False) -> SpellingSplit:
    """The activation at ``hook`` on every word of one split, examples drawn from the same split."""
    if len(words) <= icl_examples:
        raise ValueError(f"A split of {len(words)} words cannot give {icl_examples} example lines per prompt; "
                         f"use more words or fewer examples.")
    ids, positions, readers = spelling_prompts(tokenizer, words, icl_examples, words_per_prompt, generator)
    acts = torch.zeros(len(words), 0)
    for start in tqdm(range(0, ids.shape[0], batch_size), desc="spelling prompts", disable=not progress):
        out = capture(model, hook, ids[start:start + batch_size]).float().cpu()
        rows = torch.arange(out.shape[0]).unsqueeze(1)
        read = out[rows, positions[start:start + batch_size]]  # [b, words_per_prompt, d]
        who = readers[start:start + batch_size]
        if acts.shape[1] == 0:
            acts = torch.zeros(len(words), out.shape[-1])
        acts[who[who >= 0]] = read[who >= 0]
    letters = torch.tensor([LETTERS.index(word[1].lower()) for _, word in words])
    return SpellingSplit(acts, letters, [word for _, word in words])


def spelling_data(model: nn.Module, tokenizer, hook: HookPoint, n_words: int, train_fraction: float = 0.8,
                  icl_examples: int = 10, words_per_prompt: int = 30, seed: int = 42, batch_size: int = 8,
                  progress: bool = False) -> tuple[SpellingSplit, SpellingSplit]:
    """Train and test splits of ``n_words`` random vocabulary words (all if fewer), read as the module doc says."""
    vocab = first_letter_vocab(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    chosen = [vocab[i] for i in torch.randperm(len(vocab), generator=generator)[:n_words].tolist()]
    n_train = int(len(chosen) * train_fraction)
    train, test = (spelling_split(model, tokenizer, hook, part, icl_examples, words_per_prompt, generator,
                                  batch_size, progress) for part in (chosen[:n_train], chosen[n_train:]))
    return train, test
