"""Run DSPy programs on tuneloop's chat models: an LM engine, a plain-chat adapter, batched predict.

DSPy modules (signatures, demos, optimisers) describe *what* each model call does. Two pieces
connect them to tuneloop's models:

* `ChatModelEngine` lets `dspy.LM` call any tuneloop `ChatModel` (a local transformers model or a
  cached endpoint), so DSPy modules and optimisers run unchanged on either.
* `PlainChatAdapter` is for small local models. DSPy's own adapters ask for `[[ ## field ## ]]`
  markers or JSON; a 135M model cannot produce those (every reply becomes a parse error). The
  plain adapter renders a signature as an ordinary chat prompt (instructions as the system
  message, input fields as labelled blocks, the output field's description as the request) and
  reads the whole reply as the output. DSPy ships nothing like it, hence this hand-written one.

`predict_many` runs one `dspy.Predict` over many inputs through the adapter's own `format` and
`parse` (exactly what `Adapter.__call__` does per call), but sends the formatted conversations to
the chat model in batches: local models generate a whole batch per `generate()` call, which a
thread-per-call DSPy loop cannot do.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import dspy
import dspy.lm15 as lm15
from dspy.utils.exceptions import AdapterParseError

from tuneloop.models.base import ChatModel, GenerationParams, Message
from tuneloop.progress import Reporter, SilentReporter, batched_chat

# --------------------------------------------------------------------------- engine


def _text(parts) -> str:
    return "".join(getattr(p, "text", "") or "" for p in parts)


class ChatModelEngine:
    """A DSPy 3.4 LM engine (`complete(Request) -> Response`) over a tuneloop ChatModel."""

    def __init__(self, model: ChatModel, params: GenerationParams):
        self.model, self.params = model, params

    def complete(self, request: lm15.Request) -> lm15.Response:
        messages: list[Message] = []
        system = request.system if isinstance(request.system, str) else _text(request.system or ())
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": str(m.role), "content": _text(m.parts)} for m in request.messages]
        cfg = request.config
        params = replace(
            self.params,
            max_new_tokens=cfg.max_tokens or self.params.max_new_tokens,
            temperature=self.params.temperature if cfg.temperature is None else cfg.temperature,
        )
        reply = self.model.chat([messages], params)[0]
        return lm15.response_from_openai_chat({
            "id": "tuneloop", "model": request.model, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })

    def close(self) -> None:
        pass


def dspy_lm(model: ChatModel, params: GenerationParams) -> dspy.LM:
    """A `dspy.LM` backed by a tuneloop ChatModel (our reply cache replaces DSPy's)."""
    return dspy.LM(f"tuneloop/{model.name}", engine=ChatModelEngine(model, params), cache=False)


# --------------------------------------------------------------------------- plain-chat adapter


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize() + ":"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return str(value)


class PlainChatAdapter(dspy.Adapter):
    """Ordinary chat prompts for models that cannot follow DSPy's field markers.

    System message: the signature's instructions. User message: demos (as a bullet list), each
    input field as `Label: value`, then the first output field's description as the request.
    Parsing: the whole reply is the first output field; a signature may define
    `parse_plain(reply) -> dict` to fill several output fields from the one reply.
    """

    def format(self, signature, demos, inputs) -> list[dict[str, Any]]:
        out_name, out_field = next(iter(signature.output_fields.items()))
        parts = []
        shown = [d for d in demos if d.get(out_name)]
        if shown:
            lines = []
            for d in shown:
                extra = [f"  {_label(k)} {_show(d[k])}" for k, f in signature.output_fields.items()
                         if k != out_name and d.get(k) and isinstance(d.get(k), str)]
                lines.append(f"- {_label(out_name)} {_show(d[out_name])}" + "".join("\n" + e for e in extra))
            parts.append("Examples:\n" + "\n".join(lines) + "\n")
        for name in signature.input_fields:
            value = inputs.get(name)
            if value in (None, "", [], ()) or name == "task":
                continue
            text = _show(value).strip()
            parts.append(f"{_label(name)}\n{text}\n" if "\n" in text or len(text) > 80
                         else f"{_label(name)} {text}")
        if inputs.get("task"):  # an instruction reads better to a small model as a plain sentence
            parts.append(str(inputs["task"]).strip())
        request = (out_field.json_schema_extra or {}).get("desc") or ""
        if request and not request.startswith("${"):
            parts.append(request)
        return [{"role": "system", "content": signature.instructions.strip()},
                {"role": "user", "content": "\n".join(parts).strip()}]

    def parse(self, signature, completion: str) -> dict[str, Any]:
        reply = completion.strip()
        if not reply:
            raise AdapterParseError(adapter_name="PlainChatAdapter", signature=signature, lm_response=completion,
                                    message="empty reply")
        custom: Callable[[str], dict] | None = getattr(signature, "parse_plain", None)
        if custom is not None:
            return custom(reply)
        return {next(iter(signature.output_fields)): reply}


def make_adapter(choice: str, backend: str) -> dspy.Adapter:
    """`auto`: the plain adapter for local models, DSPy's ChatAdapter for endpoints."""
    if choice == "plain" or (choice == "auto" and backend == "local"):
        return PlainChatAdapter()
    if choice == "json":
        return dspy.JSONAdapter()
    return dspy.ChatAdapter()


# --------------------------------------------------------------------------- batched predict


def format_many(predictor: dspy.Predict, adapter: dspy.Adapter, inputs: Sequence[dict],
                demos: Sequence[Sequence[dict]] | None = None) -> list[list[Message]]:
    """The conversations DSPy would send for each input.

    Demos are the predictor's own (set by an optimiser) when it has any; otherwise `demos[i]`
    for input i (e.g. seeds sampled per example, as Self-Instruct does), or none.
    """
    fixed = [dict(d) for d in predictor.demos]
    return [adapter.format(predictor.signature, fixed or [dict(d) for d in (demos[i] if demos else [])], dict(x))
            for i, x in enumerate(inputs)]


def predict_many(predictor: dspy.Predict, adapter: dspy.Adapter, model: ChatModel, inputs: Sequence[dict],
                 params: GenerationParams, reporter: Reporter | None = None, description: str = "generating",
                 batch: int | str = 8, demos: Sequence[Sequence[dict]] | None = None
                 ) -> list[tuple[dict | None, str]]:
    """Run `predictor` on every input, batched; returns (parsed output fields or None, raw reply)."""
    if not inputs:
        return []
    convs = format_many(predictor, adapter, inputs, demos)
    replies = batched_chat(model, convs, params, reporter or SilentReporter(), description, batch)
    results: list[tuple[dict | None, str]] = []
    for reply in replies:
        try:
            results.append((adapter.parse(predictor.signature, reply), reply))
        except (AdapterParseError, ValueError):
            results.append((None, reply))
    return results


_CITE = re.compile(r"\[(\d{1,2})\]")


def cited_numbers(text: str) -> list[int]:
    """Passage numbers cited as [1], [2] in a reply, in order, without repeats."""
    seen: list[int] = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if n not in seen:
            seen.append(n)
    return seen


def strip_citations(text: str) -> str:
    return re.sub(r"\s*\[\d{1,2}\]", "", text).strip()
