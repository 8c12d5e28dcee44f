"""LAION-CLAP (HTSAT-tiny) audio embedder, loaded once from a local checkpoint, never from a hub.

``ClapEmbedder(checkpoint)`` builds only CLAP's audio branch (HTSAT-tiny) and its audio projection
from laion_clap's own classes and loads the matching subset of a checkpoint in the
``630k-audioset-best.pt`` layout: ``{"state_dict": {("module.")"audio_branch.…", "audio_projection.…",
"text_branch.…", …}}`` (``laion_clap.hook.CLAP_Module.load_ckpt`` → ``clap_module.factory.load_state_dict``).
``CLAP_Module`` itself cannot be built offline: its text branch calls ``RobertaModel.from_pretrained``.

Audio ``[B, C, T]`` at any rate becomes CLAP's input by the project's one definition of a clip's
embedding (index/clip.py: mono, resampled to 48 kHz on its device, fitted to CLAP's 10 s window of
480,000 samples, peak-normalised) and is embedded as ``CLAP.get_audio_embedding`` does
(HTSAT ``embedding`` → ``audio_projection`` → L2-normalise) → ``[B, 512]``, differentiable in the audio.
The window is deterministic, unlike laion_clap's ``rand_trunc``: longer input keeps its first 10 s;
shorter input is repeat-padded as CLAP's ``repeatpad`` does (⌊480000/T⌋ repeats, then zeros).
Checkpoints load with ``weights_only=True``; one that needs full unpickling is refused unless the
caller passes ``trust_checkpoint=True`` (``--trust-checkpoint``).
``reference=True`` reproduces the published AMG code's quirk: audio is taken as if already at 48 kHz
(no resampling, whatever its real rate).

Text features (prompt adherence) need the RoBERTa config and tokenizer files on local disk
(``text_encoder=DIR`` holding ``config.json``, ``vocab.json``, ``merges.txt``, e.g. a copy of
``roberta-base``); the text weights come from the CLAP checkpoint. Without them
:meth:`ClapEmbedder.embed_text` raises :class:`ClapTextUnavailable`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from amg_engine.index.clip import EmbedderInfo, embed_clips, fit_window, prepare_clips
from amg_engine.index.files import file_digest, load_checkpoint

log = logging.getLogger(__name__)

NAME = "laion-clap-htsat-tiny"
SAMPLE_RATE = 48_000
WINDOW = 480_000  # CLAP's 10 s window at 48 kHz
DIM = 512
# Similarity at or above which an output counts as a replica on CLAP's scale: the published AMG code's
# upper gate level in the paper-era experiments (λ_max = 0.5, amg-reference.md §2), the level at which
# its guidance still steers away at the end of sampling. The audit also reports 0.4 by default.
REPLICATION_THRESHOLD = 0.5
TEXT_LENGTH = 77  # CLAP_Module.tokenizer: padding="max_length", max_length=77
_AUDIO_PREFIXES = ("audio_branch.", "audio_projection.")
_TEXT_PREFIXES = ("text_branch.", "text_projection.")


class ClapTextUnavailable(RuntimeError):
    """CLAP text features were asked for but the text encoder's config or tokenizer is not on disk."""


