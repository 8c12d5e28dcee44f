"""The default embedder separates replicas from non-replicas on the default training set."""

import numpy as np
import pytest
import torch

from amg_engine.engine.default.data import SAMPLE_RATE, WINDOW, clip_tensor, make_clips
from amg_engine.index.embedders import PERTURBATIONS, MelEmbedder, perturb


@pytest.fixture(scope="module")
def clips_and_embeddings():
    clips = make_clips()
    audio = clip_tensor(clips)
    emb = MelEmbedder()
    return clips, audio, emb, emb(audio, SAMPLE_RATE)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbed_clip_is_still_a_replica(clips_and_embeddings, kind):
    clips, audio, emb, e = clips_and_embeddings
    perturbed = emb(perturb(audio, kind, SAMPLE_RATE, torch.Generator().manual_seed(0)), SAMPLE_RATE)
    sims = (perturbed * e).sum(dim=1)
    assert sims.min() >= emb.replication_threshold, [clips[i].caption for i in torch.nonzero(sims < 0.9)]


def test_distinct_training_clips_are_not_replicas(clips_and_embeddings):
    clips, _, emb, e = clips_and_embeddings
    same_audio = torch.tensor([[np.array_equal(a.audio, b.audio) for b in clips] for a in clips])
    sims = (e @ e.T).masked_fill(same_audio, -1.0)
    worst = sims.max()
    i, j = divmod(int(sims.argmax()), len(clips))
    # measured 0.86: the two different clips that share the caption "An electronic drum loop, 135 bpm"
    # (same kit and tempo, another pattern); every other pair of distinct clips is lower
    assert worst < emb.replication_threshold - 0.03, (clips[i].caption, clips[j].caption, float(worst))


def test_embedding_is_unit_norm_differentiable_and_rate_aware(clips_and_embeddings):
    _, audio, emb, e = clips_and_embeddings
    assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)
    x = audio[:3].clone().requires_grad_(True)
    emb(x, SAMPLE_RATE).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the same audio at 16 kHz (resampled inside) embeds like the 8 kHz original
    import torchaudio

    up = torchaudio.functional.resample(audio[:3], SAMPLE_RATE, 16000)
    assert ((emb(up, 16000) * e[:3]).sum(dim=1) > 0.95).all()


def test_silence_is_not_similar_to_anything(clips_and_embeddings):
    _, _, emb, e = clips_and_embeddings
    silent = emb(torch.zeros(1, 1, WINDOW), SAMPLE_RATE)
    assert torch.isfinite(silent).all()
    assert (silent @ e.T).abs().max() < 0.5


def test_v1_stays_loadable_with_its_old_identity():
    from amg_engine.index.embedders import EMBEDDERS

    v1 = EMBEDDERS["mel-pattern-v1"].build(None, False)
    assert v1.info.name == "mel-pattern-v1" and v1.info.checkpoint_hash == "5bde411ecc4b42a4"
    assert MelEmbedder().info.name == "mel-pattern-v2" and MelEmbedder().info != v1.info
