"""The audit's plots and its self-contained ``report.html`` (plots and audio inline, no scripts).

The page opens offline from anywhere: the histogram is an inline PNG and every player's audio is an
inline FLAC data URI (the first ``EXCERPT_SECONDS`` of the file, mono, so the page stays small
even for long stereo clips). Each of the most similar pairs also shows the two clips' spectrograms
side by side on one time and frequency axis (an inline PNG), so a replication can be seen without
playing it. Where the audit checked the prompts' attributes, a table gives the adherence per attribute.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np

from amg_engine.index.files import atomic_write

log = logging.getLogger(__name__)

EXCERPT_SECONDS = 10.0


def similarity_plot(summary, path: Path) -> Path:
    """Histogram of generated-to-training similarity against the training-to-training background."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = summary.histogram
    edges = np.asarray(h["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, colour in (("background", "training vs nearest other training clip", "0.6"),
                               ("generated", "audited file vs nearest training clip", "C3")):  # fmt: skip
        counts = np.asarray(h[key], dtype=float)
        if counts.sum():
            ax.bar(centres, counts / counts.sum(), width=width, alpha=0.55, color=colour, label=label)
    for t in summary.thresholds:
        ax.axvline(t, color="k", lw=0.8, ls="--")
        ax.text(t, ax.get_ylim()[1] * 0.95, f" {t:g}", fontsize=8, va="top")
    ax.set_xlabel(f"cosine similarity ({summary.embedder['name']} embedding)")
    ax.set_ylabel("share of clips")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return path


def read_excerpt(path: Path | None, seconds: float = EXCERPT_SECONDS) -> tuple[np.ndarray, int] | None:
    """The file's first ``seconds``, mono float32, and its rate (None if absent or unreadable)."""
    import soundfile as sf

    if path is None:
        return None
    try:
        with sf.SoundFile(path) as f:
            sr = f.samplerate
            return f.read(frames=int(seconds * sr), dtype="float32", always_2d=True).mean(axis=1), sr
    except Exception as e:  # noqa: BLE001 - a missing player is shown as such, not a failed report
        log.warning("cannot read %s for the report: %s", path, e)
        return None


def audio_data_uri(path: Path, seconds: float = EXCERPT_SECONDS) -> str | None:
    """The file's first ``seconds`` as a mono FLAC data URI (None if it cannot be read)."""
    import soundfile as sf

    clip = read_excerpt(path, seconds)
    if clip is None:
        return None
    buf = io.BytesIO()
    sf.write(buf, clip[0], clip[1], format="FLAC", subtype="PCM_16")
    return "data:audio/flac;base64," + base64.b64encode(buf.getvalue()).decode()


def pair_figure(audited: tuple[np.ndarray, int], training: tuple[np.ndarray, int] | None, labels=("", "")):
    """Two spectrograms (dB, STFT of 32 ms frames) side by side, sharing the time and frequency axes."""
    import librosa
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, clip, label in zip(axes, (audited, training), labels, strict=True):
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("time (s)", fontsize=8)
        if clip is None:
            ax.text(0.5, 0.5, "audio not available", ha="center", va="center", transform=ax.transAxes)
            continue
        x, sr = clip
        n_fft = int(2 ** np.ceil(np.log2(0.032 * sr)))
        S = librosa.amplitude_to_db(np.abs(librosa.stft(x, n_fft=n_fft, hop_length=n_fft // 4)), ref=np.max)
        times = librosa.frames_to_time(np.arange(S.shape[1] + 1), sr=sr, hop_length=n_fft // 4)
        freqs = np.linspace(0, sr / 2, S.shape[0] + 1)
        ax.pcolormesh(times, freqs, S, vmin=-80, vmax=0, cmap="magma", shading="flat")
    axes[0].set_ylabel("Hz", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _spectrogram_img(gen_path: Path, train_path: Path | None, label: str) -> str:
    audited = read_excerpt(gen_path)
    if audited is None:
        return '<span class="missing">spectrogram not available</span>'
    fig = pair_figure(audited, read_excerpt(train_path), ("audited file", "nearest training clip"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return f'<img class="spectrogram" alt="spectrograms of {html.escape(label)}" src="{uri}">'


def _player(uri: str | None, label: str) -> str:
    if uri is None:
        return f'<span class="missing">{html.escape(label)}: audio not available</span>'
    return f'<audio controls preload="none" aria-label="{html.escape(label)}" src="{uri}"></audio>'


def _stats_rows(summary) -> str:
    g, b = summary.generated, summary.background
    rows = []
    for key, label in (
        ("mean", "mean"),
        ("median", "median"),
        ("p95", "95th percentile"),
        ("max", "maximum"),
    ):
        rows.append(f"<tr><th>{label}</th><td>{g.get(key, float('nan')):.3f}</td>"
                    f"<td>{b.get(key, float('nan')):.3f}</td></tr>")  # fmt: skip
    for t in g.get("share_at_or_above", {}):
        rows.append(
            f"<tr><th>share ≥ {t}</th><td>{100 * g['share_at_or_above'][t]:.1f}%</td>"
            f"<td>{100 * b.get('share_at_or_above', {}).get(t, float('nan')):.1f}%</td></tr>"
        )
    return "\n".join(rows)


def _pairs_rows(summary, train_audio: dict[str, Path]) -> str:
    rows = []
    for rank, p in enumerate(summary.top_pairs, 1):
        gen = _player(audio_data_uri(Path(p["path"])), f"audited {p['id']}")
        train_path = train_audio.get(p["nearest_id"])
        train = _player(audio_data_uri(train_path) if train_path else None, f"training {p['nearest_id']}")
        spec = _spectrogram_img(Path(p["path"]), train_path, f"{p['id']} and {p['nearest_id']}")
        rows.append(
            "<tr class='pair'>"
            f"<td>{rank}</td><td>{p['similarity']:.3f}</td>"
            f"<td><b>{html.escape(p['id'])}</b><br>"
            f"<i>{html.escape(p['prompt'] or '(no prompt)')}</i><br>{gen}</td>"
            f"<td><b>{html.escape(p['nearest_id'])}</b><br><i>{html.escape(p['nearest_caption'] or '')}</i>"
            f"<br>{train}</td></tr>\n"
            f"<tr class='spectrograms'><td colspan='4'>{spec}</td></tr>"
        )
    return "\n".join(rows)


def _adherence_section(adherence: dict | None) -> str:
    """The attribute-adherence table, or a line saying why there is none."""
    if not adherence:
        return "<p>Attribute adherence: no audited file has a default-model prompt to check.</p>"
    rows = []
    for name, v in adherence.items():
        if isinstance(v, dict):
            share = "n/a" if v["share"] is None else f"{100 * v['share']:.0f}%"
            hits = f"{v['hits']} of {v['n']}"
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{hits}</td><td>{share}</td></tr>")
    return (
        f"<h2>Attribute adherence</h2><p>{adherence['files']} files whose prompt names a tempo, chord or "
        f"instrument ({adherence['errors']} unreadable): does the audio have it?</p>"
        f'<table id="adherence"><tr><th>attribute</th><th>hits</th><th>share</th></tr>{"".join(rows)}</table>'
    )


def write_report(summary, out_dir: Path, train_audio: dict[str, Path] | None = None) -> Path:
    """Write ``similarity.png`` and ``report.html`` into ``out_dir``; -> the report's path."""
    out_dir = Path(out_dir)
    png = similarity_plot(summary, out_dir / "similarity.png")
    img = base64.b64encode(png.read_bytes()).decode()
    extra = []
    if summary.fad is not None:
        extra.append(f"FAD {summary.fad:.4g} · KAD {summary.kad:.4g} (against the {summary.reference}, "
                     f"on the {summary.embedder['name']} embedding)")  # fmt: skip
    if summary.fad_heldout is not None:
        extra.append(f"FAD {summary.fad_heldout:.4g} · KAD {summary.kad_heldout:.4g} (against the held-out "
                     "index)")  # fmt: skip
    if summary.clap_score:
        extra.append(f"CLAP score (prompt adherence): mean {summary.clap_score['mean']:.3f}")
    else:
        extra.append("CLAP score: not computed (no local CLAP text encoder was given)")
    page = TEMPLATE.format(
        n_ok=summary.n_ok, n_error=summary.n_error, embedder=html.escape(summary.embedder["name"]),
        stats=_stats_rows(summary), extra="<br>".join(html.escape(x) for x in extra), img=img,
        pairs=_pairs_rows(summary, train_audio or {}), n_pairs=len(summary.top_pairs),
        adherence=_adherence_section(summary.adherence),
    )  # fmt: skip
    path = out_dir / "report.html"
    atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Memorization audit</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 68em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: .35em .6em; text-align: left; vertical-align: top; }}
audio {{ width: 20em; margin-top: .3em; }}
.missing {{ color: #999; }}
img.spectrogram {{ max-width: 100%; }}
</style></head>
<body>
<h1>Memorization audit</h1>
<p>{n_ok} files audited ({n_error} unreadable) against the training index,
embedder <code>{embedder}</code>.</p>
<h2>Similarity to the nearest training clip</h2>
<table id="stats"><tr><th></th><th>audited files</th><th>training background</th></tr>
{stats}
</table>
<p>{extra}</p>
<img id="histogram" alt="similarity histogram" src="data:image/png;base64,{img}">
{adherence}
<h2>The {n_pairs} most similar pairs</h2>
<table id="pairs"><tr><th>#</th><th>similarity</th><th>audited file</th><th>nearest training clip</th></tr>
{pairs}
</table>
</body></html>
"""
