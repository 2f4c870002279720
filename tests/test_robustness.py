"""scripts/robustness.py's pieces: the class-balanced evaluation slice, and switching a trained model's
refinement steps at test time (the "one model evaluated with T" half of chapter 10)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vhmn
from _slice import load_script


@pytest.fixture(scope="module")
def rb():
    return load_script("scripts/robustness.py", "robustness_under_test")


def test_eval_slice_is_the_first_images_of_every_class_in_test_order(rb):
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    idx = rb.eval_slice(500, labels)
    assert np.bincount(labels[idx], minlength=10).tolist() == [50] * 10
    assert (np.diff(idx) > 0).all()  # sorted, no repeats
    for c in range(10):
        assert set(idx[labels[idx] == c]) == set(np.flatnonzero(labels == c)[:50])


@pytest.mark.parametrize("mixer_output", ["state", "prediction"])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_with_steps_equals_a_model_built_with_those_steps(rb, steps, mixer_output):
    torch.manual_seed(0)
    trained = vhmn.create_model("vhmn_test", refine_steps=2, mixer_output=mixer_output).eval()
    built = vhmn.create_model("vhmn_test", refine_steps=steps, mixer_output=mixer_output).eval()
    built.load_state_dict(trained.state_dict())  # the weights do not depend on refine_steps
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = trained(x)
        rb.with_steps(trained, steps)
        assert trained.cfg.refine_steps == steps
        torch.testing.assert_close(trained(x), built(x))
        assert not torch.allclose(before, built(x))  # the steps change the output, so the check above has teeth


def test_predict_arrays_normalises_like_the_loader_and_predicts_in_eval_mode():
    """vhmn.evaluate.predict_arrays (the robustness script's and chapters 10-11's prediction): uint8 (n, H, W, 3)
    → normalised by the dataset's mean and std, as the training loader does; the model's argmax in eval mode,
    whatever the batch size; the mode is restored; anything but uint8 images is refused with a hint."""
    from vhmn.data import DATASETS
    from vhmn.evaluate import normalize_images, predict_arrays
    from vhmn.loader import DeviceLoader

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    info = DATASETS["cifar10"]
    x_loader = next(iter(DeviceLoader(images, np.zeros(10, dtype=np.int64), 10, train=False, mean=info.mean, std=info.std)))[0]
    torch.testing.assert_close(normalize_images(images), x_loader)
    torch.manual_seed(0)
    model = vhmn.create_model("vhmn_test", drop_path=0.5).train()
    with torch.no_grad():
        expected = model.eval()(normalize_images(images)).argmax(-1).numpy()
    model.train()
    for batch in (3, 10, 250):
        assert (predict_arrays(model, images, batch_size=batch) == expected).all()
    assert model.training
    assert predict_arrays(model, images[:0]).shape == (0,)
    for bad in (images.astype(np.float32), images[0], images.transpose(0, 3, 1, 2), torch.from_numpy(images)):
        with pytest.raises(ValueError, match="uint8 numpy array of images"):
            normalize_images(bad)


@pytest.mark.parametrize("protocol", ["16", "long"])
def test_each_protocols_models_differ_only_in_their_refinement_steps(rb, protocol):
    """--protocol 16 / long: the four committed runs trained with T = 0..3 have the same model config but for
    refine_steps, and the reference checkpoint (evaluated with every T) is the one trained with T = 2."""
    import json

    p = rb.PROTOCOLS[protocol]
    cfgs = {t: json.loads((rb.ROOT / "results" / p["group"] / run / "results.json").read_text())["model"]["config"]
            for t, run in p["trained"].items()}
    assert {t: c["refine_steps"] for t, c in cfgs.items()} == {0: 0, 1: 1, 2: 2, 3: 3}
    strip = lambda c: {k: v for k, v in c.items() if k != "refine_steps"}  # noqa: E731
    assert all(strip(c) == strip(cfgs[2]) for c in cfgs.values())
    assert p["trained"][2] == p["reference"]
    assert (rb.ROOT / "results" / p["group"] / p["reference"] / "model-fp16.safetensors").is_file()


def test_missing_weights_name_the_command_that_trains_them(rb):
    with pytest.raises(FileNotFoundError, match=r"scripts/cpu_experiments.py --protocol long first"):
        rb.weights("no_such_run", "cpu10long")
    with pytest.raises(FileNotFoundError, match=r"scripts/cpu_experiments.py first"):
        rb.weights("no_such_run", "cpu10")
