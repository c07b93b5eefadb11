"""Export a model version as a standalone model that can be served elsewhere.

`export_version` loads the version's base model, merges its LoRA adapter (if any) into the
weights, and writes a Hugging Face folder: safetensors weights, config and generation config,
the tokenizer with its chat template, `tuneloop.json` (lineage and metrics), a README and, for a
version the `retriever` step gave its own embedder, that embedder in `embedder/`. The
folder is written next to OUT under a temporary name and renamed into place, so a crash never
leaves a half-written export. Every export holds a `.tuneloop-export` marker: `force` replaces
only a folder with that marker (one tuneloop exported), never the project folder, a folder above
it, or one holding a tuneloop.yaml or a store. transformers (`AutoModelForCausalLM.from_pretrained(OUT)`) and
vLLM (`vllm serve OUT`) load it as is.

With `gguf=True` it also writes `OUT/model.gguf` with the `gguf` package (no llama.cpp needed):
Llama-architecture models (LlamaForCausalLM: SmolLM2, Llama, ...) with a byte-level BPE
("gpt2") tokenizer, tensors in f32 (or f16 with `gguf_dtype="f16"`). Anything else fails with a
ConfigError that says to run llama.cpp's `convert_hf_to_gguf.py OUT` instead.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from tuneloop.config import Project
from tuneloop.errors import ConfigError, InputError, StateError
from tuneloop.model_card import LORA_DIR, card_facts, modelfile, render_card
from tuneloop.programs.rag import version_retriever_paths
from tuneloop.safety import holds_project, safe_rmtree
from tuneloop.store import ModelVersion, Session, utcnow
from tuneloop.versions import adapter_folder

META_FILE = "tuneloop.json"
MARKER_FILE = ".tuneloop-export"  # in every export: only such a folder may be replaced (--force)
GGUF_FILE = "model.gguf"
EMBEDDER_DIR = "embedder"  # the fine-tuned embedder the version retrieves with, when it has one
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
CONVERT_HINT = ("run llama.cpp's convert_hf_to_gguf.py on the exported folder instead "
                "(python convert_hf_to_gguf.py OUT --outfile OUT/model.gguf)")


@dataclass
class ExportResult:
    path: Path
    gguf_path: Path | None
    meta: dict[str, Any]


def tuneloop_version() -> str:
    try:
        from importlib.metadata import version

        return version("tuneloop")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a checkout)
        return "unknown"


def served_name(project: Project, version: ModelVersion) -> str:
    """The versioned name a server serves the adapter under: <project>-<version>, safe characters only."""
    name = f"{project.settings.project}-{version.name}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def base_model_dir(project: Project, version: ModelVersion) -> Path:
    from tuneloop.models.defaults import resolve_model_path

    return resolve_model_path(version.base_model or project.settings.models.student.model, project.cache)


def protected_paths(project: Project) -> list[Path]:
    """Folders an export must never replace nor sit above: the project's, its artifacts', its store's."""
    paths = [project.root, project.artifacts, project.index_dir]
    url = make_url(project.store_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        paths.append(Path(url.database).parent)
    return [p.resolve() for p in paths]


def check_out(out: Path, force: bool, project: Project) -> None:
    """Raise InputError (deleting nothing) unless `out` may receive an export: it is not the
    project folder, its artifacts, index or store folder, nor above one; and it is missing or
    empty, or `force` is given and it is an earlier export (it holds MARKER_FILE) holding no project."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    real = out.resolve()
    for p in protected_paths(project):
        if real == p or real in p.parents:
            raise InputError(f"refusing to replace {out} with an export: it is or contains the project's folder {p}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise InputError(f"{out} is not empty (use --force to replace it)")
    if not (out / MARKER_FILE).is_file():
        raise InputError(f"refusing to replace {out}: it is not a tuneloop export (no {MARKER_FILE}); "
                         "remove it yourself or choose another folder")
    if holds_project(out):
        raise InputError(f"refusing to replace {out}: it holds a tuneloop project")


def export_version(project: Project, session: Session, name: str, out: Path, gguf: bool = False,
                   force: bool = False, gguf_dtype: str = "f32") -> ExportResult:
    """Merge `name`'s adapter into its base model and write a standalone folder at `out`."""
    from tuneloop.lineage import get_version, training_data

    version = get_version(session, name)
    out = Path(out).expanduser()
    check_out(out, force, project)
    if gguf_dtype not in ("f32", "f16"):
        raise ConfigError(f"gguf dtype must be f32 or f16, not '{gguf_dtype}'")
    adapter = adapter_folder(version)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise StateError(f"the adapter of {version.name} is missing: {adapter}")
    model_dir = base_model_dir(project, version)
    retriever = version_retriever_paths(version)  # stages/retriever.py: it answers with its own embedder
    if retriever is not None and not (retriever[0] / "modules.json").is_file():
        raise StateError(f"the fine-tuned embedder of {version.name} is missing: {retriever[0]}")
    if gguf:
        check_gguf_supported(model_dir)  # before the (slow) merge

    parent = session.get(ModelVersion, version.parent_id) if version.parent_id is not None else None
    data = training_data(session, version)
    meta = {
        "version": version.name, "parent": parent.name if parent else None, "method": version.method,
        "status": version.status, "base_model": version.base_model, "adapter_path": version.adapter_path,
        "cycle_id": version.cycle_id, "created_at": version.created_at.isoformat() if version.created_at else None,
        "hyperparams": version.hyperparams or {}, "metrics": _jsonable(version.metrics or {}),
        "training_examples": len(data.ids), "training_data_hash": data.data_hash,
        "tuneloop_version": tuneloop_version(), "exported_at": utcnow().isoformat(),
        "embedder": EMBEDDER_DIR if retriever is not None else None,
    }
    lora_name = served_name(project, version) if adapter is not None else None
    if adapter is not None:
        meta["lora"] = f"{LORA_DIR}/{lora_name}"
        meta["lora_rank"] = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("r")

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_killed_exports(out)
    tmp = out.parent / f".tmp-export-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / MARKER_FILE).write_text("exported by tuneloop; `tuneloop export --force` may replace this folder\n",
                                       encoding="utf-8")
        write_merged(model_dir, adapter, tmp)
        if adapter is not None:  # the adapter alone, as vLLM loads it at run time (--enable-lora)
            (tmp / LORA_DIR / lora_name).mkdir(parents=True)
            for name in LORA_FILES:
                shutil.copy2(adapter / name, tmp / LORA_DIR / lora_name / name)
        if retriever is not None:  # a sentence-transformers folder: SentenceTransformer(OUT/embedder)
            shutil.copytree(retriever[0], tmp / EMBEDDER_DIR)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        facts = card_facts(session, version, meta, project.settings.eval.primary_metric,
                           project.settings.data_license, lora_name, gguf)
        (tmp / "README.md").write_text(render_card(facts), encoding="utf-8")
        if gguf:
            write_gguf(tmp, tmp / GGUF_FILE, dtype=gguf_dtype, name=f"{project.settings.project}-{version.name}",
                       pre=gguf_pre_tokenizer(model_dir))
            template = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
            chat_template = tmp / "chat_template.jinja"
            (tmp / "Modelfile").write_text(modelfile(template or (chat_template.read_text(encoding="utf-8")
                                                                  if chat_template.is_file() else None)),
                                           encoding="utf-8")
        _replace(tmp, out)
    finally:
        safe_rmtree(tmp, inside=out.parent, ignore_errors=True)
    return ExportResult(out, out / GGUF_FILE if gguf else None, meta)


