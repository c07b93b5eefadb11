"""The web pages in a real headless browser (Debian's Chromium driven by Playwright).

The real FastAPI app runs under uvicorn in a thread on 127.0.0.1 (port 0) over the tiny test
project (ingested, BM25 only), with a scripted fake ChatModel as `model_factory` so answers are
instant and deterministic. Covers: the ask page (API key kept in localStorage, an API error
shown in #error, an answer with its cited passages, thumbs + rating + comment stored in the
store with those values), the A/B mode (picking B stores B's interaction as the preferred one),
the admin page (wrong token -> error; admin token -> feedback per day, chart, versions,
cycles) and the review page (a client key refused; a reviewer confirms one item by keyboard and
corrects the next, both stored as examples with the reviewer, and the queue moves on).

Needs /usr/bin/chromium (Debian package `chromium`); Playwright's own browser download is never
used. Without it the tests FAIL (they do not skip).
"""
from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.helpers import CONTRACTS, deep_merge, ingest_project, prompt_question, tiny_settings, write_settings
from tuneloop import store as st
from tuneloop.config import Project, load_project
from tuneloop.models.base import GenerationParams, Message

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
CLIENT_NAME, CLIENT_KEY = "tester", "client-key-0123456789"
REVIEWER_NAME, REVIEWER_KEY = "rita", "reviewer-key-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"
TIMEOUT_MS = 10_000

pytestmark = pytest.mark.timeout(120)


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium: apt-get install chromium "
                    "(the browser tests never run `playwright install`)", pytrace=False)


class ScriptedChat:
    """A ChatModel that answers at once: '<version> answers: <question>'."""

    def __init__(self, version: str):
        self.version = version
        self.name = f"scripted-{version}"

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        return [f"{self.version} answers: {prompt_question(conv)}" for conv in conversations]


def scripted_factory(project: Project, version: st.ModelVersion) -> ScriptedChat:
    return ScriptedChat(version.name)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 with an OS-chosen port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        # proto IPPROTO_TCP, so that asyncio sets TCP_NODELAY (else every response waits ~40 ms)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[ServerThread, Project]]:
    """The app over an ingested tiny project with a champion ('base'), a candidate and one cycle."""
    from tuneloop.serve.app import create_app
    from tuneloop.versions import ensure_base_version

    root = tmp_path_factory.mktemp("browser") / "project"
    root.mkdir()
    shutil.copytree(CONTRACTS, root / "documents")
    # the fake models' replies are asserted verbatim: not turned into passage spans (programs/copy.py)
    write_settings(root, deep_merge(tiny_settings(tiny_model_dir), {"answer": {"copy_spans": False}}))
    project = load_project(root)
    ingest_project(project)
    with st.open_store(project.store_url)() as s:
        base = ensure_base_version(project, s)
        base.metrics = {"macro_score": 0.25, "token_f1": 0.38}
        cycle = st.Cycle(status="done", trigger="manual", outcome="kept champion; rejected cand-1: test",
                         finished_at=st.utcnow())
        s.add(cycle)
        s.flush()
        s.add(st.ModelVersion(name="cand-1", parent_id=base.id, base_model=base.base_model, adapter_path=None,
                              method="sft", status="candidate", metrics={"macro_score": 0.5}, cycle_id=cycle.id))
        s.commit()

    serve = project.settings.serve
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(serve.api_keys_env, f"{CLIENT_NAME}:{CLIENT_KEY}")
        mp.setenv(serve.admin_token_env, ADMIN_TOKEN)
        mp.setenv(serve.reviewer_keys_env, f"{REVIEWER_NAME}:{REVIEWER_KEY}")
        app = create_app(project, model_factory=scripted_factory)
        with ServerThread(app) as server:
            yield server, project


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium, or None when it is missing (each test then fails with a clear message)."""
    if not CHROMIUM.exists():
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context and page (None without Chromium: the test's require_chromium() fails it)."""
    if browser is None:
        yield None
        return
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    console_errors: list[str] = []
    pg.on("pageerror", lambda exc: console_errors.append(str(exc)))
    yield pg
    context.close()
    assert not console_errors, f"JavaScript errors on the page: {console_errors}"


def feedback_rows(project: Project, **where) -> list[st.Feedback]:
    with st.open_store(project.store_url)() as s:
        q = select(st.Feedback).order_by(st.Feedback.id)
        for col, value in where.items():
            q = q.where(getattr(st.Feedback, col) == value)
        return list(s.scalars(q))


def first_document(project: Project) -> str:
    with st.open_store(project.store_url)() as s:
        return s.scalars(select(st.Document.name).order_by(st.Document.name)).first()


