"""Sharded sampling + merge gives the same images, labels and per-sample counts as one run."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY
from tokencache.run import SampleRequest, merge_shards, run_sampling
from tokencache.train import TrainConfig, train_backbone


@pytest.mark.parametrize("method, params", [("full", {}), ("toca", {"fresh_ratio": 0.2})])
def test_shard_count_never_changes_results(tmp_path, method, params):
    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)

    def sample(out, start, count, batch):
        return run_sampling(SampleRequest(checkpoint=str(ckpt), out=str(out), sampler="ddim6", cfg_scale=2.0,
                                          num_samples=count, start_index=start, batch_size=batch, seed=5,
                                          device="cpu", clip_denoised=True, method=method, method_params=params),
                            progress=False)

    sample(tmp_path / "one.npz", 0, 7, 7)
    shards = [(0, 3, 2), (3, 1, 1), (4, 3, 3)]  # (start, count, batch size): uneven on purpose
    paths = [tmp_path / f"s{start}.npz" for start, _, _ in shards]
    for path, (start, count, batch) in zip(reversed(paths), reversed(shards)):  # any order
        sample(path, start, count, batch)
    merged = merge_shards([str(p) for p in paths], str(tmp_path / "merged.npz"))
    one, many = np.load(tmp_path / "one.npz"), np.load(tmp_path / "merged.npz")
    np.testing.assert_array_equal(one["arr_0"], many["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], many["arr_1"])
    single = json.loads((tmp_path / "one.json").read_text())["cache"]["counts_per_sample"]
    np.testing.assert_allclose(merged["cache"]["counts_per_sample"], single)
    assert merged["num_samples"] == 7 and merged["shards"] == 3
    with pytest.raises(ValueError, match="gap or overlap"):
        merge_shards([str(paths[0]), str(paths[2])], str(tmp_path / "gap.npz"))
