"""T5 prompt conditioners load offline: from a folder next to the model, or from the local Hugging Face
cache; a missing file is an error naming it and how to get it.

The encoder is a tiny random T5 (one layer) with d_model 768, t5-base's width, and a word-level tokenizer;
the reference embedding is computed from those in-memory objects, so a loader that read other weights, or
tokenised differently, would fail the comparison.
"""

import copy
import json
import shutil
import socket

import huggingface_hub.constants
import pytest
import torch
from model_checks import assert_same_outputs, assert_same_weights

from amg_engine.engine.default.model import build_tokenizer, model_config
from amg_engine.engine.models import ModelFilesError, build_model, encode_conditioning, load_model, save_model

pytestmark = pytest.mark.integration  # make test-latest runs it on the newest releases

PROMPTS = ["a drum loop, 120 bpm", "a warm pad"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A saved tiny T5 encoder + tokenizer: (folder, encoder, tokenizer)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    build_tokenizer(PROMPTS, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = T5Config(vocab_size=len(tokenizer), d_model=768, d_kv=16, num_heads=2, d_ff=32, num_layers=1)
    torch.manual_seed(0)
    encoder = T5EncoderModel(config).eval()
    encoder.save_pretrained(str(folder))
    return folder, encoder, tokenizer


def t5_model_config(t5_model_name: str) -> dict:
    config = model_config(depth=1, heads=2, embed=64, cond_dim=64)
    t5 = {"t5_model_name": t5_model_name, "max_length": MAX_LENGTH}
    config["model"]["conditioning"]["configs"][0] = {"id": "prompt", "type": "t5", "config": t5}
    return config


def save_random_model(config: dict, model_dir) -> torch.nn.Module:
    model = build_model(config, model_dir)
    torch.manual_seed(1)
    for p in model.parameters():  # the DiT zero-initialises its in/out convs; make every weight count
        torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, model_dir)
    return model.eval()


def reference_prompt_embedding(encoder, tokenizer, proj: torch.nn.Linear, prompts: list[str]) -> torch.Tensor:
    """What T5Conditioner computes: float16 encoder, fp32 projection, padded positions zeroed."""
    enc = tokenizer(
        prompts, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt"
    )
    mask = enc["attention_mask"].bool()
    reference = copy.deepcopy(encoder).half().eval().requires_grad_(False)  # as T5Conditioner holds it
    with torch.no_grad():
        h = reference(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
        return proj(h.float()) * mask[..., None].float()  # [B, MAX_LENGTH, cond_dim]


def check_loaded(model_dir, original, tiny_t5):
    _, encoder, tokenizer = tiny_t5
    loaded, _ = load_model(model_dir)
    prompt_cond = loaded.conditioner.conditioners["prompt"]
    with torch.no_grad():
        emb, mask = prompt_cond(PROMPTS, "cpu")
    ref = reference_prompt_embedding(encoder, tokenizer, prompt_cond.proj_out, PROMPTS)
    assert emb.shape == (2, MAX_LENGTH, 64) and emb.abs().sum() > 0
    # Two encoder instances in the same state (float16, frozen): equal up to a float16 rounding of the
    # encoder's output (2^-11 relative), which the projection scales; another encoder is off by O(1).
    torch.testing.assert_close(emb, ref, rtol=2**-10, atol=2**-10 * ref.abs().max().item())
    assert mask.sum(1).tolist() == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]

    meta = [{"prompt": p, "seconds_total": 1.0} for p in PROMPTS]
    x, sigma = torch.randn(2, loaded.io_channels, 4), torch.tensor([3.0, 0.5])
    with torch.no_grad():
        cond = encode_conditioning(loaded, meta, "cpu")
    assert cond.cross_attn.shape == (2, MAX_LENGTH + 1, 64)  # prompt tokens + seconds_total
    assert_same_weights(original, loaded)
    assert_same_outputs(original, loaded, meta, x, sigma)
    return loaded


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_t5_from_local_folder(tmp_path, tiny_t5, where):
    folder = tiny_t5[0]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    name = "t5"
    if where == "relative":
        shutil.copytree(folder, model_dir / name)
    else:
        name = str(folder)
    original = save_random_model(t5_model_config(name), model_dir)
    loaded = check_loaded(model_dir, original, tiny_t5)
    saved = json.loads((model_dir / "model_config.json").read_text())["model"]["conditioning"]["configs"][0]
    assert saved["config"]["t5_model_name"] == name  # build_model left the caller's (portable) config alone
    assert "conditioner.conditioners.prompt.proj_out.weight" in loaded.state_dict()


def test_check_fails_for_another_t5_encoder(tmp_path, tiny_t5):
    """check_loaded can fail: a folder holding another random T5 (same config and tokenizer) is caught."""
    from transformers import T5EncoderModel

    folder, encoder, _ = tiny_t5
    shutil.copytree(folder, tmp_path / "model" / "t5")
    torch.manual_seed(7)
    T5EncoderModel(encoder.config).save_pretrained(str(tmp_path / "model" / "t5"))
    original = save_random_model(t5_model_config("t5"), tmp_path / "model")
    with pytest.raises(AssertionError, match="not close"):
        check_loaded(tmp_path / "model", original, tiny_t5)


def fake_hf_cache(root, folder, repo: str = "t5-base"):
    """Lay ``folder`` out as the cached snapshot of hub repo ``repo`` (the layout huggingface_hub writes)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face cache at an empty folder (both the env var and the value read at import)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_t5_from_hf_cache_without_network(tmp_path, tiny_t5, hf_cache, monkeypatch):
    fake_hf_cache(hf_cache, tiny_t5[0])
    # Even with offline mode off, loading must not look a host up. (Upstream's own
    # T5Conditioner("t5-base") does, dozens of times, before falling back to the cache.)
    lookups = []

    def refuse(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    model_dir = tmp_path / "model"
    original = save_random_model(t5_model_config("t5-base"), model_dir)
    loaded = check_loaded(model_dir, original, tiny_t5)
    encoder = loaded.conditioner.conditioners["prompt"].model
    # exact by construction: the loaded weights are the saved float32 ones cast to float16, as here
    assert torch.equal(encoder.shared.weight, tiny_t5[1].shared.weight.half())
    assert lookups == []


def test_t5_missing_from_cache_names_model_and_download(tmp_path, tiny_t5, hf_cache):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_config.json").write_text(json.dumps(t5_model_config("t5-base")))
    with pytest.raises(ModelFilesError, match=r"'t5-base'.*missing config\.json.*download t5-base") as err:
        load_model(model_dir)
    assert str(hf_cache) in str(err.value)

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_t5[0] / "config.json", partial)
    fake_hf_cache(hf_cache, partial)
    with pytest.raises(ModelFilesError, match=r"missing model\.safetensors.*tokenizer\.json"):
        load_model(model_dir)


def test_t5_folder_missing_files_are_named(tmp_path, tiny_t5):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_config.json").write_text(json.dumps(t5_model_config("t5")))
    with pytest.raises(ModelFilesError, match=r"T5 folder .*t5 .*does not exist.*t5-base"):
        load_model(model_dir)

    shutil.copytree(tiny_t5[0], model_dir / "t5")
    (model_dir / "t5" / "config.json").unlink()
    with pytest.raises(ModelFilesError, match=r"lacks config\.json; .*save_pretrained"):
        load_model(model_dir)
