"""LocalChatModel batching: length-sorted batches, input order kept, "auto" batch size."""
from __future__ import annotations

import pytest

from tuneloop.models.base import GenerationParams
from tuneloop.models.local import AUTO_CPU, LocalChatModel

WORDS = "the supplier shall deliver goods under this agreement within thirty days of the order".split()


def conv(n_words: int, tag: str) -> list[dict]:
    return [{"role": "user", "content": f"{tag} " + " ".join(WORDS[:n_words])}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir) -> LocalChatModel:
    return LocalChatModel(tiny_model_dir, batch_size=1)


@pytest.fixture
def tiny(loaded):
    loaded.batch_size, loaded.device, loaded._auto_size = 1, "cpu", 64  # tests change these
    return loaded


def test_sorted_batches_keep_the_input_order(tiny, monkeypatch):
    conversations = [conv(2, "supplier"), conv(12, "goods"), conv(5, "order"), conv(9, "days"), conv(1, "the")]
    params = GenerationParams(max_new_tokens=4)
    tiny.batch_size = 1  # no padding at all: each reply must equal the one-at-a-time reply
    alone = [tiny.chat([c], params)[0] for c in conversations]

    seen: list[list[str]] = []
    real = tiny._generate
    monkeypatch.setattr(tiny, "_generate", lambda prompts, p, seed: seen.append(prompts) or real(prompts, p, seed))
    assert tiny.chat(conversations, params) == alone
    lengths = [len(tiny.tokenizer(b[0], add_special_tokens=False)["input_ids"]) for b in seen]
    assert lengths == sorted(lengths, reverse=True)  # longest first

    tiny.batch_size = 2
    seen.clear()
    assert len(tiny.chat(conversations, params)) == 5
    assert [len(b) for b in seen] == [2, 2, 1]
    assert "goods" in seen[0][0] and "days" in seen[0][1]  # the two longest share a batch


def test_auto_is_eight_on_cpu(tiny, monkeypatch):
    sizes: list[int] = []
    monkeypatch.setattr(tiny, "_generate", lambda prompts, p, seed: sizes.append(len(prompts)) or ["x"] * len(prompts))
    tiny.batch_size, tiny.device = "auto", "cpu"
    assert tiny.chat([conv(3, str(i)) for i in range(20)], GenerationParams()) == ["x"] * 20
    assert sizes == [AUTO_CPU, AUTO_CPU, 20 - 2 * AUTO_CPU]


def test_auto_on_cuda_halves_on_out_of_memory(tiny, monkeypatch):
    sizes: list[int] = []

    def generate(prompts, params, seed):
        sizes.append(len(prompts))
        if len(prompts) > 16:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [p[-12:] for p in prompts]

    monkeypatch.setattr(tiny, "_generate", generate)
    tiny.batch_size, tiny.device = "auto", "cuda"  # _chat_auto only; nothing is moved to a GPU
    tiny._auto_size = 64
    conversations = [conv(1 + i % 12, f"q{i}") for i in range(40)]
    replies = tiny.chat(conversations, GenerationParams())
    assert replies == [tiny.render(c)[-12:] for c in conversations]  # order restored
    assert sizes == [40, 32, 16, 16, 8]  # 64 (40 left) and 32 ran out of memory, then 16 fits
    sizes.clear()
    tiny.chat(conversations[:20], GenerationParams())
    assert sizes == [16, 4]  # the size that fitted is remembered

    def broken(prompts, params, seed):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(tiny, "_generate", broken)
    with pytest.raises(RuntimeError, match="device-side"):
        tiny.chat(conversations[:2], GenerationParams())  # other errors are not swallowed