def test_ask_answer_citations_and_feedback(served, page):
    require_chromium()
    from playwright.sync_api import expect

    server, project = served
    page.goto(server.url + "/")

    # No key yet: the API's 401 error message is shown in #error.
    page.fill("#question", "What law governs the agreement?")
    page.click("#ask")
    expected = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x"}]}).json()["error"]["message"]
    expect(page.locator("#error")).to_contain_text(expected)

    # Save the key: kept in localStorage, and still there after a reload.
    page.fill("#api-key", CLIENT_KEY)
    page.click("#save-key")
    assert page.evaluate("Object.values(localStorage)").count(CLIENT_KEY) == 1
    page.reload()
    expect(page.locator("#api-key")).to_have_value(CLIENT_KEY)

    document = first_document(project)
    page.fill("#question", "What law governs the agreement?")
    page.fill("#document", document)
    page.click("#ask")
    expect(page.locator("#answer")).to_have_text("base answers: What law governs the agreement?")
    expect(page.locator("#error")).to_be_empty()
    citations = page.locator("#citations li")
    expect(citations.first).to_be_visible()
    texts = citations.all_inner_texts()
    assert texts and all(re.match(rf"^\[{i + 1}\] {re.escape(document)}: \S", t) for i, t in enumerate(texts)), texts
    expect(page.locator("#answer-a")).to_be_hidden()
    m = re.search(r"Interaction ([A-Za-z0-9_-]{16,})", page.inner_text("#interaction-id"))
    assert m, page.inner_text("#interaction-id")

    with st.open_store(project.store_url)() as s:
        inter = s.scalar(select(st.Interaction).where(st.Interaction.public_id == m.group(1)))
        interaction_id = inter.id
        assert inter.answer == "base answers: What law governs the agreement?"
        assert inter.document == document and inter.client == CLIENT_NAME
        assert len(inter.chunk_ids) == len(texts)

    page.click("#thumbs-up")
    expect(page.locator("#feedback-status")).to_contain_text("Stored feedback #")
    expect(page.locator("#thumbs-up")).to_have_attribute("aria-pressed", "true")
    thumbs_id = int(re.search(r"#(\d+)", page.inner_text("#feedback-status")).group(1))

    page.select_option("#rating", "4")
    page.fill("#comment", "Right clause, but cite the section number.")
    page.click("#send-feedback")
    expect(page.locator("#feedback-status")).to_contain_text("rating 4, comment")
    detail_id = int(re.search(r"#(\d+)", page.inner_text("#feedback-status")).group(1))

    # one verdict per key and answer: the rating and comment update the row of the thumbs
    [row] = feedback_rows(project, interaction_id=interaction_id)
    assert row.id == thumbs_id == detail_id
    assert (row.thumbs, row.rating, row.comment, row.corrected_answer) == (
        1, 4, "Right clause, but cite the section number.", None)
    assert row.source == "human" and row.client == CLIENT_NAME and row.preferred_interaction_id is None

    # A corrected answer goes through the same button.
    page.fill("#correction", "England and Wales.")
    page.click("#send-feedback")
    expect(page.locator("#feedback-status")).to_contain_text("corrected answer")
    [latest] = feedback_rows(project, interaction_id=interaction_id)
    assert (latest.corrected_answer, latest.rating, latest.thumbs) == ("England and Wales.", 4, 1)


def test_ab_pick_b_stores_b_as_preferred(served, page):
    require_chromium()
    from playwright.sync_api import expect

    server, project = served
    page.goto(server.url + "/")
    page.fill("#api-key", CLIENT_KEY)
    page.click("#save-key")
    page.fill("#question", "When may either party terminate?")
    page.check("#ab-toggle")
    page.click("#ask")
    expect(page.locator("#answer-a")).to_be_visible()
    expect(page.locator("#answer-b")).to_be_visible()
    expect(page.locator("#answer")).to_be_hidden()
    expect(page.locator("#pick-a")).to_be_visible()
    answer_a, answer_b = page.inner_text("#answer-a"), page.inner_text("#answer-b")
    assert {answer_a, answer_b} == {"base answers: When may either party terminate?",
                                    "cand-1 answers: When may either party terminate?"}
    expect(page.locator("#citations li").first).to_be_visible()

    before = {f.id for f in feedback_rows(project)}
    page.click("#pick-b")
    expect(page.locator("#feedback-status")).to_contain_text("Stored feedback #")
    feedback_id = int(re.search(r"#(\d+)", page.inner_text("#feedback-status")).group(1))
    assert feedback_id not in before

    with st.open_store(project.store_url)() as s:
        fb = s.get(st.Feedback, feedback_id)
        preferred = s.get(st.Interaction, fb.preferred_interaction_id)
        assert preferred is not None and preferred.answer == answer_b
        pair = list(s.scalars(select(st.Interaction).where(st.Interaction.ab_pair == preferred.ab_pair)))
        assert preferred.ab_pair and len(pair) == 2
        assert {i.arm for i in pair} == {"champion", "challenger"}
        assert {i.answer for i in pair} == {answer_a, answer_b}
        assert fb.thumbs is None and fb.rating is None and fb.source == "human" and fb.client == CLIENT_NAME


