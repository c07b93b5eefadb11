"""Typed project settings: one `tuneloop.yaml` per project folder.

Every section is a pydantic model with `extra="forbid"`, so a mistyped key is an error that names
it instead of being silently ignored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from tuneloop.errors import ConfigError
from tuneloop.settings_base import Section
from tuneloop.settings_compute import ComputeSettings
from tuneloop.settings_review import ReviewSettings
from tuneloop.settings_tracking import TrackingSettings
from tuneloop.textfile import read_text

SETTINGS_FILE = "tuneloop.yaml"
DEFAULT_LLM = "builtin:smollm2-135m-instruct"
DEFAULT_EMBEDDER = "builtin:all-minilm-l6-v2"


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's seeds are unsigned 32-bit integers


class RoleSettings(Section):
    """Where one model role runs: in-process (`local`) or on an OpenAI-compatible endpoint."""

    backend: Literal["local", "openai"] = "local"
    model: str = DEFAULT_LLM  # builtin:NAME, a local folder, or the endpoint's model name
    base_url: str | None = None  # e.g. http://localhost:8000/v1 (vLLM, Ollama, llama.cpp server)
    api_key_env: str | None = None  # name of the environment variable that holds the API key
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    # Local models: prompts per generate() call; "auto" starts high on CUDA and halves on
    # out-of-memory (accelerate's find_executable_batch_size). Endpoints: requests in flight.
    batch_size: int | Literal["auto"] = 8
    max_retries: int = Field(4, ge=0, le=20)  # endpoints: retries with exponential backoff
    cache: bool = True  # replies cached on disk, keyed by the full request (reruns cost no calls)
    # how DSPy programs talk to this model: auto = plain chat for local models, DSPy's ChatAdapter
    # for endpoints (chat models only; the embedder ignores it)
    adapter: Literal["auto", "plain", "chat", "json"] = "auto"

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v):
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("batch_size must be between 1 and 1024, or 'auto'")
        return v

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> RoleSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://localhost:8000/v1)")
        return self


class ModelsSettings(Section):
    student: RoleSettings = RoleSettings(max_new_tokens=48)
    teacher: RoleSettings = RoleSettings(temperature=0.9, max_new_tokens=64)
    judge: RoleSettings = RoleSettings(max_new_tokens=16)
    embedder: RoleSettings = RoleSettings(model=DEFAULT_EMBEDDER, batch_size=32)


class IngestSettings(Section):
    chunk_tokens: int = Field(128, ge=16, le=2048)  # in embedder tokens (MiniLM sees 256)
    overlap_tokens: int = Field(24, ge=0)
    top_k: int = Field(2, ge=1, le=20)  # chunks put in the prompt
    rrf_k: int = Field(60, ge=1, le=10_000)
    dense_weight: float = Field(0.5, ge=0.0, le=1.0)  # fusion: 0 BM25 only, 1 dense only (retriever step chooses)
    dense: bool = True  # False: BM25 only (no embedder needed)
    # A larger document is refused (a .txt/.md/.pdf file, or one JSONL record's text): ingest time
    # grows with size (embedding ~15,000 chunks per 10 MB of text takes minutes on a CPU).
    max_document_mb: float = Field(20.0, gt=0, le=1_000)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IngestSettings:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class RetrieverSettings(Section):
    """Cycle step `retriever`: fine-tune the local dense embedder on the training examples'
    (question, evidence passage) pairs; the candidate answers from an index built with it."""

    fine_tune: bool = True
    min_pairs: int = Field(16, ge=2, le=1_000_000)  # fewer pairs: skipped (the candidate keeps the champion's)
    epochs: float = Field(3.0, gt=0, le=100)
    batch_size: int = Field(16, ge=2, le=4_096)  # in-batch negatives: larger batches, more negatives
    learning_rate: float = Field(2e-5, gt=0, lt=1.0)
    hard_negatives: bool = True  # plus, per pair, the same-document chunk the base embedder ranks highest wrongly
    seed: Seed = 0
    # The BM25/dense fusion weight is chosen on the dev split (hit@top_k of the evidence) among
    # these, when at least `min_dev_items` dev questions carry a textual reference; else
    # ingest.dense_weight stays. Empty: never chosen.
    dense_weights: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    min_dev_items: int = Field(8, ge=1, le=1_000_000)
    # The number of passages in the prompt is chosen on the dev split by the candidate's own answers
    # (eval.primary_metric) among these, when at least `min_dev_items` dev questions exist; it
    # moves from ingest.top_k only when it beats it beyond chance. Fewer than two: never chosen.
    top_ks: list[int] = [1, 2, 3]

    @field_validator("dense_weights")
    @classmethod
    def _weights_in_range(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not 0.0 <= w <= 1.0]
        if bad:
            raise ValueError(f"dense weights must be between 0 and 1, got {bad}")
        return sorted(set(v))

    @field_validator("top_ks")
    @classmethod
    def _top_ks_in_range(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if not 1 <= k <= 20]
        if bad:
            raise ValueError(f"top_ks must be between 1 and 20 passages, got {bad}")
        return sorted(set(v))


class AnswerSettings(Section):
    """How the assistant answers: the same in eval, the gate, the canary and `tuneloop serve`."""

    copy_spans: bool = True  # an extraction reply becomes the passage span it points at (programs/copy.py)
    copy_min_overlap: float = Field(0.5, ge=0.0, le=1.0)  # ... when that span's token F1 against the reply reaches this

    @property
    def copy_threshold(self) -> float | None:
        """`copy_min_overlap` when copying is on, else None (the form the answerers take)."""
        return self.copy_min_overlap if self.copy_spans else None


QUESTION_TYPES = ("self_instruct", "fact", "yes_no", "explanation", "comparison", "negative")
QuestionType = Literal["self_instruct", "fact", "yes_no", "explanation", "comparison", "negative"]


class TransferSettings(Section):
    """Seed-question transfer (`stages/transfer.py`): the experts' questions asked of other documents."""

    enabled: bool = True
    max_questions: int = Field(64, ge=0, le=1_000_000)  # pairs the labeller answers per cycle (3 generations each)
    labeller: Literal["champion", "teacher"] = "champion"  # who answers: the champion student, or the teacher
    samples: int = Field(3, ge=1, le=10)  # passage sets each question is answered under; all must agree
    yes_no_margin: float = Field(1.0, ge=0.0, le=50.0)  # log-odds a yes/no decision keeps from the threshold
    labeller_min_accuracy: float = Field(0.7, ge=0.0, le=1.0)  # dev balanced accuracy before its yes/no counts
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)  # token F1 between the answers of the passage sets
    max_answer_chars: int = Field(300, ge=1, le=20_000)
    # evidence-anchored yes/no labels (stages/evidence.py), per question across the documents asked:
    evidence_no_share: float = Field(0.3, ge=0.0, le=1.0)  # lowest share of similarities labelled "No"
    evidence_yes_share: float = Field(0.2, ge=0.0, le=1.0)  # highest share labelled "Yes" ...
    evidence_yes_floor: float = Field(0.9, ge=0.0, le=1.0)  # ... when also above this quantile of all scores
    # evidence-anchored answers in words: the sentence closest to the experts' evidence spans
    evidence_spans: bool = False
    evidence_span_share: float = Field(0.3, ge=0.0, le=1.0)  # highest share of a question's documents answered ...
    evidence_span_floor: float = Field(0.5, ge=0.0, le=1.0)  # ... when also above this quantile of all scores


