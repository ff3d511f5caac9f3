"""Tests of experiments/input_pipeline.py and experiments/fashion_mnist_idx.py.

Real Fashion-MNIST (the Debian package's IDX files; a test fails where they are absent) is
prepared once per session into a temporary data_dir and checked against an
independent gzip+numpy parse of the same files. CIFAR-10, ImageNet and TFDS's
own `fashion_mnist` run on `tfds.testing.mock_data` (random examples).
"""

import gzip
import hashlib
import os
import shutil
import struct
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from experiments import steps
from experiments.data import builders
from experiments.data import fashion_mnist_idx
from experiments.data import imagenet
from experiments.data import synthetic_imagenet
from experiments.data import input_pipeline as ip

DEBIAN = fashion_mnist_idx.DEBIAN_DIR
# Tests that read the IDX files themselves take the `fmnist_idx_dir` fixture
# (tests/conftest.py), which fails with the set-up command when they are absent.
needs_files = pytest.mark.usefixtures("fmnist_idx_dir")


def make_config(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def parse_idx(path: str) -> np.ndarray:
  """Independent reference parser: big-endian header, then raw uint8."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def keys(images: np.ndarray, labels: np.ndarray) -> list:
  """One sortable bytes key per (image, label) pair, for multiset comparisons."""
  flat = images.reshape(len(images), -1)
  return sorted(row.tobytes() + bytes([int(l)]) for row, l in zip(flat, labels))


def collect(batches) -> dict:
  batches = list(batches)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------- real files


@pytest.fixture(scope="session")
def fm_dir(fmnist_data_dir):
  """The session's data_dir (tests/conftest.py); `fm` prepares all 70k examples in it."""
  return fmnist_data_dir


@pytest.fixture(scope="session")
def fm(fm_dir):
  config = make_config(name="fashion_mnist", data_dir=fm_dir, manual_dir=DEBIAN,
                       train_split="train[:2048]", test_split="test", augment=True)
  return ip.get_dataset(config)


@pytest.fixture(scope="session")
def idx(fmnist_idx_dir):
  del fmnist_idx_dir  # fails clearly where the files are missing
  return {name: parse_idx(os.path.join(DEBIAN, name)) for name in fashion_mnist_idx.SHA256}


def test_fashion_mnist_prepared_with_full_counts(fm, fm_dir):
  builder = fashion_mnist_idx.FashionMnistIdx(data_dir=fm_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 60000
  assert builder.info.splits["test"].num_examples == 10000
  assert (fm.name, fm.num_classes, fm.image_shape) == ("fashion_mnist", 10, (28, 28, 1))
  assert (fm.train_size, fm.test_size) == (2048, 10000)
  assert fm.augment is True


def test_fashion_mnist_augmentation_is_a_shift_or_mirror(fm):
  aug = next(fm.train_batches(32, epoch=2, seed=5))
  plain = next(fm.train_batches(32, epoch=2, seed=5, augment=False))
  np.testing.assert_array_equal(aug["label"], plain["label"])
  assert not np.array_equal(aug["image"], plain["image"])
  assert aug["image"].dtype == plain["image"].dtype == np.uint8  # as stored
  for image, original in zip(aug["image"], plain["image"]):
    padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
    windows = [padded[y:y + 28, x:x + 28] for y in range(5) for x in range(5)]
    assert any(np.array_equal(w, image) or np.array_equal(w[:, ::-1], image)
               for w in windows)


@pytest.mark.parametrize("name,shape", [("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_augmentation_is_the_seeded_crop_and_flip_of_each_image(name, shape):
  # The batch's one gather against the per-image definition, with the same
  # draws: the crop at (y, x) of the zero-padded image, mirrored where drawn.
  # Any change here changes every augmented run (and breaks resumes).
  images = np.random.default_rng(0).integers(0, 256, (40,) + shape, dtype=np.uint8)
  source = ip._ArraySource(images, np.arange(40, dtype=np.int32), name)
  indices = np.random.default_rng(1).permutation(40)[:24]
  for local in (slice(0, 24), slice(8, 16)):
    got, labels = source.load(indices, np.random.default_rng([3, 4, 5]), local)
    rng = np.random.default_rng([3, 4, 5])
    pad = {"fashion_mnist": 2, "cifar10": 4}[name]
    offsets = rng.integers(0, 2 * pad + 1, size=(24, 2))
    flips = rng.random(24) < 0.5
    for k in range(local.start, local.stop):
      (y, x), image = offsets[k], images[indices[k]]
      want = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[y:y + shape[0], x:x + shape[1]]
      want = want[:, ::-1] if flips[k] else want
      np.testing.assert_array_equal(got[k - local.start], want, err_msg=f"{name} {k}")
    np.testing.assert_array_equal(labels, indices[local])
    assert got.dtype == np.uint8 and got.flags.c_contiguous


def test_fashion_mnist_pixels_and_labels_match_idx(fm, idx):
  test = fm.test_source
  assert test.images.dtype == np.uint8 and test.labels.dtype == np.int32
  # TFDS shuffles records when preparing, so compare as multisets: the whole test
  # split is exactly the IDX test set.
  assert keys(test.images[..., 0], test.labels) == keys(
      idx["t10k-images-idx3-ubyte.gz"], idx["t10k-labels-idx1-ubyte.gz"])
  # Every (image, label) of the train slice is one of the IDX train pairs.
  train_keys = set(keys(idx["train-images-idx3-ubyte.gz"], idx["train-labels-idx1-ubyte.gz"]))
  got = keys(fm.train_source.images[..., 0], fm.train_source.labels)
  assert len(got) == 2048 and set(got) <= train_keys


def test_normalization_constants_match_the_data(fm, idx):
  pixels = idx["train-images-idx3-ubyte.gz"] / 255.0
  mean, std = ip.NORMALIZATION["fashion_mnist"]
  assert abs(pixels.mean() - mean[0]) < 1e-3 and abs(pixels.std() - std[0]) < 1e-3
  images = collect(fm.test_batches(2500))["image"]
  assert images.dtype == np.uint8 and fm.normalization == ip.NORMALIZATION["fashion_mnist"]
  # What the step computes on the device (steps.prepare_images) and the host's
  # float reference (Dataset.normalize) agree, and normalize the data.
  on_device = np.asarray(steps.prepare_images(jnp.asarray(images), fm.normalization))
  np.testing.assert_allclose(on_device, fm.normalize(images), rtol=1e-6, atol=1e-6)
  assert abs(on_device.mean()) < 0.02 and abs(on_device.std() - 1) < 0.02


def test_cached_reload_reads_the_cache_and_is_identical(fm, fm_dir, monkeypatch):
  config = make_config(name="fashion_mnist", data_dir=fm_dir, manual_dir="/nonexistent",
                       train_split="train[:2048]", test_split="test")
  decoded = []
  real = ip.tfds.core.DatasetBuilder.as_data_source

  def counting(self, *args, **kwargs):
    source = real(self, *args, **kwargs)
    getitems = source.__getitems__
    source.__getitems__ = lambda keys: decoded.append(len(keys)) or getitems(keys)
    return source

  monkeypatch.setattr(ip.tfds.core.DatasetBuilder, "as_data_source", counting)
  again = ip.get_dataset(config)  # prepared already: the manual_dir is not needed
  assert decoded == []  # not one record decoded again: both splits came from the cache
  assert any(f.endswith(".npz") for f in os.listdir(
      fashion_mnist_idx.FashionMnistIdx(data_dir=fm_dir).data_dir))
  np.testing.assert_array_equal(again.test_source.images, fm.test_source.images)
  np.testing.assert_array_equal(again.train_source.labels, fm.train_source.labels)


def test_train_batches_are_a_pure_function_of_seed_and_epoch(fm):
  assert fm.steps_per_epoch(128) == 16 and fm.steps_per_epoch(1000) == 2
  a = list(fm.train_batches(128, epoch=3, seed=7))
  b = list(fm.train_batches(128, epoch=3, seed=7))
  assert len(a) == 16
  for x, y in zip(a, b):
    assert x["image"].shape == (128, 28, 28, 1) and x["image"].dtype == np.uint8
    assert x["label"].shape == (128,) and x["label"].dtype == np.int32
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other_epoch = collect(fm.train_batches(128, epoch=4, seed=7))
  other_seed = collect(fm.train_batches(128, epoch=3, seed=8))
  first = collect(a)
  assert not np.array_equal(first["label"], other_epoch["label"])
  assert not np.array_equal(first["label"], other_seed["label"])
  # Each epoch is a permutation of the split (2048 = 16 full batches); compared
  # without augmentation, which leaves the order unchanged.
  plain = collect(fm.train_batches(128, epoch=3, seed=7, augment=False))
  plain_other = collect(fm.train_batches(128, epoch=4, seed=7, augment=False))
  np.testing.assert_array_equal(plain["label"], first["label"])
  assert keys(plain["image"], plain["label"]) == keys(plain_other["image"],
                                                      plain_other["label"])
  assert len(list(fm.train_batches(1000, 0, 0))) == 2  # the remainder is dropped


def test_test_batches_cover_every_example_once(fm):
  batches = list(fm.test_batches(3000))
  assert [len(b["mask"]) for b in batches] == [3000] * 4
  assert [int(b["mask"].sum()) for b in batches] == [3000, 3000, 3000, 1000]
  last = batches[-1]
  assert last["mask"].dtype == np.bool_ and last["mask"][:1000].all()
  assert not last["image"][1000:].any() and not last["label"][1000:].any()
  got = collect(batches)
  mask = got["mask"]
  np.testing.assert_array_equal(got["label"][mask], fm.test_source.labels)
  np.testing.assert_array_equal(got["image"][mask], fm.test_source.images)


# ----------------------------------------------------------------- bad or missing data


def write_gz(path, data: bytes):
  with gzip.open(path, "wb") as f:
    f.write(data)


@needs_files
@pytest.mark.parametrize("kind,message", [
    ("magic", "magic number"), ("truncated", "data bytes"), ("padded", "data bytes"),
    ("shape", "IDX shape"), ("not_gzip", "cannot decompress"), ("label", "label 10")])
def test_corrupt_idx_file_is_reported(tmp_path, kind, message):
  good = parse_idx(os.path.join(DEBIAN, "t10k-labels-idx1-ubyte.gz"))
  header, body = struct.pack(">II", 0x0801, 10000), good.tobytes()
  path = str(tmp_path / "t10k-labels-idx1-ubyte.gz")
  shutil.copy(os.path.join(DEBIAN, "t10k-images-idx3-ubyte.gz"), tmp_path)
  if kind == "magic":
    write_gz(path, struct.pack(">II", 0x0803, 10000) + body)
  elif kind == "truncated":
    write_gz(path, header + body[:-5])
  elif kind == "padded":  # trailing bytes after the declared data
    write_gz(path, header + body + bytes(3))
  elif kind == "shape":
    write_gz(path, struct.pack(">II", 0x0801, 9999) + body[:-1])
  elif kind == "not_gzip":
    with open(path, "wb") as f:
      f.write(header + body)
  else:
    write_gz(path, header + bytes([10]) + body[1:])
  with pytest.raises(fashion_mnist_idx.BadIdxFileError, match=message):
    fashion_mnist_idx.read_split(str(tmp_path), "test")


@needs_files
def test_corrupt_file_fails_preparation_clearly(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in fashion_mnist_idx.SHA256:
    shutil.copy(os.path.join(DEBIAN, name), manual / name)
  with open(os.path.join(DEBIAN, "t10k-images-idx3-ubyte.gz"), "rb") as f:
    data = f.read()
  with open(manual / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(data[:len(data) // 2])  # a half-finished download
  config = make_config(name="fashion_mnist", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(manual))
  with pytest.raises(fashion_mnist_idx.BadIdxFileError, match="t10k-images"):
    ip.get_dataset(config)
  assert not fashion_mnist_idx.FashionMnistIdx(data_dir=str(tmp_path / "tfds")).is_prepared()


def _no_network(*args, **kwargs):
  raise urllib.error.URLError("network unreachable (test)")


@pytest.mark.parametrize("tensorflow", [False, True])
def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch, tensorflow):
  monkeypatch.setattr(builders, "tensorflow_available", lambda: tensorflow)
  monkeypatch.setattr(urllib.request, "urlopen", _no_network)
  # With TensorFlow, TFDS's own builder would download: make that fail too.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_network)
  config = make_config(name="fashion_mnist", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(tmp_path))
  with pytest.raises(ip.DatasetNotFoundError) as info:
    ip.get_dataset(config)
  message = str(info.value)
  assert "sudo apt-get install dataset-fashion-mnist" in message
  assert "--config.dataset.manual_dir=DIR" in message
  assert "github.com/zalandoresearch/fashion-mnist" in message
  assert str(tmp_path) in message and "network unreachable" in message
  assert isinstance(info.value, FileNotFoundError)


@needs_files
def test_download_checks_sha256(tmp_path, monkeypatch):
  # The Debian files stand in for the server (file:// URLs); their gzip headers
  # differ from Zalando's, so the real checksums must reject them.
  monkeypatch.setattr(fashion_mnist_idx, "URL", f"file://{DEBIAN}/")
  with pytest.raises(ValueError, match="SHA-256"):
    fashion_mnist_idx.download_idx_files(str(tmp_path / "bad"))
  assert os.listdir(tmp_path / "bad") == []  # nothing half-written left behind
  sums = {}
  for name in fashion_mnist_idx.SHA256:
    with open(os.path.join(DEBIAN, name), "rb") as f:
      sums[name] = hashlib.sha256(f.read()).hexdigest()
  monkeypatch.setattr(fashion_mnist_idx, "SHA256", sums)
  fashion_mnist_idx.download_idx_files(str(tmp_path / "good"))
  assert fashion_mnist_idx.has_idx_files(str(tmp_path / "good"))


def test_missing_imagenet_tars_are_named(tmp_path):
  config = make_config(name="imagenet2012", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(tmp_path))
  with pytest.raises(ip.DatasetNotFoundError) as info:
    ip.get_dataset(config)
  for text in (str(tmp_path), "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    assert text in str(info.value)


@pytest.mark.parametrize("tensorflow", [False, True])
def test_unprepared_cifar10_error(tmp_path, monkeypatch, tensorflow):
  monkeypatch.setattr(builders, "tensorflow_available", lambda: tensorflow)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_network)
  with pytest.raises(ip.DatasetNotFoundError, match="network" if tensorflow else "TensorFlow"):
    ip.get_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))


def test_unknown_dataset():
  with pytest.raises(ValueError, match="mnist"):
    ip.get_dataset(make_config(name="mnist"))


# ----------------------------------------------------------------- mocked TFDS


@pytest.fixture
def mock_tfds(monkeypatch):
  """tfds.testing.mock_data, with TFDS 4.9's broken mock `__getitems__` fixed.

  The mock stores `partial(_getitems, generator=...)` as a plain attribute, so
  the keys land in its `self` argument; this version takes no `self`.
  """
  monkeypatch.setattr(mocking, "_getitems",
                      lambda keys, generator, serialized=False: [generator[k] for k in keys])
  # The mocked download_and_prepare is a no-op; let the official builders reach it.
  monkeypatch.setattr(builders, "tensorflow_available", lambda: True)

  def mock(num_examples):
    return tfds.testing.mock_data(num_examples=num_examples)
  return mock


def test_fashion_mnist_falls_back_to_the_official_builder(tmp_path, monkeypatch, mock_tfds):
  names = []
  real_builder = tfds.builder
  monkeypatch.setattr(tfds, "builder", lambda name, **kw: names.append(name) or
                      real_builder(name, **kw))
  with mock_tfds(40):
    data = ip.get_dataset(make_config(name="fashion_mnist", data_dir=str(tmp_path),
                                      manual_dir=str(tmp_path)))
    assert names == ["fashion_mnist"]
    assert (data.num_classes, data.image_shape, data.train_size) == (10, (28, 28, 1), 40)
    batch = next(data.train_batches(8, 0, 0))
  assert batch["image"].shape == (8, 28, 28, 1)


def _crop_of(padded: np.ndarray, image: np.ndarray) -> bool:
  """Whether `image` is some 32x32 window of `padded`, possibly mirrored."""
  for y in range(9):
    for x in range(9):
      window = padded[y:y + 32, x:x + 32]
      if np.array_equal(window, image) or np.array_equal(window[:, ::-1], image):
        return True
  return False


def test_cifar10_augmentation_and_process_sharding(mock_tfds, monkeypatch):
  with mock_tfds(50):
    data = ip.get_dataset(make_config(name="cifar10", augment=True))
  assert (data.num_classes, data.image_shape, data.train_size, data.test_size) == (
      10, (32, 32, 3), 50, 50)
  aug = list(data.train_batches(16, epoch=1, seed=3))
  plain = list(data.train_batches(16, epoch=1, seed=3, augment=False))
  assert len(aug) == 3
  assert not np.array_equal(aug[0]["image"], plain[0]["image"])
  for a, p in zip(aug, plain):
    np.testing.assert_array_equal(a["label"], p["label"])  # same order either way
    assert a["image"].dtype == np.uint8
    for image, original in zip(a["image"], p["image"]):
      assert _crop_of(np.pad(original, ((4, 4), (4, 4), (0, 0))), image)

  single = collect(data.test_batches(16))
  # Two processes: each gets its half of every global batch, augmentation included.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  halves = {}
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    halves[index] = (list(data.train_batches(16, 1, 3)), collect(data.test_batches(16)))
  for step, whole in enumerate(aug):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][0][step][key], halves[1][0][step][key]]), whole[key])
  # Test: 50 examples in global batches of 16 = 4 batches of 8 per process;
  # together exactly the 50 examples.
  tests = [halves[i][1] for i in (0, 1)]
  assert all(len(t["mask"]) == 32 for t in tests)
  assert sum(int(t["mask"].sum()) for t in tests) == 50
  merged = np.concatenate([np.concatenate([tests[0]["label"][k * 8:(k + 1) * 8],
                                           tests[1]["label"][k * 8:(k + 1) * 8]])
                           for k in range(4)])
  np.testing.assert_array_equal(merged[:50], single["label"][single["mask"]])
  with pytest.raises(ValueError, match="multiple"):
    next(data.train_batches(15, 0, 0))


@pytest.fixture(scope="module")
def synthetic_imagenet_dir(tmp_path_factory):
  """A generated imagenet2012 of real 500x375 JPEGs (experiments/data/synthetic_imagenet.py)."""
  path = str(tmp_path_factory.mktemp("imagenet"))
  synthetic_imagenet.prepare(path, train=12, validation=6)
  return path


def test_imagenet_workers_stream_the_same_cropped_batches(synthetic_imagenet_dir):
  # The stock setting (workers=None: every CPU) against 1 worker and this process.
  data = {w: ip.get_dataset(make_config(name="imagenet2012", image_size=32, augment=True,
                                        data_dir=synthetic_imagenet_dir, workers=w,
                                        test_split="validation"))
          for w in (None, 0, 1)}
  assert data[None].train_source.workers == len(os.sched_getaffinity(0))
  assert (data[0].num_classes, data[0].image_shape, data[0].train_size) == (1000, (32, 32, 3),
                                                                            12)
  runs = {w: (list(d.train_batches(4, epoch=0, seed=1)), list(d.test_batches(4)))
          for w, d in data.items()}
  first, test = runs[0]
  assert len(first) == 3 and first[0]["image"].shape == (4, 32, 32, 3)
  assert first[0]["image"].dtype == np.uint8 and first[0]["label"].dtype == np.int32
  for w in (None, 1):  # worker processes make exactly the batches this process makes
    for a, b in zip(first + test, runs[w][0] + runs[w][1]):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  later = list(data[0].train_batches(4, epoch=1, seed=1))
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, later))
  assert [int(b["mask"].sum()) for b in test] == [4, 2]
  assert not test[1]["image"][2:].any()  # the padding
  # Eval crops are the center crop of the decoded JPEG.
  raw = data[0].test_source.data_source[0]
  np.testing.assert_array_equal(test[0]["image"][0], imagenet.eval_image(raw["image"], 32))
  assert test[0]["label"][0] == raw["label"]
  with pytest.raises(ValueError, match="workers"):
    ip.get_dataset(make_config(name="imagenet2012", data_dir=synthetic_imagenet_dir,
                               workers=-1))


