"""The model card of an exported version (`tuneloop export`: README.md), and the Ollama Modelfile
of its GGUF.

The card says what a reader needs before serving the model: the base model and the version's
lineage (each ancestor and how it was trained), the training data (examples, content hash, the
licence of the project's data: `data_license`), every evaluation with its confidence interval,
the gate's decision and why, and how to serve it (transformers, vLLM merged or with the LoRA
adapter loaded at run time, llama.cpp's server and Ollama from the GGUF).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from tuneloop.store import EvalRun, ModelVersion, Session

LORA_DIR = "lora"  # OUT/lora/<name>: the PEFT adapter as vLLM loads it (--enable-lora)


@dataclass
class CardFacts:
    """What the card states, read from the store (and the export's own metadata)."""

    meta: dict[str, Any]  # the export's tuneloop.json
    lineage: list[tuple[str, str]]  # (version, method) from the version back to the base model
    evals: list[str]  # one line per evaluation, with its interval
    gate: str
    data_license: str
    lora_name: str | None  # the name vLLM serves the adapter under (None: no adapter)
    gguf: bool


def card_facts(session: Session, version: ModelVersion, meta: dict[str, Any], primary: str, data_license: str,
               lora_name: str | None, gguf: bool) -> CardFacts:
    lineage, v = [], version
    while v is not None:
        lineage.append((v.name, v.method))
        v = session.get(ModelVersion, v.parent_id) if v.parent_id is not None else None
    evals = []
    for run in session.scalars(select(EvalRun).where(EvalRun.model_version_id == version.id).order_by(EvalRun.id)):
        evals.append(_eval_line(run, primary))
    gate = (version.metrics or {}).get("gate")
    status = version.status
    decision = {"champion": "promoted: it is the champion", "retired": "promoted earlier, since replaced",
                "rejected": "rejected by the gate", "candidate": "not judged by the gate yet",
                "intermediate": "a step on the way (never gated on its own)",
                "superseded": "replaced inside its cycle"}.get(status, status)
    return CardFacts(meta, lineage, evals, f"{decision}" + (f" ({gate})" if gate else ""),
                     data_license or "not stated (set `data_license` in tuneloop.yaml)", lora_name, gguf)


def _eval_line(run: EvalRun, primary: str) -> str:
    m = run.metrics or {}
    if "anchor_score" in m:
        return f"anchor set (general ability, n={run.n}): anchor_score {m['anchor_score']:.3f}"
    value = m.get(primary)
    if not isinstance(value, int | float):
        return f"eval set {run.eval_set_hash[:12]} (n={run.n}): {primary} not recorded"
    low, high = m.get(f"{primary}_ci_low"), m.get(f"{primary}_ci_high")
    interval = f" [95% CI {low:.3f}, {high:.3f}]" if isinstance(low, int | float) and isinstance(high, int | float) \
        else ""
    return f"held-out set {run.eval_set_hash[:12]} (n={run.n}): {primary} {value:.3f}{interval}"


def render_card(f: CardFacts) -> str:
    meta = f.meta
    lines = [f"# {meta['version']}", "",
             f"Exported by tuneloop {meta['tuneloop_version']} at {meta['exported_at']}.", "",
             "## Model", "",
             f"- base model: {meta['base_model']}",
             f"- method: {meta['method']}; lineage: " + " <- ".join(f"{n} ({m})" for n, m in f.lineage),
             f"- status: {meta['status']}; the gate: {f.gate}", "",
             "## Training data", "",
             f"- {meta['training_examples']} examples, content hash {meta['training_data_hash'] or '-'}",
             f"- licence of the data: {f.data_license}", "",
             "## Evaluation", ""]
    lines += [f"- {e}" for e in f.evals] or ["- none recorded"]
    lines += ["", "Hyperparameters and every metric: tuneloop.json.", "", "## Serve it", "",
              "- transformers: `AutoModelForCausalLM.from_pretrained('THIS_FOLDER')` (the merged weights)",
              "- vLLM, merged: `vllm serve THIS_FOLDER`"]
    if f.lora_name:
        lines += [f"- vLLM, the LoRA adapter on the base model, loaded at run time: start "
                  f"`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE_MODEL --enable-lora "
                  f"--max-lora-rank {meta.get('lora_rank') or 64}`, then `curl -X POST "
                  f"http://HOST:8000/v1/load_lora_adapter -H 'Content-Type: application/json' -d "
                  f"'{json.dumps({'lora_name': f.lora_name, 'lora_path': f'THIS_FOLDER/{LORA_DIR}/{f.lora_name}'})}'` "
                  f"and ask for model `{f.lora_name}`"]
    if f.gguf:
        lines += ["- llama.cpp: `llama-server -m THIS_FOLDER/model.gguf --port 8080` "
                  "(OpenAI-compatible at /v1/chat/completions)",
                  f"- Ollama: `ollama create {f.lora_name or meta['version']} -f THIS_FOLDER/Modelfile`, then "
                  f"`ollama run {f.lora_name or meta['version']}`"]
    if meta.get("embedder"):
        lines += ["", "The version retrieves with its own fine-tuned embedder: "
                  "`SentenceTransformer('THIS_FOLDER/embedder')` (re-embed your chunks with it)."]
    return "\n".join(lines) + "\n"


CHATML = ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
          '{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n')


def modelfile(chat_template: str | None) -> str:
    """Ollama's Modelfile for OUT/model.gguf: greedy, and the ChatML template when the model uses it
    (otherwise Ollama reads the chat template stored in the GGUF)."""
    text = "FROM ./model.gguf\nPARAMETER temperature 0\n"
    if chat_template and "<|im_start|>" in chat_template:
        text += CHATML
    return text