class SynthSettings(Section):
    questions_per_cycle: int = Field(24, ge=1, le=100_000)
    # Strategy mix (relative weights). self_instruct: new questions in the style of the seeds
    # (Wang et al. 2023); the others are document-grounded, one chunk (two for comparison) each;
    # negative: a question the passage does not answer ("The document does not say").
    strategies: dict[QuestionType, float] = {
        "self_instruct": 2.0, "fact": 2.0, "yes_no": 2.0, "explanation": 1.0, "comparison": 1.0, "negative": 1.0,
    }
    human_demos: int = Field(6, ge=0, le=16)  # seed examples shown to the teacher
    machine_demos: int = Field(2, ge=0, le=16)  # earlier accepted synthetic examples shown too
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0)  # Self-Instruct novelty filter
    embed_dup_threshold: float = Field(0.95, gt=0.0, le=1.0)  # cosine: near-duplicate question
    contamination_rouge: float = Field(0.7, gt=0.0, le=1.0)  # vs evaluation questions
    contamination_cosine: float = Field(0.80, gt=0.0, le=1.0)  # MiniLM: paraphrases measured 0.47-0.96
    contamination_scope: Literal["document", "all"] = "document"  # eval questions on the same document, or any
    judge_grounding: bool = True  # the judge checks each answer against its cited passages
    round_trip: bool = True  # answer again from retrieval alone; keep only when both answers agree
    round_trip_min_f1: float = Field(0.5, ge=0.0, le=1.0)
    self_distill: bool = False  # the student rewrites accepted answers in its own words
    optimize: Literal["none", "bootstrap"] = "none"  # tune generator prompts (capable teachers only)
    min_question_chars: int = Field(12, ge=0, le=4_000)
    max_question_chars: int = Field(300, ge=1, le=4_000)
    min_answer_chars: int = Field(1, ge=0, le=20_000)
    max_answer_chars: int = Field(200, ge=1, le=20_000)
    min_support: float = Field(0.6, ge=0.0, le=1.0)  # share of answer words found in its passages
    transfer: TransferSettings = TransferSettings()
    label_check: str | None = None  # a seed-format file of known labels: the report scores synthetic labels
    seed: Seed = 0

    @field_validator("strategies")
    @classmethod
    def _some_weight(cls, v):
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError("strategy weights must be >= 0 and at least one must be > 0")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> SynthSettings:
        for what in ("question", "answer"):
            lo, hi = getattr(self, f"min_{what}_chars"), getattr(self, f"max_{what}_chars")
            if lo > hi:
                raise ValueError(f"min_{what}_chars ({lo}) is more than max_{what}_chars ({hi})")
        return self


