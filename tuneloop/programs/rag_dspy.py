"""The student's retrieval-augmented prompt as a DSPy program, for models that follow DSPy's formats.

`RagProgram` is one `dspy.Predict` over a typed signature (excerpts, question -> answer) whose
instructions are the student's system prompt and whose excerpts are numbered as in
`build_messages`. A DSPy optimiser (`stages/prompts.py`) compiles it for one model version (demos;
with MIPROv2 also the instructions); the compiled program is saved as JSON and named in that
version's `hyperparams["rag_program"]`. `ProgramAnswerer` answers with it through DSPy's
`ChatAdapter`, in batches; `make_answerer` returns it when a version has a program and the plain
`RagAnswerer` otherwise, so evaluation and serving use the (model, program) pair the gate judged.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import dspy
from dspy.utils.exceptions import AdapterParseError

from tuneloop.models.base import ChatModel, GenerationParams, Message
from tuneloop.programs.dspy_bridge import format_many
from tuneloop.programs.rag import SYSTEM_PROMPT, Answer, Passage, RagAnswerer, Retriever
from tuneloop.programs.synth import number_passages
from tuneloop.progress import Reporter, SilentReporter, batched_chat

_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]")


class AnswerFromExcerpts(dspy.Signature):
    __doc__ = SYSTEM_PROMPT

    excerpts: str = dspy.InputField(desc="numbered passages of the document")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="Yes or No, the exact words from the document, or: The document does not say.")


class RagProgram(dspy.Module):
    """The retrieval-augmented answer step (retrieval itself stays outside: it gives `excerpts`)."""

    def __init__(self):
        super().__init__()
        self.respond = dspy.Predict(AnswerFromExcerpts)

    def forward(self, excerpts: str, question: str):
        return self.respond(excerpts=excerpts, question=question)


def program_inputs(question: str, passages: Sequence[Passage]) -> dict[str, str]:
    """The program's input fields for a question and its retrieved passages."""
    return {"excerpts": number_passages(passages), "question": question.strip()}


def load_program(path: Path) -> RagProgram:
    """A RagProgram with the state (demos, instructions) saved at `path` by `Module.save`."""
    program = RagProgram()
    program.load(str(path))
    return program


class CompiledRag:
    """A saved RagProgram: the conversation it sends for a question, and the answer in a reply."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.program = load_program(self.path)
        self.adapter = dspy.ChatAdapter()

    def messages(self, question: str, passages: Sequence[Passage]) -> list[Message]:
        """DSPy's ChatAdapter prompt with the program's instructions and demos."""
        return format_many(self.program.respond, self.adapter, [program_inputs(question, passages)])[0]

    def parse(self, reply: str) -> str:
        """The `answer` field of a reply; a reply without the field markers is taken whole."""
        try:
            return str(self.adapter.parse(self.program.respond.signature, reply)["answer"]).strip()
        except (AdapterParseError, ValueError, KeyError):
            return _MARKER.sub(" ", reply).strip()


class ProgramAnswerer(RagAnswerer):
    """`RagAnswerer` with a compiled program's prompt instead of `build_messages` (same `answer_many`)."""

    def __init__(self, retriever: Retriever, model: ChatModel, params: GenerationParams, program: CompiledRag):
        super().__init__(retriever, model, params)
        self.program = program

    def answer_many(
        self, questions: Sequence[tuple[str, str | None]], reporter: Reporter | None = None, batch: int = 8
    ) -> list[Answer]:
        """Answer (question, document-or-None) pairs with the compiled program, in batches."""
        contexts = [self.retriever.retrieve(q, doc) for q, doc in questions]
        convs = [self.program.messages(q, ctx) for (q, _), ctx in zip(questions, contexts)]
        replies = batched_chat(self.model, convs, self.params, reporter or SilentReporter(), "answering", batch)
        return [Answer(self.program.parse(r), ctx) for r, ctx in zip(replies, contexts)]


def make_answerer(retriever: Retriever, model: ChatModel, params: GenerationParams,
                  program: Path | None = None, yes_no_threshold: float | None = None,
                  copy_min_overlap: float | None = None) -> RagAnswerer:
    """The answerer of a model version: its compiled program when it has one, else the plain prompt
    (which decides yes/no questions against `yes_no_threshold`, `programs/decide.py`, and copies
    extraction answers from the passages with `copy_min_overlap`, `programs/copy.py`)."""
    if program is None:
        return RagAnswerer(retriever, model, params, yes_no_threshold, copy_min_overlap)
    return ProgramAnswerer(retriever, model, params, CompiledRag(program))
