"""Data: packing with document boundaries, chat masks, deterministic sharded order, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from supernet.training.data import (DataError, GlobalOrder, PackedDataset, build_token_stream, tokenize_chat)
from supernet.training.tiny import byte_tokenizer, synthetic_chats, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_packing_masks_only_the_cross_document_prediction(tmp_path, tok):
    docs = ["abc", "hello world", "xy"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    stream = build_token_stream([str(path)], tok, tmp_path / "cache", progress=False)
    eos = tok.eos_token_id
    expected = []
    for d in docs:
        expected += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    assert list(stream.tokens) == expected
    # targets: every token except the first of each document (predicted across a boundary)
    starts = np.cumsum([0] + [len(tok(d)["input_ids"]) + 1 for d in docs[:-1]])
    mask = np.asarray(stream.targets)
    assert mask[starts].sum() == 0
    assert mask.sum() == len(expected) - len(docs)
    # the separator itself is a target: the model learns where documents end
    assert all(mask[i] == 1 for i, t in enumerate(expected) if t == eos)

    ds = PackedDataset(stream, seq_len=4)
    assert len(ds) == (len(expected) - 1) // 4
    b = ds.get([0, 1])
    assert b.input_ids.shape == (2, 4)
    flat = np.asarray(stream.tokens)
    assert b.input_ids[1].tolist() == flat[4:8].tolist()
    assert b.labels[1].tolist() == [t if m else -100 for t, m in zip(flat[5:9], mask[5:9])]
    # windows are consecutive slices: a document longer than a window continues in the next one
    assert b.input_ids[0].tolist() + b.input_ids[1].tolist() == flat[:8].tolist()


def test_token_stream_is_cached(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some text"}] * 3)
    build_token_stream([str(path)], tok, tmp_path / "cache", progress=False)
    import supernet.training.data as data

    monkeypatch.setattr(data, "_write_stream", lambda *a, **k: pytest.fail("re-tokenised a cached corpus"))
    s2 = build_token_stream([str(path)], tok, tmp_path / "cache", progress=False)
    assert s2.meta["num_documents"] == 3


def test_chat_mask_covers_exactly_the_assistant_replies(tok):
    conv = synthetic_chats(1, seed=5)[0]
    ids, mask = tokenize_chat(tok, conv)
    spans, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    assert spans == [r + "<|im_end|>\n" for r in replies]


def test_chat_stream_detected_from_messages(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in synthetic_chats(3)])
    stream = build_token_stream([str(path)], tok, tmp_path / "cache", progress=False)
    assert stream.meta["format"] == "chat"
    text = tok.decode([t for t, m in zip(stream.tokens, stream.targets) if m])
    assert "user" not in text and "answer briefly" not in text and "the " in text


def test_global_order_is_a_function_of_the_step_and_splits_evenly():
    one = GlobalOrder(50, micro_batch_size=2, grad_accum=4, world_size=1, seed=3)
    two = [GlobalOrder(50, micro_batch_size=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    for step in range(30):  # crosses several epochs
        whole = [i for m in range(4) for i in one.micro_indices(step, m)]
        split = [i for m in range(2) for r in (0, 1) for i in two[r].micro_indices(step, m)]
        assert whole == split == one.step_indices(step)
    # each epoch visits every window once
    seen = [one.sample(g) for g in range(50)]
    assert sorted(seen) == list(range(50))
    assert seen != list(range(50))  # shuffled
    fresh = GlobalOrder(50, 2, 4, seed=3)
    assert fresh.micro_indices(17, 2) == one.micro_indices(17, 2)  # resume needs no iterator state


def test_bad_inputs_fail_with_one_line(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        build_token_stream([str(tmp_path / "missing.jsonl")], tok, tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        build_token_stream([str(bad)], tok, tmp_path / "c", progress=False)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "ab"}])
    stream = build_token_stream([str(short)], tok, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="fewer than seq_len"):
        PackedDataset(stream, 64)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="needs a 'text' or a 'messages' field"):
        build_token_stream([str(nofield)], tok, tmp_path / "c", progress=False)