def test_admin_page(served, page):
    require_chromium()
    from playwright.sync_api import expect

    server, project = served
    with st.open_store(project.store_url)() as s:  # at least one day of feedback, whatever ran before
        inter = st.Interaction(question="q", answer="a", chunk_ids=[], client="seed")
        s.add(inter)
        s.flush()
        s.add_all([st.Feedback(interaction_id=inter.id, thumbs=1), st.Feedback(interaction_id=inter.id, thumbs=-1),
                   st.Feedback(interaction_id=inter.id, rating=5)])
        s.commit()
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    page.goto(server.url + "/admin")
    page.fill("#admin-token", "not-the-token")
    page.click("#load")
    expect(page.locator("#error")).not_to_be_empty()
    expect(page.locator("#versions-table")).to_be_hidden()

    page.fill("#admin-token", CLIENT_KEY)  # a client key is not enough
    page.click("#load")
    expect(page.locator("#error")).not_to_be_empty()
    expect(page.locator("#versions-table")).to_be_hidden()

    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#load")
    expect(page.locator("#versions-table")).to_be_visible()
    expect(page.locator("#error")).to_be_empty()

    versions = {r.split("\t")[0]: r.split("\t") for r in page.locator("#versions-table tbody tr").all_inner_texts()}
    assert set(versions) >= {"base", "cand-1"}, versions
    assert versions["base"][1:5] == ["\u2014", "base", "champion", "0.250"], versions["base"]
    assert versions["cand-1"][2:5] == ["sft", "candidate", "0.500"], versions["cand-1"]

    day_rows = [r.split("\t") for r in page.locator("#feedback-table tbody tr").all_inner_texts()]
    today_row = next((r for r in day_rows if r[0] == today), None)
    assert today_row is not None, day_rows
    assert int(today_row[1]) >= 1 and int(today_row[2]) >= 1 and int(today_row[3]) >= 1, today_row
    expect(page.locator("#feedback-chart rect.bar-up").first).to_be_attached()

    cycles = page.locator("#cycles-table tbody tr").all_inner_texts()
    assert any("kept champion; rejected cand-1" in c for c in cycles), cycles

    # The token is kept: a fresh visit loads the summary by itself.
    assert page.evaluate("Object.values(localStorage)").count(ADMIN_TOKEN) == 1
    page.reload()
    expect(page.locator("#versions-table")).to_be_visible()


def test_review_page_confirm_one_correct_one_and_the_queue_moves_on(served, page):
    require_chromium()
    from playwright.sync_api import expect

    from tuneloop.review.queue import item_key, save_queue

    server, project = served
    document = first_document(project)
    questions = ["Does the agreement renew automatically?", "What is the notice period for termination?",
                 "Who signs for the Provider?"]
    with st.open_store(project.store_url)() as s:
        chunks = list(s.scalars(select(st.Chunk.id).order_by(st.Chunk.id).limit(2)))
        save_queue(s, [st.ReviewItem(question=q, document=document, answer=f"model answer {i}", chunk_ids=chunks,
                                     source="transfer", question_type="extraction", item_key=item_key(q, document),
                                     score=0.9 - i / 10, scores={"doubts": {"disagreement": 0.9 - i / 10}})
                       for i, q in enumerate(questions)], per_cycle=3, cycle_id=None)
        s.commit()

    page.goto(server.url + "/review")
    page.fill("#review-token", CLIENT_KEY)  # a client key may not review
    page.click("#load")
    expect(page.locator("#error")).to_contain_text("reviewer key or the admin token")
    expect(page.locator("#item")).to_be_hidden()

    page.fill("#review-token", REVIEWER_KEY)
    page.click("#load")
    expect(page.locator("#question")).to_have_text(questions[0])
    expect(page.locator("#answer")).to_have_text("model answer 0")
    expect(page.locator("#passages li")).to_have_count(2)
    expect(page.locator("#progress")).to_contain_text("3 open items")
    expect(page.locator("#error")).to_be_empty()

    page.locator("#confirm").focus()
    page.keyboard.press("y")  # keyboard: y confirms
    expect(page.locator("#question")).to_have_text(questions[1])  # the queue moves on
    expect(page.locator("#status")).to_contain_text("Stored: confirmed as example #")
    expect(page.locator("#progress")).to_contain_text("2 open items")

    page.keyboard.press("c")  # c focuses the correction box
    page.keyboard.type("ninety (90) days")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#question")).to_have_text(questions[2])
    expect(page.locator("#status")).to_contain_text("Stored: corrected as example #")

    with st.open_store(project.store_url)() as s:
        examples = {e.question: e for e in s.scalars(select(st.Example).where(st.Example.kind == "review"))}
        items = {it.question: it for it in s.scalars(select(st.ReviewItem))}
    assert set(examples) == set(questions[:2])
    assert examples[questions[0]].answer == "model answer 0"
    assert examples[questions[1]].answer == "ninety (90) days"
    assert all(e.meta["reviewer"] == REVIEWER_NAME and e.meta["reviewed_at"] for e in examples.values())
    assert (items[questions[0]].status, items[questions[1]].status, items[questions[2]].status) == (
        "confirmed", "corrected", "open")

    page.reload()  # the key is kept; the queue goes on where it was
    expect(page.locator("#question")).to_have_text(questions[2])
    page.click("#skip")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#item")).to_be_hidden()
