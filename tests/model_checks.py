"""What "the loaded model is the saved one" means in the round-trip tests, compared like with like.

Not a conftest: imported by name (``tests/`` is on ``sys.path`` under pytest's default import mode).

Two checks, each able to fail on its own (``test_models.py`` breaks a weight and a conditioner on
purpose to show it):

- :func:`assert_same_weights`: every tensor of the state dict equal bit for bit. Exact by
  construction: the loaded tensors hold the bytes that were saved (same dtype, no arithmetic).
- :func:`assert_same_outputs`: both models frozen alike (``load_model`` returns ``eval()`` with
  ``requires_grad_(False)``, so the original is put in that state first) and the same x0 prediction
  within float32 rounding, not bit for bit: two instances may still take different CPU kernels or
  buffer alignments (an original whose parameters required grad gave outputs 3.4e-7 apart on an
  AVX-512 Xeon), which reorders sums. The tolerance, 1e-5 relative to the output's scale, is about
  30x that and far below what one wrong weight or tokenizer changes (both measured in test_models.py).
"""

from __future__ import annotations

import torch

from amg_engine.engine.models import encode_conditioning, v_denoise

OUTPUT_RTOL = 1e-5  # relative to max |x0|; see the module docstring


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in the state ``load_model`` returns: eval mode, no parameter requires grad."""
    return model.eval().requires_grad_(False)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), f"weight {k} differs"  # exact: same bytes


def predict(model, meta: list[dict], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return v_denoise(model, x, sigma, encode_conditioning(model, meta, "cpu"))


def assert_same_outputs(a, b, meta: list[dict], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 of ``b`` equals that of ``a`` within :data:`OUTPUT_RTOL` of its scale; returns ``a``'s."""
    ya, yb = predict(frozen(a), meta, x, sigma), predict(frozen(b), meta, x, sigma)
    assert ya.abs().sum() > 0
    torch.testing.assert_close(yb, ya, rtol=OUTPUT_RTOL, atol=OUTPUT_RTOL * ya.abs().max().item())
    return ya


def save_tiny_random_model(config: dict, root):
    """A stable-audio-tools model of ``config`` (a tiny SAO-layout config with a ``lut`` prompt
    conditioner) saved in the real layout under ``root / "model"``, its word-level tokenizer beside it;
    seeded random weights, the DiT's drawn too (it zero-initialises its in/out convs): every weight
    counts. -> the model as built."""
    import json

    from stable_audio_tools.models.factory import create_model_from_config

    from amg_engine.engine.default.model import build_tokenizer
    from amg_engine.engine.models import save_model

    build_tokenizer(["an acoustic drum loop, 120 bpm", "a warm pad"], root / "model" / "tokenizer")
    resolved = json.loads(json.dumps(config))
    resolved["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(
        root / "model" / "tokenizer"
    )
    torch.manual_seed(0)
    model = create_model_from_config(resolved)
    for name, p in model.named_parameters():
        if "model.model" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, root / "model")
    return model
