"""The digits testbed's evaluator: deterministic, accurate, and usable through torch-fidelity."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tokencache  # noqa: F401  (torchvision/torch-fidelity importable on CPU torch)
from conftest_metrics_helpers import digits_evaluator_path, torch_threads
from tokencache.data.digits import digits_to_uint8, load_digits_dataset
from tokencache.data.npz import save_samples_npz
from tokencache.metrics import evaluate_quality
from tokencache.metrics.digits_evaluator import (
    TORCH_FIDELITY_NAME,
    DigitsFeatureExtractor,
    class_consistency,
    load_digits_evaluator,
    train_digits_evaluator,
)



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_held_out_accuracy_above_97_percent():
    saved = load_digits_evaluator(digits_evaluator_path(0))
    retrained = train_digits_evaluator(seed=0)
    assert saved.state_dict().keys() == retrained.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, retrained.state_dict()[name]), name
    test = load_digits_dataset("test")
    with torch.no_grad():
        accuracy = float((saved(test.images).argmax(1) == test.labels).double().mean())
    assert accuracy == saved.meta["test_accuracy"] >= 0.97
    assert saved.meta["seed"] == 0 and saved.meta["test_size"] == len(test)


def test_training_leaves_global_rng_and_threads_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train_digits_evaluator(seed=0, epochs=1)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_checkpoint_is_written_atomically_and_rejects_foreign_files(tmp_path):
    train_digits_evaluator(tmp_path / "e.pt", seed=1, epochs=1)
    assert os.listdir(tmp_path) == ["e.pt"]
    assert load_digits_evaluator(tmp_path / "e.pt").meta["epochs"] == 1
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="train_digits_evaluator"):
        load_digits_evaluator(tmp_path / "other.pt")


def test_class_consistency_hand_example():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert class_consistency(probs, np.array([0, 1, 1, 1])) == 0.75


def test_extractor_rejects_images_that_are_not_8x8():
    extractor = DigitsFeatureExtractor(TORCH_FIDELITY_NAME, ["pool"], feature_extractor_weights_path=digits_evaluator_path())
    with pytest.raises(ValueError, match="8, 8"):
        extractor(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_torch_fidelity_with_registered_extractor_agrees_with_evaluate_quality(tmp_path):
    """torch-fidelity's own FID (eigenvalues) and precision/recall through the registered extractor."""
    import torch_fidelity

    train = digits_to_uint8(load_digits_dataset("train").images)
    test = digits_to_uint8(load_digits_dataset("test").images)
    save_samples_npz(tmp_path / "ref.npz", test)

    class Images(torch.utils.data.Dataset):
        def __init__(self, nhwc):
            self.nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()

        def __len__(self):
            return len(self.nchw)

        def __getitem__(self, i):
            return self.nchw[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(train), input2=Images(test), feature_extractor=TORCH_FIDELITY_NAME,
        feature_extractor_weights_path=digits_evaluator_path(), fid=True, prc=True,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    ours = evaluate_quality(train, tmp_path / "ref.npz", features="digits", weights_path=digits_evaluator_path(), device="cpu")
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