class LoraSettings(Section):
    """The LoRA adapter a training run starts when its parent is the base model (SFT, DAPT, every
    alignment method, RLOO's reward model); also WiSE-FT's settings for averaged adapters."""

    r: int = Field(16, ge=1, le=4_096)
    alpha: int = Field(32, ge=1, le=65_536)
    # 0: LoRA dropout draws a random mask over every adapted layer's input (7 per block here), 27%
    # of an SFT step on CPU (bench/speed.py); LLaMA-Factory and Unsloth default to 0 as well
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    max_rank: int | None = Field(64, ge=1, le=4_096)  # WiSE-FT: averaged adapters above this rank are SVD-truncated


class SFTSettings(Section):
    epochs: float = Field(2.0, gt=0, le=1_000)
    learning_rate: float = Field(3e-4, gt=0, lt=1.0)
    batch_size: int = Field(4, ge=1, le=4_096)
    grad_accum: int = Field(1, ge=1, le=4_096)
    max_length: int = Field(512, ge=32, le=1_048_576)
    replay_fraction: float = Field(0.1, ge=0.0, le=1.0)  # earlier cycles' data mixed in
    # seeds_every_cycle: every cycle trains on all the seeds again (with what is new). False: a
    # seed a version already trained on joins the replay pool like any other example, so a cycle's
    # steps go to what is new (feedback from use, fresh synthetic data) plus the replay share.
    seeds_every_cycle: bool = True
    balance_yes_no: bool = True  # down-sample the majority Yes/No answer in training data
    # the rarer answer kind (yes/no or extraction) is repeated until it is this share of the rows
    # (each example at most 4 times); 0 turns it off
    min_kind_share: float = Field(0.3, ge=0.0, le=0.5)
    save_steps: int = Field(10, ge=1)  # checkpoint interval; a killed run resumes from the last one
    seed: Seed = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA that has it, else fp32


