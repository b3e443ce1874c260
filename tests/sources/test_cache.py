"""Activation caches: build, read, resume, detect damage, shuffle deterministically, hold rows out."""
from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from switchsae.sources import shards
from tiny_lm import wiki_texts
from switchsae.sources.activations import ActivationSource, Shuffle, open_activations
from switchsae.sources.cache import ActivationCache, build_cache, check, check_compatible
from switchsae.sources.hooks import HookPoint, capture
from switchsae.sources.models import load_model
from switchsae.sources.text import take_windows

HOOK = "blocks.1.hook_resid_post"
SETTINGS = dict(context_length=32, batch_size=8, dtype="fp32", shard_tokens=1000, progress=False)
N_TOKENS = 3000  # 31 rows per window, shards of 992 rows: 992 + 992 + 992 + 24


def build(llama_dir, corpus, out, **overrides):
    return build_cache(str(llama_dir), HOOK, corpus, N_TOKENS, out, **{**SETTINGS, **overrides})


def stored_rows(folder) -> np.ndarray:
    manifest = shards.read_manifest(folder)
    return np.concatenate([shards.open_shard(folder, entry, manifest) for entry in manifest["shards"]])


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_dir, wiki_corpus):
    return build(llama_dir, wiki_corpus, tmp_path_factory.mktemp("cache") / "acts")


def test_rows_are_the_hooked_activations_without_the_first_position(built, llama_dir, wiki_corpus):
    manifest = shards.read_manifest(built)
    assert manifest["complete"] and manifest["hook"] == HOOK and manifest["drop_first"] == 1
    assert [entry["rows"] for entry in manifest["shards"]] == [992, 992, 992, 24]
    assert manifest["d_model"] == 32 and manifest["tokenizer"]["bos_token_id"] == 0
    model, tokenizer = load_model(str(llama_dir))
    windows = take_windows(tokenizer, wiki_corpus, 32, 97)
    expected = capture(model, HookPoint.parse(HOOK), windows)[:, 1:].reshape(-1, 32)[:N_TOKENS]
    torch.testing.assert_close(torch.from_numpy(stored_rows(built)), expected)


def test_every_row_knows_its_window_position_and_token(built, llama_dir, wiki_corpus):
    cache = ActivationCache(built, verify=True)
    _, tokenizer = load_model(str(llama_dir))
    windows = take_windows(tokenizer, wiki_corpus, 32, 97)
    assert cache.has_token_ids and cache.windows().shape == (97, 32)
    np.testing.assert_array_equal(cache.windows(), windows.numpy())
    rows = np.array([0, 30, 31, 2999])
    window, position = cache.locate(rows)
    assert window.tolist() == [0, 0, 1, 96] and position.tolist() == [1, 31, 1, 24]
    assert cache.token_ids(rows).tolist() == windows[window, position].tolist()


def test_batches_carry_the_token_ids_of_their_rows(built):
    cache = ActivationCache(built)
    everything = torch.from_numpy(stored_rows(built))
    for (x, ids), plain in zip(islice(cache.train_batches(64, seed=3, token_ids=True), 3),
                               cache.train_batches(64, seed=3)):
        torch.testing.assert_close(x, plain)
        rows = [int((everything == row).all(1).nonzero()[0]) for row in x[:5]]
        assert ids[:5].tolist() == cache.token_ids(np.array(rows)).tolist()
    x, ids = next(cache.eval_batches(50, token_ids=True))
    assert ids.tolist() == cache.token_ids(np.arange(cache.n_train, cache.n_train + 50)).tolist()


def test_caches_without_token_ids_still_read(built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built, old)
    manifest = shards.read_manifest(old)
    for entry in manifest["shards"]:
        (old / entry.pop("windows")).unlink()
        del entry["windows_sha256"]
    shards.write_manifest(old, manifest)
    cache = ActivationCache(old, verify=True)
    assert not cache.has_token_ids and next(cache.eval_batches(8)).shape == (8, 32)
    with pytest.raises(ValueError, match="stores no token ids"):
        cache.token_ids(np.array([0]))


