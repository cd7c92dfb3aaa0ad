"""data.decode: where the torch backend decodes, from the config to the loader."""

from __future__ import annotations

import pytest

import fastkd.train as train_module
from fastkd.config import resolve_config
from fastkd.errors import FastKDError
from test_train_support import loaders, tiny_config


def test_decode_is_a_torch_backend_key():
    with pytest.raises(FastKDError, match="data.decode host is an option of --backend torch, not ffcv"):
        resolve_config(None, {"data.backend": "ffcv", "data.decode": "host"})
    with pytest.raises(FastKDError, match="data.decode"):
        resolve_config(None, {"data.backend": "torch", "data.decode": "cpu"})
    assert resolve_config(None, {"data.backend": "torch", "data.decode": "host"}).data.decode == "host"


@pytest.mark.parametrize("decode, options", [("auto", {}), ("host", {"decode": "host"})])
def test_trainer_hands_decode_to_the_loader(tmp_path, monkeypatch, decode, options):
    """The trainer builds its train and val loaders with decode=... only when it is set."""
    calls = []
    train, val = loaders()

    def fake_build_loader(data_dir, split, backend, *args, **kwargs):
        calls.append((split, backend, {k: v for k, v in kwargs.items() if k == "decode"}))
        return train if split == "train" else val

    monkeypatch.setattr(train_module, "build_loader", fake_build_loader)
    cfg = tiny_config(tmp_path, **{"data.decode": decode})
    train_module.Trainer(cfg)
    assert calls == [("train", "torch", options), ("val", "torch", options)]
