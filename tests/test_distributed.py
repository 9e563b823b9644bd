"""GPT and BERT under torch.distributed on CPU: DDP and FSDP2 (fully_shard) with gloo, 2 processes.

Each rank trains on its half of a fixed batch; halves carry equal numbers of scored tokens, so the mean of the
ranks' losses and the averaged gradients equal a single process training on the whole batch. The losses of a
few AdamW steps must therefore match the single-process run.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastformer.models import GPT, BertConfig, BertForPreTraining, GPTConfig

WORLD = 2
STEPS = 3
MODES = ("ddp", "fsdp2")


def make_models() -> tuple[GPT, BertForPreTraining]:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("gpt-tiny", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    bert = BertForPreTraining(
        BertConfig.from_name("bert-tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    return gpt, bert


def make_batches() -> tuple[dict, dict]:
    """A GPT batch of 4 full rows and a padded BERT batch of 4 rows with 3 masked tokens each."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 16), generator=g)
    lengths = torch.tensor([16, 7, 12, 5])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    bert_ids = torch.randint(1, 101, (4, 16), generator=g) * mask
    labels = torch.full_like(bert_ids, -100)
    labels[:, 1:4] = bert_ids[:, 1:4]
    gpt_batch = dict(input_ids=ids, labels=ids)
    bert_batch = dict(
        input_ids=bert_ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1, 0])
    )
    return gpt_batch, bert_batch


def train(model: torch.nn.Module, batch: dict, rank: int = 0, world: int = 1) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = batch["input_ids"].shape[0] // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    losses = []
    for _ in range(STEPS):
        loss = model(**local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h if isinstance(model, GPT) else model.bert.h:
        fully_shard(block)
    return fully_shard(model)  # the root holds the embeddings, and with them the tied LM / MLM decoder weight


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        losses = {}
        for mode in MODES:  # one process group for both modes: spawning costs more than the training
            for name, model, batch in zip(("gpt", "bert"), make_models(), make_batches(), strict=True):
                losses[mode, name] = train(wrap(model, mode), batch, rank, WORLD)
        if rank == 0:
            torch.save(losses, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_losses_equal_single_process(tmp_path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    expected = {name: train(m, b) for name, m, b in zip(("gpt", "bert"), make_models(), make_batches(), strict=True)}
    out_file = str(tmp_path / "losses.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    got = torch.load(out_file)
    assert set(got) == {(mode, name) for mode in MODES for name in expected}
    for (mode, name), losses in got.items():
        assert losses[-1] < losses[0], f"{mode} {name} did not train: {losses}"
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected[name]), rtol=1e-5, atol=1e-5)
