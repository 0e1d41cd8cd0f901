"""Encoder shapes and normalisation for all three encoder kinds (no network)."""

import pytest
import torch
from PIL import Image

from bicro_clean.models.encoders import load_encoder, set_offline_env


def _images(encoder, n=3):
    transform = encoder.image_transform()
    return torch.stack([transform(Image.new("RGB", (40 + 9 * i, 30), (60 * i, 20, 200))) for i in range(n)])


@pytest.fixture(scope="module", autouse=True)
def _offline():
    set_offline_env()


@pytest.mark.parametrize(
    "spec, dims, aligned, side",
    [("tiny", (64, 64), True, 64), ("towers", (1280, 384), False, 224), ("open_clip:bicro-tiny", (64, 64), True, 64)],
)
def test_encoder_outputs_are_normalised_float32(spec, dims, aligned, side):
    if spec.startswith("open_clip"):
        load_encoder("tiny", "cpu")  # registers the tiny config that open_clip:bicro-tiny names
    encoder = load_encoder(spec, "cpu")
    image = encoder.encode_images(_images(encoder))
    text = encoder.encode_texts(["a dog runs", "two people on a beach", "x"])
    assert image.shape == (3, dims[0]) and text.shape == (3, dims[1])
    assert image.dtype == torch.float32 and text.dtype == torch.float32
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert encoder.aligned is aligned
    assert encoder.describe()["image_dim"] == dims[0]
    assert encoder.decode_side() == side  # JPEGs may decode reduced, never below this shorter side


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_transform_side_never_lets_a_transform_upsample(mode):
    import open_clip

    from bicro_clean.models.encoders import transform_side

    transform = open_clip.image_transform(256, is_train=False, resize_mode=mode)
    side = transform_side(transform, 224)
    assert side == 256
    for size in [(side, side), (side, 3 * side), (5 * side, side)]:  # the shorter side at `side`: no upsampling
        assert transform(Image.new("RGB", size)).shape == (3, 256, 256)


def test_towers_text_embeddings_are_semantic():
    encoder = load_encoder("towers", "cpu")
    a, b, c = encoder.encode_texts(["a dog runs on the grass", "a puppy running in a field", "a plate of pasta"])
    assert float(a @ b) > float(a @ c) + 0.2


def test_tiny_encoder_is_reproducible():
    first, second = load_encoder("tiny", "cpu"), load_encoder("tiny", "cpu")
    assert first.describe()["weights"] == second.describe()["weights"]
    torch.testing.assert_close(first.encode_texts(["same"]), second.encode_texts(["same"]))


def test_unknown_encoder_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("resnet", "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(f"open_clip:ViT-B-32:{tmp_path}/missing.pt", "cpu")
    with pytest.raises(ValueError, match="sentence-transformers"):
        load_encoder(f"towers:efficientnet-lite0:{tmp_path}/nope", "cpu")


def test_open_clip_local_checkpoint_loads(tmp_path):
    tiny = load_encoder("tiny", "cpu")
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, checkpoint)
    loaded = load_encoder(f"open_clip:bicro-tiny:{checkpoint}", "cpu")
    torch.testing.assert_close(loaded.encode_texts(["same words"]), tiny.encode_texts(["same words"]))


def test_efficientnet_lite_keeps_its_relu6_activations():
    # set_swish() once replaced every ReLU6 with Swish: features became noise (cosine ~0.3 with the true ones)
    # while shapes and norms stayed fine, so only the activation types catch it.
    from bicro_clean.models.encoders import _efficientnet_lite0

    model, _, _ = _efficientnet_lite0()
    names = {type(m).__name__ for m in model.modules()}
    assert not names & {"Swish", "MemoryEfficientSwish"}, names


def test_tiny_config_registration_leaves_no_temp_folder(tmp_path):
    """Each process registers the tiny open_clip config from a temp folder; it must not outlive the call."""
    import os
    import subprocess
    import sys

    code = ("import open_clip; from bicro_clean.models.encoders import _register_tiny_config, TINY_MODEL_NAME; "
            "_register_tiny_config(); assert TINY_MODEL_NAME in open_clip.list_models(); "
            "open_clip.add_model_config('/nonexistent'); assert TINY_MODEL_NAME in open_clip.list_models()")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert list(tmp_path.glob("bicro-tiny-*")) == []  # (torch may leave its own torchinductor_* here)


def test_towers_worker_tokens_give_exactly_the_sentence_transformers_embeddings():
    import pickle

    import torch.nn.functional as F

    encoder = load_encoder("towers", "cpu")
    texts = ["a dog runs", "two people walk on a long sandy beach at sunset", "x", "a dog runs", "", "\u00e9t\u00e9 ok"]
    want = F.normalize(encoder.text_model.encode(texts, batch_size=4, convert_to_tensor=True,
                                                 show_progress_bar=False).float(), dim=-1)
    encoder.text_batch_size = 4  # two model batches, like a chunk larger than the text batch
    assert torch.equal(encoder.encode_texts(texts), want)
    spawned = pickle.loads(pickle.dumps(encoder.text_transform()))  # what a spawn/forkserver worker gets
    assert spawned.model is None and spawned.path == encoder.text_path
    assert torch.equal(encoder.encode_tokens(spawned(texts)), want)


def test_open_clip_worker_tokens_match_encode_texts():
    import pickle

    encoder = load_encoder("tiny", "cpu")
    texts = ["a dog runs", "two people on a beach", "x"]
    tokenize = pickle.loads(pickle.dumps(encoder.text_transform()))
    assert torch.equal(encoder.encode_tokens(tokenize(texts)), encoder.encode_texts(texts))