def _laion_clap() -> SimpleNamespace:
    """laion_clap's model classes, imported with the hub switched off (it fetches tokenizers at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before us: it read the environment already
        constants.HF_HUB_OFFLINE = True
    import laion_clap  # noqa: F401  (adds its folder to sys.path; needs the offline flag above)
    from laion_clap.clap_module import factory
    from laion_clap.clap_module.htsat import create_htsat_model
    from laion_clap.clap_module.model import CLAPAudioCfp

    return SimpleNamespace(
        config=factory._MODEL_CONFIGS["HTSAT-tiny"],
        create_htsat_model=create_htsat_model,
        audio_cfg=CLAPAudioCfp,
    )


def load_clap_state_dict(checkpoint: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The full CLAP state dict of a ``630k-audioset-best.pt``-layout checkpoint, ``module.`` stripped.

    Accepts ``{"state_dict": sd}`` or a bare ``sd``; loaded by :func:`load_checkpoint`.
    """
    ckpt = load_checkpoint(checkpoint, trust_checkpoint)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{checkpoint}: not a CLAP checkpoint (expected a dict with a 'state_dict')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _subset(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


class ClapAudio(torch.nn.Module):
    """CLAP's audio tower with the attribute names of ``laion_clap``'s ``CLAP``, so checkpoint keys match."""

    def __init__(self) -> None:
        super().__init__()
        lc = _laion_clap()
        self.audio_branch = lc.create_htsat_model(lc.audio_cfg(**lc.config["audio_cfg"]))
        # CLAP.__init__: Linear(embed_dim, joint) - ReLU - Linear(joint, joint), joint_embed_shape 512
        self.audio_projection = torch.nn.Sequential(
            torch.nn.Linear(lc.config["embed_dim"], DIM), torch.nn.ReLU(), torch.nn.Linear(DIM, DIM)
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, 480000] at 48 kHz -> unit-norm [B, 512] (CLAP.get_audio_embedding)."""
        out = self.audio_branch({"waveform": waveform}, device=waveform.device)["embedding"]  # [B, 768]
        return torch.nn.functional.normalize(self.audio_projection(out), dim=-1)


def repeat_pad(x: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """CLAP's deterministic window for whole clips: [..., T] -> [..., window].

    T >= window: the first ``window`` samples. T < window: ``repeatpad`` (⌊window/T⌋ whole repeats,
    then zeros), as ``laion_clap.training.data.get_audio_features`` does for short clips.
    """
    t = x.shape[-1]
    if t == 0:
        raise ValueError("cannot embed empty audio (0 samples)")
    flat = x.reshape(-1, t)
    n = torch.full((flat.shape[0],), t, device=x.device)
    return fit_window(flat, n, window, "repeat").reshape(*x.shape[:-1], window)


class ClapEmbedder(torch.nn.Module):
    """LAION-CLAP HTSAT-tiny: audio [B, C, T] at any rate -> unit-norm [B, 512]; frozen, eval mode.

    ``checkpoint``: a local ``630k-audioset-best.pt``-layout file (read once; ``trust_checkpoint`` allows
    one that needs full unpickling). ``reference``: treat every input as already at 48 kHz (the
    published code's quirk). ``text_encoder``: a local folder with the RoBERTa ``config.json`` and
    tokenizer files, needed only by :meth:`embed_text`.
    """

    sample_rate = SAMPLE_RATE
    window = WINDOW
    fill = "repeat"  # short clips fill the window as CLAP's repeatpad does (index/clip.py)
    replication_threshold = REPLICATION_THRESHOLD

    def __init__(
        self,
        checkpoint: str | Path,
        reference: bool = False,
        text_encoder: str | Path | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CLAP checkpoint {checkpoint} not found (e.g. 630k-audioset-best.pt)")
        self.reference = reference
        self.info = EmbedderInfo(NAME, SAMPLE_RATE, DIM, file_digest(checkpoint))
        sd = load_clap_state_dict(checkpoint, trust_checkpoint)
        self.audio = ClapAudio()
        _load_strict(self.audio, _subset(sd, _AUDIO_PREFIXES), f"audio branch of {checkpoint}")
        self.text_encoder = Path(text_encoder) if text_encoder is not None else None
        self._text_sd = _subset(sd, _TEXT_PREFIXES) if self.text_encoder is not None else None
        self._text: tuple | None = None  # (tokenizer, model), built on first embed_text
        self.requires_grad_(False)
        self.eval()
        log.info("loaded CLAP audio branch from %s (sha256 %s)", checkpoint, self.info.checkpoint_hash)

    def train(self, mode: bool = True) -> ClapEmbedder:
        """Always eval: BatchNorm statistics and dropout are part of the embedding's definition."""
        return super().train(False)

    def _rate(self, sample_rate: int) -> int:
        return SAMPLE_RATE if self.reference else sample_rate  # the published quirk: taken as 48 kHz

    def prepare(self, audio: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None):
        """[B, C, T] at ``sample_rate`` -> [B, 480000] mono at 48 kHz in CLAP's window (index/clip.py)."""
        return prepare_clips(audio, self._rate(sample_rate), lengths, SAMPLE_RATE, WINDOW, self.fill)

    def forward(self, audio: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None):
        """audio [B, C, T] at ``sample_rate`` (row lengths [B], default T) -> unit-norm [B, 512]."""
        return embed_clips(self, audio, self._rate(sample_rate), lengths)

    def embed_window(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared windows [B, 480000] at 48 kHz -> unit-norm [B, 512] (CLAP.get_audio_embedding)."""
        return self.audio(x)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """CLAP text embeddings, unit-norm [len(texts), 512] (CLAP.get_text_embedding, RoBERTa branch)."""
        tokenizer, model = self._text_model()
        device = next(self.audio.parameters()).device
        tok = tokenizer(
            texts, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt"
        )
        model = model.to(device)
        pooled = model.branch(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        )
        return torch.nn.functional.normalize(model.projection(pooled["pooler_output"]), dim=-1)

    def _text_model(self) -> tuple:
        if self._text is None:
            self._text = _build_text(self.text_encoder, self._text_sd)
            self._text_sd = None  # now inside the model
        return self._text


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what} does not match: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]} (of {len(result.missing_keys)} / {len(result.unexpected_keys)}); "
            "expected a non-fusion HTSAT-tiny CLAP checkpoint in the 630k-audioset-best.pt layout"
        )


def _build_text(folder: Path | None, sd: dict[str, torch.Tensor] | None) -> tuple:
    """(tokenizer, module with .branch RobertaModel and .projection) from local files only."""
    needed = ("config.json", "vocab.json", "merges.txt")
    if folder is None or not all((folder / n).is_file() for n in needed):
        where = "no text_encoder folder was given" if folder is None else f"{folder} lacks one of {needed}"
        raise ClapTextUnavailable(
            f"CLAP text features need the RoBERTa text encoder config and tokenizer on local disk "
            f"({where}); pass text_encoder=DIR with config.json, vocab.json and merges.txt (e.g. a copy "
            "of roberta-base). The text weights come from the CLAP checkpoint; nothing is downloaded."
        )
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = RobertaConfig.from_pretrained(str(folder), local_files_only=True)
    if len(tokenizer) != config.vocab_size:
        raise ClapTextUnavailable(
            f"tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder expects "
            f"{config.vocab_size}: an empty or foreign tokenizer would give meaningless text embeddings"
        )
    model = torch.nn.Module()
    model.branch = RobertaModel(config)
    model.projection = torch.nn.Sequential(
        torch.nn.Linear(config.hidden_size, DIM), torch.nn.ReLU(), torch.nn.Linear(DIM, DIM)
    )
    sd = {
        k.replace("text_branch.", "branch.", 1).replace("text_projection.", "projection.", 1): v
        for k, v in sd.items()
    }
    own = model.state_dict()
    sd = {
        k: v for k, v in sd.items() if k in own or not k.endswith("position_ids")
    }  # laion_clap drops it too
    _load_strict(model, sd, f"text branch of the checkpoint with the config in {folder}")
    return tokenizer, model.eval().requires_grad_(False)