def test_random_resized_crop_box_stays_inside():
  rng = np.random.default_rng(0)
  for width, height in [(500, 375), (40, 400), (400, 40), (1, 1)]:
    for _ in range(50):
      x, y, w, h = imagenet.random_resized_crop_box(rng, width, height)
      assert 0 <= x and 0 <= y and 0 < w and 0 < h
      assert x + w <= width and y + h <= height


def test_center_crop_resizes_the_shorter_side_to_256():
  import PIL.Image  # pylint: disable=g-import-not-at-top
  image = np.zeros((300, 600, 3), np.uint8)
  image[:, 300:] = 255  # right half white: the center crop straddles the edge
  out = imagenet.eval_image(image, 224)
  assert out.shape == (224, 224, 3)
  # 300x600 -> 256x512; the crop spans columns 144..368, the edge is at 256.
  assert out[:, :100].max() == 0 and out[:, 124:].min() == 255
  # Resampling only the crop's box equals resizing the whole image, then cropping.
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (375, 500, 3), np.uint8)
  whole = np.asarray(PIL.Image.fromarray(noise).resize((341, 256), PIL.Image.BILINEAR))
  top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
  want = whole[top:top + 224, left:left + 224].astype(int)
  assert np.abs(imagenet.eval_image(noise, 224).astype(int) - want).max() <= 1


def test_jpeg_bytes_decode_like_arrays():
  import io  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  image = np.asarray(PIL.Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(
      (500, 375), PIL.Image.BICUBIC))
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format="PNG")  # lossless: the same pixels
  np.testing.assert_array_equal(imagenet.train_image(buf.getvalue(), 5, 64),
                                imagenet.train_image(image, 5, 64))
  np.testing.assert_array_equal(imagenet.eval_image(buf.getvalue(), 64),
                                imagenet.eval_image(image, 64))


def test_steps_per_epoch_reads_the_metadata_not_the_examples(fm_dir, monkeypatch):
  """What the sweep counts its steps with: the Dataset's own count, without loading a split."""
  config = make_config(name="fashion_mnist", data_dir=fm_dir, train_split="train[:1000]",
                       test_split="test[:10]")
  want = ip.get_dataset(config).steps_per_epoch(64)
  monkeypatch.setattr(ip, "_load_split", lambda *args: pytest.fail("loaded a split"))
  assert ip.steps_per_epoch(config, 64) == want == 1000 // 64
  assert ip.steps_per_epoch(make_config(name="fashion_mnist", data_dir=fm_dir), 128) == 468
