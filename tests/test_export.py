"""`tuneloop export`: a merged standalone Hugging Face folder (and GGUF where the gguf package can)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from tests.helpers import sample_texts
from tuneloop.cli import app
from tuneloop.export import MARKER_FILE
from tuneloop.models.base import GenerationParams
from tuneloop.store import EvalRun, ModelVersion, open_store

CONV = [{"role": "system", "content": "You answer questions about contracts."},
        {"role": "user", "content": "What law governs the agreement?"}]


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def one_line_error(result, *needles) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in result.output, (n, result.output)
    return lines[0]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny model with non-zero (random) B matrices, so merging changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(path))
    return path


def register(project, adapter: Path | None, base_model: str | None = None) -> None:
    with open_store(project.store_url)() as s:
        base = ModelVersion(name="base", base_model=base_model or project.settings.models.student.model,
                            method="base", status="retired")
        s.add(base)
        s.flush()
        s.add(ModelVersion(name="v1", parent_id=base.id, base_model=base_model or project.settings.models.student.model,
                           adapter_path=str(adapter) if adapter else None, method="sft", status="champion",
                           training_example_ids=[1, 2], hyperparams={"lora_r": 4},
                           metrics={"macro_score": 0.5, "gate": "beats"}))
        s.commit()


def test_export_merged_folder_matches_the_adapter_model(project, runner, tiny_model_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.models.local import LocalChatModel

    proj = project({"data_license": "CC BY 4.0"})
    register(proj, adapter_dir)
    with open_store(proj.store_url)() as s:
        s.add(EvalRun(model_version_id=2, eval_set_hash="0123456789ab" + "0" * 52, n=30, artifact_path="-",
                      metrics={"macro_score": 0.5, "macro_score_ci_low": 0.31, "macro_score_ci_high": 0.69}))
        s.commit()
    out = tmp_path / "exported"
    ok(invoke(runner, "export", "v1", out, "-p", proj.root))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".tmp-export-*"))  # the temporary folder was renamed into place
    meta = json.loads((out / "tuneloop.json").read_text())
    assert meta["version"] == "v1" and meta["parent"] == "base" and meta["method"] == "sft"
    assert meta["metrics"]["macro_score"] == 0.5 and meta["training_examples"] == 2 and meta["training_data_hash"]
    assert "tuneloop_version" in meta and (out / "README.md").is_file()
    assert not (out / "adapter_config.json").exists()  # standalone: no PEFT needed to load it

    # beside it, the adapter alone in the layout vLLM loads at run time, under a versioned name
    lora = out / "lora" / f"{proj.settings.project}-v1"
    assert meta["lora"] == f"lora/{lora.name}" and meta["lora_rank"] == 4
    assert sorted(f.name for f in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (lora / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert f"base model: {proj.settings.models.student.model}" in card and "lineage: v1 (sft) <- base (base)" in card
    assert "the gate: promoted: it is the champion (beats)" in card
    assert "licence of the data: CC BY 4.0" in card
    assert "held-out set 0123456789ab (n=30): macro_score 0.500 [95% CI 0.310, 0.690]" in card
    assert f'"lora_name": "{lora.name}"' in card and "load_lora_adapter" in card

    # plain transformers loads it, the chat template came along, and greedy decoding matches tuneloop's
    # adapter model exactly
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapted = LocalChatModel(tiny_model_dir, adapter_dir, batch_size=1)
    prompt = tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ids = plain.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        exported_logits = plain(**enc).logits
        adapter_logits = adapted.model(**enc).logits
    reply = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    params = GenerationParams(max_new_tokens=12)
    assert reply == adapted.chat([CONV], params)[0]
    assert torch.allclose(exported_logits, adapter_logits, atol=1e-5)
    assert LocalChatModel(out, batch_size=1).chat([CONV], params) == adapted.chat([CONV], params)
    # and the adapter really changed the model (the test would be vacuous otherwise)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.inference_mode():
        assert not torch.allclose(base(**enc).logits, exported_logits, atol=1e-3)
    # the exported adapter on the base model is the merged model (what a LoRA server computes)
    from peft import PeftModel

    on_base = PeftModel.from_pretrained(base, str(lora)).eval()
    with torch.inference_mode():
        assert torch.allclose(on_base(**enc).logits, exported_logits, atol=1e-5)


def test_export_refuses_non_empty_out_unless_forced(project, runner, adapter_dir, tmp_path):
    proj = project(pairs=False)
    register(proj, adapter_dir)
    out = tmp_path / "exported"
    ok(invoke(runner, "export", "v1", out, "-p", proj.root))
    assert (out / MARKER_FILE).is_file()
    (out / "stray.txt").write_text("left over")
    one_line_error(invoke(runner, "export", "v1", out, "-p", proj.root), "not empty", "--force")
    assert (out / "stray.txt").is_file()
    ok(invoke(runner, "export", "v1", out, "--force", "-p", proj.root))  # an earlier export: replaced
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").is_file() and (out / MARKER_FILE).is_file()
    assert not list(tmp_path.glob(".old-export-*")) and not list(tmp_path.glob(".tmp-export-*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(invoke(runner, "export", "v1", empty, "-p", proj.root))  # an existing empty folder is fine


def test_export_force_never_replaces_a_folder_it_did_not_export(project, runner, tmp_path):
    proj = project(pairs=False)
    register(proj, None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    one_line_error(invoke(runner, "export", "base", mine, "--force", "-p", proj.root),
                   "not a tuneloop export", MARKER_FILE)
    assert (mine / "keep.txt").read_text() == "mine"


def _other_project(tmp_path: Path) -> Path:
    """A folder with an export marker (copied there by hand) that holds another project below it."""
    folder = tmp_path / "holds-project"
    (folder / "deep" / "proj").mkdir(parents=True)
    (folder / MARKER_FILE).write_text("")
    (folder / "deep" / "proj" / "tuneloop.db").write_text("a store")
    return folder


@pytest.mark.parametrize("where", ["project", "parent", "artifacts", "store-holder"])
def test_export_force_never_deletes_the_project(project, runner, tmp_path, where):
    """`export --force` with OUT = the project folder or one above it deleted the whole project."""
    proj = project(pairs=False)
    register(proj, None)
    proj.artifacts.mkdir(parents=True, exist_ok=True)
    (proj.artifacts / "keep.txt").write_text("an artifact")
    out = {"project": proj.root, "parent": proj.root.parent, "artifacts": proj.artifacts,
           "store-holder": _other_project(tmp_path) if where == "store-holder" else None}[where]
    if where != "store-holder":
        (out / MARKER_FILE).write_text("")  # even a marker does not make the project replaceable
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    one_line_error(invoke(runner, "export", "base", out, "--force", "-p", proj.root), "refusing to replace")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (proj.root / "tuneloop.db").is_file() and (proj.root / "tuneloop.yaml").is_file()
    assert (proj.root / "documents").is_dir() and (proj.artifacts / "keep.txt").is_file()


def test_export_never_writes_over_the_projects_own_folders(project, runner):
    proj = project(pairs=False)
    register(proj, None)
    assert not proj.artifacts.exists()
    one_line_error(invoke(runner, "export", "base", proj.artifacts, "-p", proj.root), "refusing to replace")
    assert not proj.artifacts.exists()


def test_export_carries_the_versions_fine_tuned_embedder(project, runner, tmp_path):
    proj = project(pairs=False)
    register(proj, None)
    embedder = tmp_path / "cycle-0001-v1-embedder"  # what stages/retriever.py records (a stand-in folder)
    embedder.mkdir()
    (embedder / "modules.json").write_text("[]")
    with open_store(proj.store_url)() as s:
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        v1.hyperparams = {"retriever": {"embedder": str(embedder), "index": str(tmp_path / "index")}}
        s.commit()
    out = tmp_path / "exported"
    ok(invoke(runner, "export", "v1", out, "-p", proj.root))
    assert (out / "embedder" / "modules.json").read_text() == "[]"
    assert json.loads((out / "tuneloop.json").read_text())["embedder"] == "embedder"
    assert "THIS_FOLDER/embedder" in (out / "README.md").read_text()
    (embedder / "modules.json").unlink()  # gone: refused before anything is written
    one_line_error(invoke(runner, "export", "v1", tmp_path / "again", "-p", proj.root),
                   "fine-tuned embedder of v1 is missing")
    assert not (tmp_path / "again").exists()


def test_export_base_version_without_adapter(project, runner, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    proj = project(pairs=False)
    register(proj, None)
    out = tmp_path / "base-export"
    ok(invoke(runner, "export", "base", out, "-p", proj.root))
    meta = json.loads((out / "tuneloop.json").read_text())
    assert meta["version"] == "base" and meta["parent"] is None and meta["adapter_path"] is None
    a = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_errors(project, runner, tmp_path, adapter_dir):
    proj = project(pairs=False)
    register(proj, tmp_path / "gone")
    one_line_error(invoke(runner, "export", "nope", tmp_path / "o1", "-p", proj.root), "unknown model version 'nope'")
    one_line_error(invoke(runner, "export", "v1", tmp_path / "o2", "-p", proj.root), "adapter of v1 is missing")
    # the tiny model's word-level tokenizer has no GGUF equivalent: a one-line error with the alternative
    line = one_line_error(invoke(runner, "export", "base", tmp_path / "o3", "--gguf", "-p", proj.root),
                          "convert_hf_to_gguf.py")
    assert "BPE" in line
    assert not (tmp_path / "o3").exists()


def build_bpe_llama(target: Path) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer (the kind GGUF's "gpt2" tokenizer model describes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.helpers import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_texts(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_export_gguf_is_readable(project, runner, tmp_path):
    import gguf
    import numpy as np
    from safetensors import safe_open

    from tuneloop.export import _permute

    model_dir = build_bpe_llama(tmp_path / "bpe-llama")
    proj = project(pairs=False)
    register(proj, None, base_model=str(model_dir))
    out = tmp_path / "gguf-export"
    output = ok(invoke(runner, "export", "v1", out, "--gguf", "-p", proj.root))
    assert "model.gguf" in output
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k).numpy() for k in f.keys()}
    expected = [k for k in hf if k != "lm_head.weight"]  # tied embeddings: llama.cpp reuses token_embd
    assert len(reader.tensors) == len(expected) == 2 * 9 + 2
    tensors = {t.name: t for t in reader.tensors}
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), hf["model.embed_tokens.weight"])
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    assert np.array_equal(q, _permute(hf["model.layers.0.self_attn.q_proj.weight"], 4))
    fields = reader.fields
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    config = json.loads((out / "config.json").read_text())
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert "tokenizer.ggml.merges" in fields and "tokenizer.chat_template" in fields
    modelfile = (out / "Modelfile").read_text()  # Ollama: `ollama create NAME -f OUT/Modelfile`
    assert modelfile.startswith("FROM ./model.gguf\n") and "PARAMETER temperature 0" in modelfile
    chatml = "<|im_start|>" in (bytes(fields["tokenizer.chat_template"].parts[-1]).decode())
    assert ('PARAMETER stop "<|im_end|>"' in modelfile) == chatml
    assert "ollama create" in (out / "README.md").read_text() and not (out / "lora").exists()  # no adapter

    # transformers' own GGUF loader (which undoes llama.cpp's q/k layout) reads back the same model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False), return_tensors="pt",
              add_special_tokens=False)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    from_hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.inference_mode():
        assert torch.allclose(from_gguf(**enc).logits, from_hf(**enc).logits, atol=1e-5)
    gguf_tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    text = "The agreement is governed by the laws of Delaware."
    assert gguf_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
