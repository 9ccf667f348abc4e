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


@pytest.mark.slow
def test_a_two_process_torchrun_sample_equals_one_process_byte_for_byte(tmp_path):
    """``torchrun --nproc_per_node 2 -m tokencache sample`` (gloo on the CPU): the same npz, the same counts."""
    import os
    import subprocess
    import sys

    from tokencache.run import rank_ranges

    assert rank_ranges(3, 7, 2) == [(3, 4), (7, 3)] and rank_ranges(0, 1, 3) == [(0, 1), (1, 0), (1, 0)]
    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    args = ["sample", "--checkpoint", str(ckpt), "--sampler", "ddim6", "--cfg-scale", "2", "--clip-denoised",
            "--num-samples", "7", "--batch-size", "3", "--seed", "5", "--method", "toca:fresh_ratio=0.2",
            "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "tokencache", *args, "--out", str(tmp_path / "one.npz")], check=True,
                   env=env, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tokencache", *args, "--out", str(tmp_path / "two.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    np.testing.assert_allclose(two["cache"]["counts_per_sample"], one["cache"]["counts_per_sample"])
    assert two["data_parallel"]["world_size"] == 2 and two["data_parallel"]["backend"] == "gloo"
    assert two["num_samples"] == 7 and two["request"]["num_samples"] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the parts are gone


@pytest.mark.parametrize("method, params", [("full", {}), ("toca", {"fresh_ratio": 0.2})])
def test_thread_count_never_changes_results(tmp_path, method, params):
    """One thread or two: the same bytes (torch's kernels split work by thread count, not rounding)."""
    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run_sampling(SampleRequest(checkpoint=str(ckpt), out=str(tmp_path / f"t{threads}.npz"), sampler="ddim6",
                                       cfg_scale=2.0, num_samples=5, batch_size=5, seed=5, device="cpu",
                                       clip_denoised=True, method=method, method_params=params), progress=False)
    finally:
        torch.set_num_threads(before)
    one, two = np.load(tmp_path / "t1.npz"), np.load(tmp_path / "t2.npz")
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
