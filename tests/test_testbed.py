"""The digits testbed: data split, training determinism, checkpoint format."""
import numpy as np
import pytest
import torch

from tokencache.data.digits import digits_to_uint8, load_digits_dataset
from tokencache.run import build_model
from tokencache.train import TrainConfig, ema_decay_at, lr_at, train_backbone

from conftest import TINY


def test_digits_split_is_fixed_and_stratified():
    train, test, full = load_digits_dataset("train"), load_digits_dataset("test"), load_digits_dataset("all")
    assert len(full) == 1797 and len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    assert train.images.min() == -1 and train.images.max() == 1
    again = load_digits_dataset("train")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    share = np.bincount(test.labels.numpy(), minlength=10) / np.bincount(full.labels.numpy(), minlength=10)
    assert np.all(np.abs(share - 0.25) < 0.02)  # stratified 25% test split


def test_digits_uint8_layout():
    u8 = digits_to_uint8(torch.tensor([[[[-1.0, 0.0], [1.0, 0.5]]]]))
    assert u8.shape == (1, 2, 2, 3) and u8.dtype == np.uint8
    assert u8[0, :, :, 0].tolist() == [[0, 128], [255, 191]] and (u8[..., 0] == u8[..., 2]).all()


def test_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_fraction=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(99, cfg) - 0.1) < 1e-3
    assert ema_decay_at(0, cfg) == 0.1 and ema_decay_at(10**6, cfg) == cfg.ema_max_decay


def test_training_is_deterministic_and_loadable(tmp_path):
    for family in ("DiT", "MDTv2"):
        over = dict(TINY, **({"decode_layer": 2, "mask_ratio": 0.3} if family == "MDTv2" else {}))
        runs = []
        for k in range(2):
            cfg = TrainConfig(model=family, overrides=over, steps=3, batch_size=8, seed=5)
            train_backbone(cfg, tmp_path / f"{family}{k}.pt", progress=False)
            runs.append(torch.load(tmp_path / f"{family}{k}.pt", weights_only=False))
        assert set(runs[0]) == {"model", "ema", "opt", "args"}
        for key in runs[0]["ema"]:
            assert torch.equal(runs[0]["ema"][key], runs[1]["ema"][key]), key
        model = build_model(str(tmp_path / f"{family}0.pt"))
        assert model.config["family"] == family and not model.training
        torch.testing.assert_close(model.state_dict()["final_layer.linear.weight"],
                                   runs[0]["ema"]["final_layer.linear.weight"])


def test_training_lowers_the_loss(tmp_path):
    cfg = TrainConfig(model="DiT", overrides=TINY, steps=60, batch_size=32, seed=0, warmup_steps=5)
    with open(tmp_path / "log.jsonl", "w") as log:
        summary = train_backbone(cfg, tmp_path / "m.pt", progress=False, log=log)
    first = [float(line.split('"loss": ')[1].split(",")[0]) for line in open(tmp_path / "log.jsonl")][0]
    assert summary["final_loss"] < 0.8 * first


@pytest.mark.slow
def test_keep_freed_memory_removes_the_page_faults_of_a_forward():
    """The CLI's glibc setting: after one warm-up forward, later forwards touch (almost) no new pages."""
    import json
    import os
    import subprocess
    import sys

    if not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("glibc only")
    env = dict(os.environ, TOKENCACHE_SYSTEM_MALLOC="")
    out = subprocess.run([sys.executable, "-m", "tokencache._allocator", "keep"], env=env, capture_output=True,
                         text=True, check=True).stdout
    row = json.loads(out)
    assert row["keep_freed_memory"] is True
    # system malloc: a fault per 4 KiB page of every activation, 102,144 per forward here; kept memory: 0–320
    assert row["faults_per_forward"] < 2_000
