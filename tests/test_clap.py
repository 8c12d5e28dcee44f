"""LAION-CLAP embedder: equal to laion_clap's own path, checkpoint layouts, window and rate handling.

No CLAP weights can be downloaded here, so every test uses a randomly initialised CLAP saved in the
``630k-audioset-best.pt`` layout. laion_clap's own ``CLAP_Module`` is built offline by replacing
its ``RobertaModel.from_pretrained('roberta-base')`` with a tiny random RoBERTa (the text branch
plays no part in audio embeddings).
"""

import json

import pytest
import torch
import torchaudio
from clap_helpers import build_laion_clap, write_clap_checkpoint

from amg_engine.index.clap import ClapEmbedder, ClapTextUnavailable, repeat_pad
from amg_engine.index.embedders import EmbedderInfo, EmbedderMismatch, load_embedder
from amg_engine.index.files import file_digest

pytestmark = pytest.mark.integration  # make test-latest runs it on the newest releases

SR = 48_000


@pytest.fixture(scope="module")
def laion():
    return build_laion_clap(seed=0)


@pytest.fixture(scope="module")
def checkpoint(laion, tmp_path_factory):
    return write_clap_checkpoint(laion, tmp_path_factory.mktemp("clap") / "630k-audioset-best.pt")


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return ClapEmbedder(checkpoint)


def clips(seconds: float, n: int = 2, seed: int = 0, rate: int = SR) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, 1, int(seconds * rate), generator=g)  # [B, 1, T]


def peak_normalised(x: torch.Tensor) -> torch.Tensor:
    """[B, T]: each clip over its peak, the project's normalisation of a clip (index/clip.py)."""
    return x / x.abs().amax(dim=-1, keepdim=True)


def test_audio_embedding_equals_laion_clap(laion, embedder):
    """Same weights, same (peak-normalised) audio: ours == CLAP_Module.get_audio_embedding_from_data
    (use_tensor=True), for full 10 s clips and for 4 s clips (laion_clap's repeatpad)."""
    assert embedder.info == EmbedderInfo("laion-clap-htsat-tiny", 48000, 512, embedder.info.checkpoint_hash)
    for seconds in (10, 4):
        x = clips(seconds)
        with torch.no_grad():
            ref = laion.get_audio_embedding_from_data(x=peak_normalised(x[:, 0]), use_tensor=True)
            ours = embedder(x, SR)
        assert ours.shape == (2, 512)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.norm(dim=1), torch.ones(2))


def test_checkpoint_layouts_round_trip(laion, checkpoint, embedder, tmp_path):
    """laion_clap's own loader reads our test checkpoint; a bare state dict (no wrapper, no "module.")
    loads to the same embeddings; the hash identifies the file; a mismatched file is refused."""
    x = clips(10, seed=1)
    with torch.no_grad():
        ours = embedder(x, SR)
        fresh = build_laion_clap(seed=1)  # other random weights ...
        before = fresh.get_audio_embedding_from_data(x=peak_normalised(x[:, 0]), use_tensor=True)
        fresh.load_ckpt(str(checkpoint), verbose=False)  # ... replaced by laion_clap's own loader
        after = fresh.get_audio_embedding_from_data(x=peak_normalised(x[:, 0]), use_tensor=True)
    assert (before - ours).abs().max() > 1e-2  # the load below really changes something
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=0)

    bare = tmp_path / "bare.pt"
    torch.save(laion.model.state_dict(), bare)
    info = EmbedderInfo("laion-clap-htsat-tiny", 48000, 512, file_digest(bare))
    assert info.checkpoint_hash != embedder.info.checkpoint_hash
    loaded = load_embedder(info, bare)  # the registry builds the embedder the index names
    assert isinstance(loaded, ClapEmbedder) and loaded.info == info
    with torch.no_grad():
        # two instances with the same weights and state: equal within float32 rounding of a unit vector
        torch.testing.assert_close(loaded(x, SR), ours, atol=1e-6, rtol=0)
    with pytest.raises(EmbedderMismatch, match="checkpoint"):
        load_embedder(embedder.info, bare)
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": {k: v for k, v in laion.model.state_dict().items() if "bn0" not in k}}, broken)
    with pytest.raises(ValueError, match="missing"):
        ClapEmbedder(broken)


def test_window_is_first_10s_or_repeat_padded(embedder):
    x4, x12 = clips(4, seed=2), clips(12, seed=3)
    by_hand = torch.cat([x4, x4, torch.zeros(2, 1, 2 * SR)], dim=-1)  # ⌊10/4⌋ = 2 repeats, then zeros
    assert by_hand.shape[-1] == 480_000
    torch.testing.assert_close(repeat_pad(x4[:, 0]), by_hand[:, 0], atol=0, rtol=0)  # copies: exact
    with torch.no_grad():
        torch.testing.assert_close(embedder(x4, SR), embedder(by_hand, SR), atol=1e-6, rtol=0)
        torch.testing.assert_close(embedder(x12, SR), embedder(x12[..., :480_000], SR), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 96000])
