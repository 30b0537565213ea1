"""The served model's input handling, without a server: the preprocessing against
torchvision's eval transform in float64, the eval loader's resize rule, and the checks that
turn a bad request into `InvalidInput` (HTTP 400 when served)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from sslstream.orchestration.tracking import encoder_model as em
from sslstream.pipelines.views.eval_loader import eval_resize

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _spec(size: int) -> em.EncoderSpec:
    return em.EncoderSpec(backbone={"name": "resnet_mini"}, feature_dim=128, image_size=size,
                          mean=MEAN, std=STD)


def test_resize_rule_is_the_eval_loaders() -> None:
    assert all(em.eval_resize(s) == eval_resize(s) for s in range(1, 600))
    assert all(em._round_half_even_half(d) == round(d / 2) for d in range(0, 400))


@pytest.mark.parametrize("size, shape", [(32, (32, 32)), (32, (40, 48)), (32, (64, 50)),
                                         (32, (20, 20)), (32, (33, 31)), (96, (120, 200))])
def test_preprocess_is_torchvision_eval_transform(size: int, shape: tuple[int, int]) -> None:
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = F.center_crop(F.resize(x, [eval_resize(size)], antialias=True), [size])
    want = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    for always in (False, True):
        got = em.Preprocess(_spec(size), always_resize=always)(torch.from_numpy(images))
        assert got.shape == (2, 3, size, size)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)  # float32 resize
    # and the scripted module (what `sslstream export --format torchscript` ships)
    scripted = torch.jit.script(em.Preprocess(_spec(size)))
    torch.testing.assert_close(scripted(torch.from_numpy(images)),
                               em.Preprocess(_spec(size))(torch.from_numpy(images)))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_inputs_in_either_form() -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, s, dtype=np.uint8) for s in ((8, 8, 3), (9, 7, 3)))
    batches = em._image_batches({"image_bytes": [_png(a), base64.b64encode(_png(a)).decode(),
                                                  _png(b)]}, 256)
    assert [x.shape for x in batches] == [(2, 8, 8, 3), (1, 9, 7, 3)]  # runs of one size
    assert np.array_equal(batches[0][1], a) and np.array_equal(batches[1][0], b)
    as_int = em._image_batches(np.stack([a, a]).astype(np.int64), 1)  # JSON gives int64
    assert [x.dtype for x in as_int] == [np.uint8, np.uint8] and np.array_equal(as_int[0][0], a)


@pytest.mark.parametrize("value, words", [
    (np.zeros((1, 4, 4, 3)) + 0.5, "got dtype float64"),
    (np.zeros((4, 4, 3), dtype=np.uint8), "(N, H, W, 3)"),
    (np.zeros((1, 0, 4, 3), dtype=np.uint8), "H, W > 0"),
    (np.full((1, 2, 2, 3), -1), "0..255"),
    ([[1, 2, 3]], "got list"),
    ({"image_bytes": [b"GIF89a garbage"]}, "image_bytes[0]: not a decodable image"),
    ({"image_bytes": ["@@"]}, "image_bytes[0]: not base64"),
    ({"image_bytes": [3]}, "expected a base64 string"),
    ({"image_bytes": "abc"}, "expected a list"),
    ({"images": np.zeros((1, 2, 2, 3)), "x": 1}, "expected one input"),
])
def test_bad_input_is_invalid_parameter_value(value: object, words: str) -> None:
    with pytest.raises(em.InvalidInput) as info:
        em._image_batches(value, 4)
    assert words in info.value.message
    assert isinstance(info.value, ValueError) and isinstance(info.value, MlflowException)
    assert info.value.get_http_status_code() == 400


def test_bad_params() -> None:
    with pytest.raises(em.InvalidInput, match="batch_size"):
        em._batch_size(0)
    with pytest.raises(em.InvalidInput, match="device"):
        em._device("tpu")
    assert em._batch_size(None) == 256 and em._device(None) == torch.device("cpu")