def write_merged(model_dir: Path, adapter: Path | None, target: Path) -> None:
    """Base model (+ LoRA merged) in the base's dtype, and its tokenizer, as a transformers folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir))
    save_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(save_dtype, str):
        save_dtype = getattr(torch, save_dtype, None)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)  # merge in fp32
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if isinstance(save_dtype, torch.dtype) and save_dtype in (torch.float16, torch.bfloat16):
        model = model.to(save_dtype)
    if hasattr(model.config, "quantization_config"):  # the built-in GGUF-converted default
        del model.config.quantization_config
    model.save_pretrained(str(target), safe_serialization=True)
    tok_src = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    if not getattr(tokenizer, "chat_template", None):
        base_tok = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.chat_template = getattr(base_tok, "chat_template", None)
    tokenizer.save_pretrained(str(target))


def _clean_killed_exports(out: Path) -> None:
    """Remove half-written exports to `out` that a killed export left beside it."""
    for p in out.parent.glob(f".tmp-export-{glob.escape(out.name)}-*"):
        if p.is_dir() and (p / MARKER_FILE).is_file():
            safe_rmtree(p, inside=out.parent, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an existing `out` (checked beforehand)."""
    old = None
    if out.exists():
        old = out.parent / f".old-export-{out.name}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        safe_rmtree(old, inside=out.parent, ignore_errors=True)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


# --------------------------------------------------------------------------- GGUF


def check_gguf_supported(model_dir: Path) -> None:
    """Raise ConfigError (one line) unless write_gguf can convert this model."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"--gguf needs the `gguf` package (pip install gguf), or {CONVERT_HINT}") from None
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if archs != ["LlamaForCausalLM"]:
        raise ConfigError(f"--gguf supports LlamaForCausalLM models only, not {', '.join(archs) or 'unknown'}; "
                          + CONVERT_HINT)
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ConfigError("--gguf does not support rope scaling; " + CONVERT_HINT)
    tok = model_dir / "tokenizer.json"
    kind = json.loads(tok.read_text(encoding="utf-8")).get("model", {}).get("type") if tok.is_file() else None
    if kind != "BPE" or not _byte_level(json.loads(tok.read_text(encoding="utf-8"))):
        raise ConfigError(f"--gguf supports byte-level BPE tokenizers only (this one: {kind or 'no tokenizer.json'}); "
                          + CONVERT_HINT)


def _byte_level(tok: dict) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) or [])
    return has(tok.get("pre_tokenizer"))


def _permute(w, n_head: int):
    """HF q/k weight layout -> llama.cpp's (rotary halves interleaved), as convert_hf_to_gguf does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name (its converter hashes the tokenizer; we know SmolLM only)."""
    return "smollm" if "smollm" in str(model_dir).lower() else "default"


def write_gguf(model_dir: Path, path: Path, dtype: str = "f32", name: str | None = None,
               pre: str = "default") -> int:
    """Write a Llama-architecture HF folder as a GGUF file; return the number of tensors written."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    check_gguf_supported(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    if name:
        writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_vocab(writer, model_dir, config["vocab_size"], pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    count = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ConfigError(f"--gguf cannot map tensor '{key}'; " + CONVERT_HINT)
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, n_head)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, n_kv)
                if dtype == "f16" and data.ndim > 1:
                    data = data.astype(np.float16)
                writer.add_tensor(new, np.ascontiguousarray(data))
                count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def _add_vocab(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """gpt2-style (byte-level BPE) vocabulary, as llama.cpp's converter writes it."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder.get(i) is not None and decoder[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(model_dir), load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)