def test_resampling_to_48k_on_the_device(embedder, rate):
    """A clip at another rate is resampled to 48 kHz (torchaudio) before windowing and peak-normalised;
    only the part the window can see is resampled, which changes nothing in the window."""
    x = clips(11, rate=rate, seed=4)[..., :-7]  # an awkward length
    full = torchaudio.functional.resample(x[:, 0], rate, SR)
    torch.testing.assert_close(
        embedder.prepare(x, rate), peak_normalised(repeat_pad(full)), atol=1e-6, rtol=0
    )
    short = clips(3, rate=rate, seed=5)
    torch.testing.assert_close(
        embedder.prepare(short, rate),
        peak_normalised(repeat_pad(torchaudio.functional.resample(short[:, 0], rate, SR))),
    )


def test_reference_mode_takes_audio_as_48k(checkpoint, embedder):
    """reference=True: the published quirk, audio at any rate is read as if it were 48 kHz."""
    x = torch.cat([clips(4, n=1, rate=44100, seed=6), 0.5 * clips(4, n=1, rate=44100, seed=6)])
    quirk = ClapEmbedder(checkpoint, reference=True)
    with torch.no_grad():
        # two instances (same weights, same state) on the same samples, neither resampling
        torch.testing.assert_close(quirk(x, 44100), embedder(x, SR), atol=1e-6, rtol=0)
        assert (quirk(x, 44100) - embedder(x, 44100)).abs().max() > 1e-3


def test_embedding_is_differentiable_and_batch_invariant(embedder):
    x = clips(5, n=3, rate=44100, seed=7).requires_grad_(True)
    e = embedder(x, 44100)
    (e[:, :8].sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in embedder.parameters())
    with torch.no_grad():
        alone = embedder(x[1:2].detach(), 44100)
    torch.testing.assert_close(alone, e[1:2].detach(), atol=1e-5, rtol=0)
    embedder.train()
    assert not embedder.training and not embedder.audio.audio_branch.bn0.training


def test_text_features_without_local_tokenizer_raise(embedder, checkpoint, tmp_path):
    with pytest.raises(ClapTextUnavailable, match="text_encoder"):
        embedder.embed_text(["a drum loop"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ClapTextUnavailable, match="merges.txt"):
        ClapEmbedder(checkpoint, text_encoder=tmp_path).embed_text(["a drum loop"])


def write_tiny_tokenizer(folder, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of ``vocab_size`` tokens (specials, letters, space marker)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "Ġ", *letters, *(f"Ġ{c}" for c in letters), *"0123456789"]
    tokens = tokens[: vocab_size - 1] + ["<mask>"]
    assert len(tokens) == vocab_size
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def test_text_features_equal_laion_clap_with_local_files(laion, checkpoint, tmp_path):
    """With a local config + tokenizer the text path equals CLAP_Module.get_text_embedding; a
    tokenizer whose size does not match the encoder (e.g. the empty offline one) is refused."""
    from transformers import RobertaTokenizer

    laion.model.text_branch.config.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, laion.model.text_branch.config.vocab_size)
    clap = ClapEmbedder(checkpoint, text_encoder=tmp_path)
    texts = ["a drum loop", "warm pad"]
    tok = RobertaTokenizer.from_pretrained(str(tmp_path))

    def tokenize(t):
        return tok(t, padding="max_length", truncation=True, max_length=77, return_tensors="pt")

    with torch.no_grad():
        ref = laion.get_text_embedding(texts, tokenizer=tokenize, use_tensor=True)
        ours = clap.embed_text(texts)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    write_tiny_tokenizer(tmp_path, 5)  # the size of the "empty" tokenizer laion_clap gets offline
    with pytest.raises(ClapTextUnavailable, match="tokens"):
        ClapEmbedder(checkpoint, text_encoder=tmp_path).embed_text(texts)


def test_index_build_repeat_pads_like_clap(embedder, tmp_path):
    """The index builder reads clips at 48 kHz and fills short ones as CLAP does (repeatpad), so an
    index vector equals embedding the file's audio directly at its own rate."""
    import soundfile as sf

    from amg_engine.index.build import build_index_resumable, clips_from_folder

    x = clips(3, rate=44100, seed=8)
    for i in range(2):
        sf.write(tmp_path / f"clip{i}.wav", x[i, 0].numpy(), 44100, subtype="FLOAT")
    index = build_index_resumable(clips_from_folder(tmp_path), embedder, tmp_path / "idx", progress=False)
    assert index.embedder == embedder.info and index.seconds == [3.0, 3.0]
    with torch.no_grad():
        torch.testing.assert_close(index.vectors, embedder(x, 44100), atol=1e-5, rtol=0)
