"""The training tests' fixtures: the tiny Llama with its data, built once per session, and one intra-op thread."""

import pytest

from helpers import build_tiny_model, general_sentences, task_records, write_jsonl


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model dir, data dir with train/val/general/retention JSONL)."""
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(root)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", task_records(160, seed=1))
    write_jsonl(data / "val.jsonl", task_records(20, seed=2))  # enough for early stopping (20)
    write_jsonl(data / "general.jsonl", [{"text": t} for t in general_sentences(60, seed=3)])
    write_jsonl(data / "retention.jsonl", [{"text": t} for t in general_sentences(10, seed=4)])
    return model, data


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
