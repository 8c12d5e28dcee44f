"""The held-out reference set: rebuilt bit for bit by its command, and sharing no clip and no
attribute combination with the training set, checked from either side."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from amg_engine.engine.default.data import SAMPLE_RATE, TRAIN_SPECS, clip_tensor, make_clips, write_dataset
from amg_engine.engine.default.heldout import (
    HELDOUT_DIR,
    HELDOUT_INDEX_DIR,
    HELDOUT_SPECS,
    MANIFEST,
    NOVEL_PROMPTS,
    attribute_values,
    is_novel_combination,
    main,
    make_heldout_clips,
    novel_manifest,
)
from amg_engine.engine.models import DEFAULT_MODEL_DIR
from amg_engine.index.embedders import MelEmbedder
from amg_engine.index.store import EmbeddingIndex

TRAIN_DIR = DEFAULT_MODEL_DIR.parent / "train"


@pytest.fixture(scope="module")
def embeddings():
    emb = MelEmbedder()
    return emb(clip_tensor(make_clips()), SAMPLE_RATE), emb(clip_tensor(make_heldout_clips()), SAMPLE_RATE)


def test_the_command_rebuilds_the_bundled_set_bit_for_bit(tmp_path):
    main([str(tmp_path / "heldout")])
    built = tmp_path / "heldout"
    committed = sorted(p.name for p in (HELDOUT_DIR / "audio").iterdir())
    assert committed == sorted(p.name for p in (built / "audio").iterdir())
    assert len(committed) == len(HELDOUT_SPECS)
    for name in committed:  # the same float64 synthesis and 16-bit FLAC encoding: identical bytes
        assert (built / "audio" / name).read_bytes() == (HELDOUT_DIR / "audio" / name).read_bytes(), name
    assert (built / MANIFEST).read_bytes() == (HELDOUT_DIR / MANIFEST).read_bytes()
    ours, theirs = EmbeddingIndex.load(tmp_path / "heldout-index"), EmbeddingIndex.load(HELDOUT_INDEX_DIR)
    assert (ours.ids, ours.captions, ours.embedder) == (theirs.ids, theirs.captions, theirs.embedder)
    # float32 mel embeddings: another CPU may round the last bits differently
    torch.testing.assert_close(ours.vectors, theirs.vectors, atol=1e-5, rtol=0)


def test_the_training_set_command_still_rebuilds_the_bundled_set_bit_for_bit(tmp_path):
    write_dataset(tmp_path)
    for p in sorted((TRAIN_DIR / "audio").iterdir()):
        assert (tmp_path / "audio" / p.name).read_bytes() == p.read_bytes(), p.name
    assert (tmp_path / "train.parquet").read_bytes() == (TRAIN_DIR / "train.parquet").read_bytes()


def test_no_attribute_combination_or_caption_is_shared_either_way():
    train, held = make_clips(), make_heldout_clips()
    assert all(c.spec is not None for c in train + held)
    train_specs, held_specs = {c.spec for c in train}, {c.spec for c in held}
    assert not any(s in train_specs for s in held_specs)  # held-out -> training
    assert not any(s in held_specs for s in train_specs)  # training -> held-out
    train_captions, held_captions = {c.caption for c in train}, {c.caption for c in held}
    assert not held_captions & train_captions and len(held_captions) == len(held)
    assert all(s.family != "texture" for s in held_specs)  # a texture's one attribute is always seen
    rows = pq.read_table(HELDOUT_DIR / MANIFEST).to_pylist()
    assert [r["caption"] for r in rows] == [c.caption for c in held]
    assert [(r["family"], r["instrument"], r["root"], r["quality"], r["bpm"]) for r in rows] == [
        (s.family, s.instrument, s.root, s.quality, s.bpm) for s in HELDOUT_SPECS
    ]


def test_no_clip_is_shared_either_way(embeddings):
    train, held = make_clips(), make_heldout_clips()
    same = [[len(a.audio) == len(b.audio) and np.array_equal(a.audio, b.audio) for b in train] for a in held]
    assert not np.any(same)
    e_train, e_held = embeddings
    sims = e_held @ e_train.T  # [held, train]
    # not even a near copy to the replication detector: every held-out clip's nearest training clip,
    # and every training clip's nearest held-out clip, stays under the 0.9 threshold
    assert sims.max(dim=1).values.max() < 0.9 and sims.max(dim=0).values.max() < 0.9


def test_heldout_covers_unseen_values_and_unseen_combinations():
    seen = set().union(*(attribute_values(s) for s in TRAIN_SPECS))
    unseen_value = [s for s in HELDOUT_SPECS if not attribute_values(s) <= seen]
    values = set().union(*(attribute_values(s) for s in unseen_value))
    assert {("bpm", 96), ("chord", ("C", "minor"))} <= values
    novel = [s for s in HELDOUT_SPECS if is_novel_combination(s)]
    assert {s.family for s in novel} == {"drum loop", "pad", "arpeggio"}
    assert len(unseen_value) + len(novel) == len(HELDOUT_SPECS)


def test_novel_prompts_use_only_words_the_model_knows(tmp_path):
    vocab = json.loads((DEFAULT_MODEL_DIR / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    train_captions = {s.caption() for s in TRAIN_SPECS}
    assert len(NOVEL_PROMPTS) >= 12
    for prompt in NOVEL_PROMPTS:
        words = prompt.lower().replace(",", " , ").split()
        assert all(w in vocab for w in words), prompt
        assert prompt not in train_captions
    rows = pq.read_table(novel_manifest(tmp_path / "novel.parquet")).to_pylist()
    assert [r["prompt"] for r in rows] == list(NOVEL_PROMPTS)
    assert len({r["id"] for r in rows}) == len(rows) and all(0 < r["seconds"] <= 1.024 for r in rows)