class EvalSettings(Section):
    primary_metric: Literal[
        "macro_score", "token_f1", "exact_match", "rouge_l", "cuad_match", "yes_no_balanced_accuracy",
        "extract_token_f1",
    ] = "macro_score"  # mean of yes/no balanced accuracy and extraction token F1
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)  # candidate must beat champion by more than this
    # gate_average: "items": the primary metric over all held-out items; "sources": its mean over
    # the held-out sources (imported "seed" questions, "feedback" questions from use), so new
    # traffic weighs as much as the imported set, and no source may fall by more than source_tolerance
    gate_average: Literal["items", "sources"] = "items"
    source_tolerance: float = Field(0.05, ge=0.0, le=1.0)
    significance: Literal["bootstrap", "none"] = "bootstrap"  # paired bootstrap test of the gain, or none
    confidence: float = Field(0.95, gt=0.5, lt=1.0)  # the gain must be significant at this level
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    limit: int | None = Field(None, ge=1)  # evaluate only the first N held-out items
    # judge_metrics: the judge also rates each held-out answer (correct against the reference?
    # faithful to the retrieved passages?) and the gate records the candidate's pairwise win rate
    # against the champion. Off by default: the default judge is a 135M model whose verdicts are
    # close to noise; turn it on with a capable judge (an endpoint or a larger local model).
    judge_metrics: bool = False
    faithfulness_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # the gate refuses a larger judge_faithfulness drop


