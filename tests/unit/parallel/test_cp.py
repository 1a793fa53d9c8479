"""parallel/cp.py and its batch split in objective/ on one process: the load-balanced chunk
layout, the split of ids / labels / positions / documents, and ring attention with a ring of
one (the same block math and backward as on N ranks, no communication) against SDPA. The N-rank
ring is tested in tests/distributed/test_cp.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.peft_utils import tiny_model
from tunesmith.models.attention import AttnSpec, document_positions
from tunesmith.objective.forward import context_parallel_batch
from tunesmith.parallel.cp import ContextParallel, ring_attention


def test_each_rank_holds_an_early_and_a_late_chunk():
    t = 16  # 2N = 8 chunks of 2 for N = 4
    got = [ContextParallel(None, r, 4).local_index(t).tolist() for r in range(4)]
    assert got == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert sorted(sum(got, [])) == list(range(t))
    # Causal work per rank (keys visible to its queries) is the same for every rank.
    work = [sum(i + 1 for i in idx) for idx in got]
    assert len(set(work)) == 1


def test_batch_split_keeps_positions_documents_and_pads():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])  # 10 tokens, 3 packed documents
    batch = {"input_ids": torch.arange(10)[None] + 100, "labels": torch.arange(10)[None] + 200,
             "doc_ids": doc}
    parts = [context_parallel_batch(ContextParallel(None, r, 2), batch) for r in range(2)]
    # T padded to 12 (a multiple of 2N = 4): chunks of 3; rank 0 has 0-2 and 9-11, rank 1 3-8.
    assert parts[0]["cp_index"].tolist() == [[0, 1, 2, 9, 10, 11]]
    assert parts[1]["cp_index"].tolist() == [[3, 4, 5, 6, 7, 8]]
    assert parts[0]["input_ids"].tolist() == [[100, 101, 102, 109, 0, 0]]
    assert parts[0]["labels"].tolist() == [[200, 201, 202, 209, -100, -100]]
    assert parts[0]["cp_doc"].tolist() == [[0, 0, 0, 2, -1, -1]]  # padding: a document of its own
    pos = document_positions(doc)[0].tolist()  # restart per document, on the whole row
    assert parts[1]["position_ids"].tolist() == [pos[3:9]]
    assert parts[0]["position_ids"].tolist()[0][:4] == [pos[0], pos[1], pos[2], pos[9]]


def test_padding_mask_becomes_a_document():
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "labels": torch.ones(1, 8, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])}
    part = context_parallel_batch(ContextParallel(None, 0, 1), batch)
    assert part["cp_doc"].tolist() == [[0, 0, 0, 0, 0, -1, -1, -1]]
    assert part["position_ids"].tolist() == [list(range(8))]


def test_ring_of_one_equals_sdpa_with_documents_and_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    doc = torch.tensor([[0] * 4 + [1] * 8, [0] * 9 + [-1] * 3])
    cp = ContextParallel(None, 0, 1)
    out = ring_attention(q, k, v, index=torch.arange(12).expand(2, -1), doc=doc, cp=cp)
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()[None] & (doc[:, :, None] == doc[:, None, :])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * dout).sum(), (q, k, v))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_custom_attention_replaces_the_backend_in_the_model():
    """The one hook context parallelism uses: `AttnSpec.custom` gives the layers' attention."""
    model, _, cfg = tiny_model(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = []

    def attend(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn=AttnSpec.custom(attend)), model(ids))
    assert len(calls) == len(model.layers)


def test_query_chunks_give_the_same_result(monkeypatch):
    """Long local sequences run the block math in query-row chunks: same values, bounded memory."""
    import tunesmith.parallel.cp as cpmod

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    doc = torch.tensor([[0] * 7 + [1] * 13])
    args = {"index": torch.arange(20)[None], "doc": doc, "cp": ContextParallel(None, 0, 1)}
    whole = ring_attention(q, k, v, **args)
    monkeypatch.setattr(cpmod, "CHUNK_BYTES", 1 * 4 * 20 * 4 * 3)  # [B, H, 3 rows, S] fp32 scores
    assert len(cpmod._row_chunks(q, 20)) == 7
    chunked = ring_attention(q, k, v, **args)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    g1 = torch.autograd.grad(chunked.sum(), (q, k, v))
    monkeypatch.setattr(cpmod, "CHUNK_BYTES", 1 << 28)
    g2 = torch.autograd.grad(ring_attention(q, k, v, **args).sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