def test_damaged_token_file_is_named(built, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    path = damaged / "windows_00002.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="Token file windows_00002.bin .* truncated or corrupt"):
        ActivationCache(damaged)


def test_bf16_storage_rounds_the_same_rows(built, llama_dir, wiki_corpus, tmp_path):
    out = build(llama_dir, wiki_corpus, tmp_path / "bf16", dtype="bf16")
    rows = torch.from_numpy(stored_rows(out)).view(torch.bfloat16)
    torch.testing.assert_close(rows, torch.from_numpy(stored_rows(built)).bfloat16())
    assert ActivationCache(out).eval_batches(64).__next__().dtype == torch.float32


def test_interrupted_build_resumes_from_the_last_complete_shard(built, llama_dir, wiki_corpus, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    real_write, written = shards.write_shard, []

    def crash_on_third(folder, index, rows, windows):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(index)
        return real_write(folder, index, rows, windows)
    monkeypatch.setattr(shards, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(llama_dir, wiki_corpus, out)
    monkeypatch.setattr(shards, "write_shard", real_write)
    partial = shards.read_manifest(out)
    assert len(partial["shards"]) == 2 and not partial["complete"]
    with pytest.raises(ValueError, match="incomplete \\(1984 of 3000 rows\\)"):
        ActivationCache(out)
    build(llama_dir, wiki_corpus, out)
    assert shards.read_manifest(out)["shards"] == shards.read_manifest(built)["shards"]


def test_a_finished_cache_is_not_rebuilt_and_settings_must_match(built, llama_dir, wiki_corpus):
    before = shards.read_manifest(built)
    build(llama_dir, wiki_corpus, built)
    assert shards.read_manifest(built) == before
    with pytest.raises(ValueError, match="other settings \\(context_length 32 vs 64"):
        build(llama_dir, wiki_corpus, built, context_length=64)
    with pytest.raises(ValueError, match="already holds an activation cache"):
        build(llama_dir, wiki_corpus, built, resume=False)


@pytest.mark.parametrize("wrong, words", [
    (dict(hook="blocks.9.hook_resid_post"), "Layer 9 is out of range"),
    (dict(corpus="nope.jsonl"), "Corpus not found: nope.jsonl"),
])
def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(llama_dir, wiki_corpus, tmp_path, wrong,
                                                                         words):
    out = tmp_path / "acts"
    settings = {"hook": HOOK, "corpus": wiki_corpus, **wrong}
    with pytest.raises((ValueError, FileNotFoundError), match=words):
        build_cache(str(llama_dir), settings["hook"], settings["corpus"], N_TOKENS, out, **SETTINGS)
    assert not (out / shards.MANIFEST).exists()
    assert shards.read_manifest(build(llama_dir, wiki_corpus, out))["complete"]


def test_a_build_that_stored_no_shard_gives_way_to_one_with_other_settings(llama_dir, wiki_corpus, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "acts"

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shards, "write_shard", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build(llama_dir, wiki_corpus, out)
    assert shards.read_manifest(out)["shards"] == []
    monkeypatch.undo()
    assert shards.read_manifest(build(llama_dir, wiki_corpus, out, context_length=64))["context_length"] == 64


def test_corpus_too_small_for_n_tokens(llama_dir, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(" ".join(wiki_texts(3)))
    with pytest.raises(ValueError, match="ran out after .* of the 3000 activation rows"):
        build(llama_dir, corpus, tmp_path / "acts")


def test_fp16_overflow_is_refused(tmp_path, llama_dir, wiki_corpus):
    model, tokenizer = load_model(str(llama_dir))
    model.get_input_embeddings().weight.mul_(1e7)
    model.save_pretrained(tmp_path / "loud")
    tokenizer.save_pretrained(tmp_path / "loud")
    with pytest.raises(ValueError, match="beyond float16's maximum of 65504; build the cache with dtype='bf16'"):
        build_cache(str(tmp_path / "loud"), "blocks.0.hook_resid_pre", wiki_corpus, 500, tmp_path / "c",
                    **{**SETTINGS, "dtype": "fp16"})


def damaged_copy(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    return copy


def test_truncated_shard_is_named(built, tmp_path):
    copy = damaged_copy(built, tmp_path)
    with (copy / "shard_00001.bin").open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ValueError, match="Shard shard_00001.bin .* truncated or corrupt"):
        ActivationCache(copy)


def test_corrupt_shard_fails_its_checksum_on_open(built, tmp_path):
    copy = damaged_copy(built, tmp_path)
    with (copy / "shard_00002.bin").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xff")
    # shards of under 4 MiB are one checksummed block, which the check on open always samples
    with pytest.raises(ValueError, match="Shard shard_00002.bin .* fails its sha256 check \\(block 0 of 1\\)"):
        ActivationCache(copy)
    with pytest.raises(ValueError, match="Shard shard_00002.bin .* fails its sha256 check"):
        check(copy)
    assert check(built)["complete"]


def test_missing_shard_and_missing_manifest(built, tmp_path):
    copy = damaged_copy(built, tmp_path)
    (copy / "shard_00003.bin").unlink()
    with pytest.raises(FileNotFoundError, match="Shard shard_00003.bin .* is missing"):
        ActivationCache(copy)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ActivationCache(tmp_path)


def test_cache_is_an_activation_source(built):
    cache = open_activations(built)
    assert isinstance(cache, ActivationCache) and isinstance(cache, ActivationSource)
    assert cache.d_model == 32 and cache.n_tokens == N_TOKENS


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A synthetic cache whose row i holds the value i, in shards of 1000, 1000, 1000 and 500 rows."""
    folder = tmp_path_factory.mktemp("numbered")
    rows = torch.arange(3500, dtype=torch.float32).unsqueeze(1).expand(3500, 4)
    return shards.write_cache(folder, rows, 1000)


def row_ids(batches) -> list[int]:
    return torch.cat(list(batches))[:, 0].long().tolist()


@pytest.mark.parametrize("chunk_rows", [0, 100])  # 0: whole shards (the stream of older runs)
def test_train_stream_is_a_function_of_seed_and_step(numbered, chunk_rows):
    shuffle = Shuffle(buffer_bytes=1500 * 4 * 4, chunk_bytes=chunk_rows * 4 * 4)  # groups of two shards, or 15 chunks
    cache = ActivationCache(numbered)
    stream = list(islice(cache.train_batches(100, seed=3, shuffle=shuffle), 100))  # three epochs or more
    for step in (0, 1, 13, 27, 28, 41, 99):
        torch.testing.assert_close(next(cache.train_batches(100, seed=3, start_step=step, shuffle=shuffle)), stream[step])
    assert not torch.equal(next(cache.train_batches(100, seed=4, shuffle=shuffle)), stream[0])
    assert all(batch.dtype == torch.float32 and batch.shape == (100, 4) for batch in stream)
    first_group = row_ids(stream[:15])  # a group holds at least 1500 rows
    assert len(set(first_group)) == 1500  # sampled without replacement
    assert len({i // 1000 for i in first_group}) >= 2  # and from two shards or more at once


def test_chunks_mix_every_part_of_a_cache_into_each_buffer(numbered):
    """With a buffer of one shard's size, whole shards give batches from one shard (two where the short last
    shard joins another): a corpus stored in order trains in blocks. Chunks of 50 rows fill each buffer
    from three or four of the shards, and an epoch still uses every training row once."""
    cache = ActivationCache(numbered)

    def shards_per_batch(shuffle: Shuffle) -> list[int]:
        return [len({i // 1000 for i in row_ids([b])}) for b in islice(cache.train_batches(100, 0, shuffle=shuffle), 30)]

    assert max(shards_per_batch(Shuffle(buffer_bytes=1000 * 16, chunk_bytes=0))) <= 2
    chunked = Shuffle(buffer_bytes=1000 * 16, chunk_bytes=50 * 16)
    assert min(shards_per_batch(chunked)) >= 3
    epoch = list(islice(cache.train_batches(100, 0, shuffle=chunked), 30))  # groups of >= 1000 rows: 10 batches each
    assert len(set(row_ids(epoch))) == 3000  # three full groups, without replacement; the last <= 325 rows follow
    assert len(set(row_ids(islice(cache.train_batches(100, 0, shuffle=chunked), 300)))) == 3325  # each epoch's own skip


def test_held_out_rows_never_enter_the_training_stream(numbered):
    cache = ActivationCache(numbered)
    assert cache.n_train == 3325  # 5% of 3500 rows held out, the last ones
    assert row_ids(cache.eval_batches(64)) == list(range(3325, 3500))
    assert set(row_ids(islice(cache.train_batches(50, seed=0), 300))) == set(range(3325))


def test_batch_larger_than_the_training_rows(numbered):
    with pytest.raises(ValueError, match="batch_size 5000 exceeds the 3325 training rows"):
        next(ActivationCache(numbered).train_batches(5000, seed=0))


def test_check_compatible(built):
    manifest = shards.read_manifest(built)
    check_compatible(manifest, manifest["model"], HOOK)
    with pytest.raises(ValueError, match="model: cache has '.*', asked for 'gpt2'; hook: cache has "
                                         "'blocks.1.hook_resid_post', asked for 'blocks.2.hook_mlp_out'"):
        check_compatible(manifest, "gpt2", HookPoint(2, "mlp_out"))


def test_held_out_windows_come_from_the_stored_token_ids(built, llama_dir, wiki_corpus, tmp_path):
    from switchsae.pipeline import held_out_windows

    _, tokenizer = load_model(str(llama_dir))
    cache = ActivationCache(built)
    stored = held_out_windows(cache, tokenizer, 200)
    cache.has_token_ids = False  # what a cache from before token ids gets: the corpus re-tokenised
    retokenised = held_out_windows(cache, tokenizer, 200)
    assert stored.shape == (5, 32) and retokenised.shape == (6, 32)  # the cache ends inside window 97
    torch.testing.assert_close(stored, retokenised[:5])
