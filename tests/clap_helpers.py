"""A random-weight LAION-CLAP in the ``630k-audioset-best.pt`` layout, built offline, for tests.

Not a conftest: imported by name (``tests/`` is on ``sys.path`` under pytest's default import mode).
laion_clap's own ``CLAP_Module`` is built offline by replacing its ``RobertaModel.from_pretrained
('roberta-base')`` with a tiny random RoBERTa (the text branch plays no part in audio embeddings).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from amg_engine.index.clap import _laion_clap


def tiny_roberta():
    from transformers import RobertaConfig, RobertaModel

    # hidden 768 as roberta-base (CLAP's text projection is Linear(768, 512)); one small layer
    config = RobertaConfig(
        vocab_size=60, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
        intermediate_size=64, max_position_embeddings=80,
    )  # fmt: skip
    return RobertaModel(config)


def build_laion_clap(seed: int):
    """laion_clap.CLAP_Module(enable_fusion=False) built offline, seeded random weights."""
    _laion_clap()
    import laion_clap

    class OfflineRoberta:
        from_pretrained = staticmethod(lambda *a, **k: tiny_roberta())

    class NoTokenizer:
        from_pretrained = staticmethod(lambda *a, **k: None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules["clap_module.model"], "RobertaModel", OfflineRoberta)
        mp.setattr(laion_clap.hook, "RobertaTokenizer", NoTokenizer)
        torch.manual_seed(seed)
        return laion_clap.CLAP_Module(enable_fusion=False, device="cpu")


def write_clap_checkpoint(laion, path: Path) -> Path:
    """The 630k-audioset-best.pt layout: {"state_dict": {"module." + key: tensor}, ...} plus plain
    metadata, including the text position_ids that checkpoints saved by older transformers carry
    (laion_clap deletes it)."""
    sd = dict(laion.model.state_dict())
    sd["text_branch.embeddings.position_ids"] = torch.arange(80)[None]
    torch.save({"epoch": 45, "name": "random", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path