class AlignSettings(Section):
    """Preference alignment after SFT (TRL trainers), continuing the champion's LoRA adapter."""

    method: Literal["dpo", "orpo", "kto", "grpo", "rloo"] = "dpo"
    enabled: bool = True  # `tuneloop cycle` aligns after SFT when preference data exists
    ai_feedback: bool = True  # cycle: RLAIF pairs on the SFT candidate's answers before aligning
    beta: float = Field(0.1, gt=0.0, le=100.0)  # DPO/KTO KL strength; ORPO's lambda (papers' defaults)
    learning_rate: float = Field(5e-5, gt=0, lt=1.0)
    epochs: float = Field(1.0, gt=0, le=1_000)
    batch_size: int = Field(2, ge=1, le=4_096)
    grad_accum: int = Field(1, ge=1, le=4_096)
    max_length: int = Field(512, ge=32, le=1_048_576)
    max_completion_length: int = Field(48, ge=4, le=32_768)  # GRPO/RLOO sampled answers
    num_generations: int = Field(4, ge=2, le=256)  # GRPO/RLOO group size
    reward: Literal["judge", "metric"] = "metric"  # GRPO: the judge's rubric or token F1 vs reference
    replay_fraction: float = Field(0.1, ge=0.0, le=1.0)  # earlier cycles' data + seeds mixed in
    balance_yes_no: bool = True  # dpo/orpo: down-sample pairs whose chosen answer is the majority Yes/No
    save_steps: int = Field(10, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: Seed = 0


class ContinualSettings(Section):
    """Guarding what earlier cycles learned."""

    wise_ft: bool = False  # average champion and candidate weights (WiSE-FT); alpha picked on the dev set
    # candidate weights' shares tried; 1.0 is the candidate itself, 0.0 the champion
    wise_alphas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field([0.25, 0.5, 0.75, 1.0], min_length=1)
    # with `anchor`: an alpha whose anchor score falls past `anchor_tolerance` below the champion's
    # is not chosen (the gate would refuse it); the best dev score among the others wins
    wise_anchor_guard: bool = True
    anchor: bool = True  # evaluate the general-ability anchor set every cycle
    anchor_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # the gate refuses a drop larger than this
    dapt: bool = False  # domain-adaptive pre-training on raw chunks before SFT
    dapt_epochs: float = Field(1.0, gt=0, le=1_000)
    dapt_general_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # general text mixed in
    dapt_max_chunks: int | None = Field(None, ge=1)  # pre-train on a seeded sample of at most this many chunks


class ServeSettings(Section):
    """`tuneloop serve`: the OpenAI-compatible API, the feedback API and the web page."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys_env: str = "TUNELOOP_API_KEYS"  # env var: comma-separated client keys (name:key or key)
    admin_token_env: str = "TUNELOOP_ADMIN_TOKEN"  # env var: the admin token (admin page and API)
    reviewer_keys_env: str = "TUNELOOP_REVIEWER_KEYS"  # env var: reviewer keys (name:key), see every interaction
    max_body_bytes: int = Field(64_000, ge=1_000)  # larger requests get 413
    max_question_chars: int = Field(4_000, ge=10)
    max_feedback_chars: int = Field(4_000, ge=10)
    ab_mode: bool = False  # answer with champion and challenger side by side (when a challenger exists)
    reload_seconds: float = Field(5.0, gt=0)  # how often the server checks for a newly promoted champion
    # per key (client or reviewer; the admin token is exempt), 0 = unlimited; over the limit: 429 + Retry-After
    requests_per_minute: int = Field(60, ge=0)  # every /v1 request counts
    tokens_per_minute: int = Field(4096, ge=0)  # generated (completion) tokens
    max_tokens_limit: int = Field(512, ge=1)  # largest max_tokens a request may ask for (more: 422)
    generation_timeout_seconds: float = Field(60.0, gt=0)  # one generation stops here (answer cut, "length")
    # Concurrent requests to one local model answered together, up to this many per batch
    # (models/batching.py); 1: one at a time. A batch waits batch_wait_ms for requests sent together.
    max_batch: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(10.0, ge=0, le=1000)


class FeedbackSettings(Section):
    """Turning usage into training data: RLAIF and the routing of human feedback."""

    rlaif_prompts: int = Field(32, ge=1, le=100_000)  # prompts per RLAIF run (interactions, then synthetic, then seeds)
    rlaif_candidates: int = Field(3, ge=2, le=16)  # sampled answers per prompt (n*(n-1)/2 pairs each)
    rlaif_temperature: float = Field(0.8, gt=0.0, le=2.0)
    rlaif_mode: Literal["pairwise", "rubric"] = "pairwise"  # pairwise: both orders must agree
    # pairwise, prompts from expert seeds: answers whose token F1 against the expert's answer differs
    # by at least the margin become a pair without the judge (reference-guided feedback)
    rlaif_reference: bool = True
    rlaif_reference_margin: float = Field(0.5, gt=0.0, le=1.0)
    contradiction_rule: Literal["latest", "majority", "drop"] = "majority"  # votes that disagree on one answer
    # cycle step "feedback": corrected answers (and, with approved_to_examples, answers people
    # approved: thumbs up or a rating >= approved_rating) become examples, this share of questions held out
    corrections_to_examples: bool = True
    approved_to_examples: bool = True  # without them the examples from use hold only the model's mistakes
    approved_rating: int = Field(4, ge=1, le=5)
    heldout_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # ... and this share joins the dev split (never trained on, never gated on): what the select
    # step and WiSE-FT's alpha are chosen on, so the dev set follows the traffic like the held-out set
    dev_fraction: float = Field(0.0, ge=0.0, le=1.0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _shares_fit(self):
        if self.heldout_fraction + self.dev_fraction > 1.0:
            raise ValueError(f"feedback.heldout_fraction ({self.heldout_fraction}) + feedback.dev_fraction "
                             f"({self.dev_fraction}) is more than 1")
        return self


class MonitorSettings(Section):
    """`tuneloop watch`: the signals that start a cycle by themselves."""

    interval_seconds: float = Field(300.0, gt=0)  # how often the signals are checked
    cooldown_seconds: float = Field(3600.0, ge=0)  # at least this long between two triggered cycles
    satisfaction_window: int = Field(50, ge=1, le=1_000_000)  # latest human votes on the champion's answers
    min_votes: int = Field(20, ge=1)  # no satisfaction verdict on fewer votes
    satisfaction_floor: float = Field(0.6, ge=0.0, le=1.0)  # fire when the positive share falls below
    change_detector: Literal["page_hinkley", "adwin", "none"] = "page_hinkley"  # on the vote stream
    page_hinkley_threshold: float = Field(8.0, gt=0)
    page_hinkley_delta: float = Field(0.05, ge=0, le=1.0)  # on a stream of 0/1 votes
    drift_window: int = Field(100, ge=2, le=100_000)  # latest questions compared with the known ones
    min_queries: int = Field(30, ge=2)  # no drift verdict on fewer new questions
    drift_alpha: float = Field(0.01, gt=0.0, lt=1.0)  # fire when the MMD permutation p-value is below
    drift_permutations: int = Field(500, ge=50, le=100_000)
    documents: bool = True  # fire when a watched document is new or changed
    # live_judge: the judge grades (ScoreAnswer, 1-5) up to this many of the champion's new live
    # answers per check. Off (0) by default: the default judge is a 135M model whose grades are
    # close to noise; turn it on with a capable judge (an endpoint or a larger local model).
    judge_sample: int = Field(0, ge=0, le=10_000)
    judge_floor: float = Field(3.0, ge=1.0, le=5.0)  # fire when the mean grade falls below
    # canary: every this many seconds (0: off) the champion answers the first `canary_questions`
    # held-out questions again; fire when its primary metric falls more than `canary_tolerance`
    # below its stored held-out run on the same questions (an index or serving regression)
    canary_every_seconds: float = Field(0.0, ge=0)
    canary_questions: int = Field(20, ge=1, le=100_000)
    canary_tolerance: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> MonitorSettings:
        # a minimum above its window could never be reached: the signal would never give a verdict
        for least, window in (("min_votes", "satisfaction_window"), ("min_queries", "drift_window")):
            if getattr(self, least) > getattr(self, window):
                raise ValueError(f"{least} ({getattr(self, least)}) is more than {window} "
                                 f"({getattr(self, window)}): no verdict could ever be given")
        return self


class PromptsSettings(Section):
    """Cycle step `prompts`: compile the student's RAG prompt with a DSPy optimiser (stages/prompts.py)."""

    optimizer: Literal["none", "bootstrap", "mipro"] = "none"  # BootstrapFewShot | MIPROv2 auto=light (optuna)
    max_bootstrapped_demos: int = Field(4, ge=0, le=16)  # the model's own correct answers kept as demos
    max_labeled_demos: int = Field(4, ge=0, le=16)  # seed Q/A pairs shown as they are
    allow_local: bool = False  # a local student too (only one that follows DSPy's [[ ## field ## ]] format)


class Settings(Section):
    """All settings of one project. Paths are relative to the project folder."""

    project: str = "tuneloop-project"
    data_license: str = ""  # the licence of the documents and seeds (stated in an exported model's card)
    documents: list[str] = []  # files or folders re-ingested at the start of every cycle
    store_url: str | None = None  # default: sqlite:///<project>/tuneloop.db; postgresql://... (tuneloop[postgres])
    artifacts_dir: str = "artifacts"
    cache_dir: str | None = None  # converted default models; default ~/.cache/tuneloop or $TUNELOOP_CACHE
    models: ModelsSettings = ModelsSettings()
    ingest: IngestSettings = IngestSettings()
    answer: AnswerSettings = AnswerSettings()
    retriever: RetrieverSettings = RetrieverSettings()
    synth: SynthSettings = SynthSettings()
    lora: LoraSettings = LoraSettings()
    sft: SFTSettings = SFTSettings()
    eval: EvalSettings = EvalSettings()
    align: AlignSettings = AlignSettings()
    continual: ContinualSettings = ContinualSettings()
    serve: ServeSettings = ServeSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    monitor: MonitorSettings = MonitorSettings()
    prompts: PromptsSettings = PromptsSettings()
    compute: ComputeSettings = ComputeSettings()
    tracking: TrackingSettings = TrackingSettings()
    review: ReviewSettings = ReviewSettings()

    @field_validator("store_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            make_url(v).get_dialect()  # parses, and names a database SQLAlchemy knows
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise ValueError(f"not a database URL SQLAlchemy can use ({exc}); e.g. sqlite:///tuneloop.db "
                             "or postgresql://user@host/dbname") from None
        return v


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another database or an in-memory one)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:") or u.database.startswith("file:"):
        return None
    return Path(u.database)


class Project:
    """A project folder and its validated settings: the explicit context passed to every stage."""

    def __init__(self, root: Path, settings: Settings):
        self.root = root.resolve()
        self.settings = settings

    @property
    def store_url(self) -> str:
        url = self.settings.store_url
        if url is None:
            return f"sqlite:///{self.root / 'tuneloop.db'}"
        db = sqlite_file(url)
        if db is not None and not db.is_absolute():  # like every path here: relative to the project
            return make_url(url).set(database=str(self.path(db))).render_as_string(hide_password=False)
        parsed = make_url(url)
        if parsed.drivername == "postgresql":  # SQLAlchemy defaults to psycopg2; tuneloop[postgres] ships psycopg 3
            return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return url

    @property
    def artifacts(self) -> Path:
        return self.path(self.settings.artifacts_dir)

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def cache(self) -> Path:
        if self.settings.cache_dir:
            return self.path(self.settings.cache_dir)
        env = os.environ.get("TUNELOOP_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "tuneloop"

    def path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.root / p


def _format_validation_error(path: Path | str, err: ValidationError) -> str:
    lines = [f"invalid settings in {path}:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


# Keys that moved to another section: an old settings file gets one line naming the new key
# instead of a bare "unknown key".
MOVED_KEYS = {
    ("sft", "lora_r"): "lora.r", ("sft", "lora_alpha"): "lora.alpha", ("sft", "lora_dropout"): "lora.dropout",
    ("sft", "target_modules"): "lora.target_modules", ("continual", "wise_max_rank"): "lora.max_rank",
    ("synth", "adapter"): "models.teacher.adapter / models.judge.adapter / models.student.adapter",
}


def _check_moved_keys(data: dict, source: Path) -> None:
    moved = [f"{section}.{key} is now {new}" for (section, key), new in MOVED_KEYS.items()
             if isinstance(data.get(section), dict) and key in data[section]]
    if moved:
        raise ConfigError(f"{source}: moved settings: {'; '.join(moved)}")


def parse_settings(data: object, source: Path | str) -> Settings:
    """Validate a parsed YAML document into Settings, raising ConfigError that names bad keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    _check_moved_keys(data, source)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_project(root: Path) -> Project:
    """Read and validate `<root>/tuneloop.yaml`."""
    path = root / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"no {SETTINGS_FILE} in {root.resolve()} (run `tuneloop init {root}` first)")
    text = read_text(path, error=ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid YAML: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    project = Project(root, parse_settings(data, path))
    _prepare_sqlite_folder(project, path)
    return project


def _prepare_sqlite_folder(project: Project, source: Path) -> None:
    """A SQLite database's folder must exist; inside the project it is created, outside it is an error
    (a mistyped path should not scatter folders over the disk)."""
    db = sqlite_file(project.store_url)
    if db is None:
        return
    folder = db.parent
    try:
        if db.is_dir():
            raise ConfigError(f"{source}: store_url: {db} is a folder, not a database file")
        if folder.is_dir():
            return
        if folder.exists():
            raise ConfigError(f"{source}: store_url: {folder} is not a folder")
        if not folder.resolve().is_relative_to(project.root):
            raise ConfigError(f"{source}: store_url: the folder {folder} does not exist (create it, or keep the "
                              f"database inside the project folder {project.root}, where it is created)")
        folder.mkdir(parents=True)
    except OSError as exc:  # e.g. a name too long, no permission
        raise ConfigError(f"{source}: store_url: cannot use {db}: {exc.strerror or exc}") from None
