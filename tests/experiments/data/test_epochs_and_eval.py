"""The input pipeline's promises to the trainer, tested on the batches themselves.

  * Every epoch is a permutation of the train split: no example twice, every
    one once when the batch size divides the split; a different order for
    every epoch and every seed, the same for the same (seed, epoch), which is
    what a resumed run relies on.
  * Every batch has its own augmentation draw: no two batches of an epoch, and
    no batch of two epochs, share their shifts and flips; the draws cover
    every shift and both flips; nothing is augmented in evaluation.
  * Evaluation batches hold every test example exactly once, in order, for
    any batch size and any number of processes; the padding of the last batch
    is zeros and masked out, and every batch has the full size (so it splits
    over any device count the batch size is a multiple of).
  * The train-split evaluation sample (`train_batches(..., augment=False)`) is
    the stored images, unaugmented, whatever the dataset's `augment`.

Most tests run on small in-memory splits whose label is the example's index,
so that every batch says exactly which examples it holds; ImageNet's
streaming source runs on a fake data source of decoded arrays (no files, no
worker processes). One test reads a whole epoch of the real Fashion-MNIST.
"""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from experiments.data import imagenet
from experiments.data import input_pipeline as ip

PAD = {"fashion_mnist": 2, "cifar10": 4}
SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def synthetic(train_size, test_size, name="fashion_mnist", augment=True, seed=0):
  """A Dataset of random uint8 images whose labels are the examples' indices."""
  rng = np.random.default_rng(seed)
  shape = SHAPES[name]

  def source(n):
    return ip._ArraySource(rng.integers(0, 256, (n,) + shape, np.uint8),
                           np.arange(n, dtype=np.int32), name)

  return ip.Dataset(name=name, num_classes=10, image_shape=shape, train_size=train_size,
                    test_size=test_size, augment=augment, train_source=source(train_size),
                    test_source=source(test_size))


def labels_of(batches):
  return np.concatenate([b["label"] for b in batches])


@pytest.fixture
def processes(monkeypatch):
  """processes(count, index): makes this process `index` of `count` for input_pipeline."""

  def set_to(count, index):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: index)

  return set_to


# ----------------------------------------------------------------- epochs


@pytest.mark.parametrize("batch_size", [1000, 250, 64, 7])
def test_every_epoch_is_a_permutation_of_the_split(batch_size):
  data = synthetic(1000, 10)
  steps = 1000 // batch_size
  assert data.steps_per_epoch(batch_size) == steps
  orders = {}
  for seed, epoch in itertools.product((0, 1, 12345), (0, 1, 2, 7)):
    batches = list(data.train_batches(batch_size, epoch, seed))
    assert len(batches) == steps
    assert all(b["label"].shape == (batch_size,) for b in batches)
    order = labels_of(batches)
    assert len(np.unique(order)) == steps * batch_size  # nobody twice
    if 1000 % batch_size == 0:
      np.testing.assert_array_equal(np.sort(order), np.arange(1000))  # everybody once
    orders[seed, epoch] = order
  for a, b in itertools.combinations(orders, 2):
    assert not np.array_equal(orders[a], orders[b]), f"same order for (seed, epoch) {a}, {b}"
  # A resumed run asks again for (seed, epoch): exactly the same order, also
  # without augmentation (the order does not depend on it).
  for seed, epoch in ((1, 2), (12345, 7)):
    np.testing.assert_array_equal(labels_of(data.train_batches(batch_size, epoch, seed)),
                                  orders[seed, epoch])
    np.testing.assert_array_equal(
        labels_of(data.train_batches(batch_size, epoch, seed, augment=False)),
        orders[seed, epoch])
  if 1000 % batch_size:
    # The dropped remainder is a different set of examples every epoch.
    left_out = [set(range(1000)) - set(orders[0, e]) for e in (0, 1, 2)]
    assert left_out[0] != left_out[1] != left_out[2]


def test_a_long_run_sees_every_example_equally_often():
  data = synthetic(100, 10)
  seen = np.zeros(100, int)
  for epoch in range(30):
    np.add.at(seen, labels_of(data.train_batches(32, epoch, seed=3)), 1)
  # 96 of 100 each epoch; a fixed left-out set would leave some at 0.
  assert seen.sum() == 30 * 96 and seen.min() >= 20 and seen.max() == 30


# ----------------------------------------------------------------- augmentation


def draws(batch, source, pad):
  """[(dy, dx, flip)] of each augmented image: the crop of the padded original it is."""
  h, w = batch["image"].shape[1:3]
  out = []
  for image, index in zip(batch["image"], batch["label"]):
    padded = np.pad(source.images[index], ((pad, pad), (pad, pad), (0, 0)))
    found = [(y, x, flip) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
             for flip in (0, 1)
             if np.array_equal(image, padded[y:y + h, x:x + w][:, ::-1] if flip
                               else padded[y:y + h, x:x + w])]
    assert len(found) == 1, f"example {index}: not one shift/flip of its image: {found}"
    out.append(found[0])
  return np.array(out)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_every_batch_has_its_own_augmentation_draw(name):
  data = synthetic(128, 4, name=name)
  pad = PAD[name]

  def epoch(e, seed=0):
    return [draws(b, data.train_source, pad) for b in data.train_batches(32, e, seed)]

  first, second, other_seed = epoch(0), epoch(1), epoch(0, seed=1)
  assert len(first) == 4
  for i, j in itertools.combinations(range(4), 2):
    assert not np.array_equal(first[i], first[j]), f"batches {i} and {j} share their draws"
  for i in range(4):
    assert not np.array_equal(first[i], second[i]), f"batch {i} of epochs 0 and 1"
    assert not np.array_equal(first[i], other_seed[i]), f"batch {i} of seeds 0 and 1"
    assert len({tuple(d) for d in first[i]}) > 8  # one draw per image, not per batch
  # The same (seed, epoch) again: the same draws (resume).
  for a, b in zip(first, epoch(0)):
    np.testing.assert_array_equal(a, b)
  # Every shift and both flips occur, the flips about half the time.
  every = np.concatenate(first + second + other_seed)
  for axis in (0, 1):
    assert set(every[:, axis]) == set(range(2 * pad + 1))
  assert len({(y, x) for y, x, _ in every}) > 0.8 * (2 * pad + 1) ** 2
  assert 0.35 < every[:, 2].mean() < 0.65
  # Shifts are independent across the two axes and of the flip (not one draw reused).
  assert np.mean(every[:, 0] == every[:, 1]) < 0.5


def test_augmentation_does_not_depend_on_the_process_count(processes):
  data = synthetic(64, 4, name="cifar10")
  whole = list(data.train_batches(32, epoch=2, seed=9))
  for count in (2, 4):
    parts = []
    for index in range(count):
      processes(count, index)
      parts.append(list(data.train_batches(32, epoch=2, seed=9)))
    for step, batch in enumerate(whole):
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([p[step][key] for p in parts]), batch[key], err_msg=f"{count} {key}")


def test_no_augmentation_in_evaluation_or_the_train_split_sample():
  data = synthetic(96, 50, augment=True)
  assert data.augment
  augmented = next(data.train_batches(32, 0, seed=4))
  assert not np.array_equal(augmented["image"], data.train_source.images[augmented["label"]])
  # The train-split sample evaluation uses: the stored images, a seeded shuffle.
  sample = list(data.train_batches(32, 0, seed=4, augment=False))
  for batch in sample:
    np.testing.assert_array_equal(batch["image"], data.train_source.images[batch["label"]])
  np.testing.assert_array_equal(labels_of(sample),
                                labels_of(data.train_batches(32, 0, 4, augment=False)))
  assert not np.array_equal(labels_of(sample),
                            labels_of(data.train_batches(32, 0, 5, augment=False)))
  # The test split: exactly the stored images, in order.
  for batch in data.test_batches(16):
    real = batch["mask"]
    np.testing.assert_array_equal(batch["image"][real],
                                  data.test_source.images[batch["label"][real]])


# ----------------------------------------------------------------- evaluation


def global_eval_batches(data, batch_size, count, processes):
  """Each process's test batches, put back together into the global batches."""
  per_process = []
  for index in range(count):
    processes(count, index)
    per_process.append(list(data.test_batches(batch_size)))
  assert len({len(p) for p in per_process}) == 1, "processes yield different batch counts"
  out = []
  for parts in zip(*per_process):
    for part in parts:
      assert len(part["mask"]) == batch_size // count
      assert part["mask"].dtype == np.bool_ and part["label"].dtype == np.int32
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


@pytest.mark.parametrize("test_size", [1, 5, 64, 100, 103])
def test_evaluation_counts_every_example_once(test_size, processes):
  data = synthetic(8, test_size, augment=True)
  for batch_size, count in itertools.product((1, 2, 4, 6, 8, 64, 100, 128, 256), (1, 2, 4)):
    if batch_size % count:
      continue
    where = f"{test_size} examples, batch {batch_size}, {count} processes"
    batches = global_eval_batches(data, batch_size, count, processes)
    assert len(batches) == -(-test_size // batch_size), where
    for b in batches:
      assert b["image"].shape == (batch_size, 28, 28, 1), where  # always the full batch
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.sum() == test_size, where
    np.testing.assert_array_equal(labels[mask], np.arange(test_size), err_msg=where)
    np.testing.assert_array_equal(images[mask], data.test_source.images, err_msg=where)
    # The padding: after the real examples, all zeros.
    assert mask[:test_size].all() and not mask[test_size:].any(), where
    assert not images[~mask].any() and not labels[~mask].any(), where


# ----------------------------------------------------------------- ImageNet's source


def fake_imagenet(n, seed=0):
  """A stand-in for a TFDS data source: decoded images of varied sizes; label = index."""
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (20 + 3 * (i % 4), 24 + 2 * (i % 3), 3), np.uint8),
           "label": i} for i in range(n)]


def imagenet_dataset(train, test, size=8):
  return ip.Dataset(name="imagenet2012", num_classes=1000, image_shape=(size, size, 3),
                    train_size=len(train), test_size=len(test), augment=True,
                    train_source=ip._ImageNetSource(train, size, 0),
                    test_source=ip._ImageNetSource(test, size, 0))


def test_imagenet_epochs_and_evaluation(processes):
  data = imagenet_dataset(fake_imagenet(24), fake_imagenet(7, seed=1))
  orders = {(s, e): labels_of(data.train_batches(8, e, s)) for s in (0, 1) for e in (0, 1)}
  for order in orders.values():
    np.testing.assert_array_equal(np.sort(order), np.arange(24))
  assert len({o.tobytes() for o in orders.values()}) == 4
  np.testing.assert_array_equal(labels_of(data.train_batches(8, 1, 1)), orders[1, 1])
  for batch_size, count in ((4, 1), (4, 2), (2, 2), (8, 4), (16, 1)):
    batches = global_eval_batches(data, batch_size, count, processes)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert len(mask) == -(-7 // batch_size) * batch_size and mask.sum() == 7
    np.testing.assert_array_equal(labels[mask], np.arange(7))
    assert mask[:7].all() and not labels[~mask].any()
  processes(1, 0)
  # Evaluation: the center crop, never augmented.
  for batch in data.test_batches(4):
    for image, label, real in zip(batch["image"], batch["label"], batch["mask"]):
      if real:
        np.testing.assert_array_equal(image, imagenet.eval_image(
            data.test_source.data_source[label]["image"], 8))


def test_imagenet_every_batch_has_its_own_draw():
  # One example everywhere: any difference between two images is the draw's.
  example = fake_imagenet(1)
  indices = np.zeros((3, 6), np.int64)

  def batches(seed, epoch, local=(0, 6)):
    source = imagenet.BatchSource(example, indices, local, 16, seed=seed, epoch=epoch,
                                  augment=True)
    return [source[t]["image"] for t in range(3)]

  first = batches(0, 0)
  for i, j in itertools.combinations(range(3), 2):
    assert not np.array_equal(first[i], first[j]), f"batches {i} and {j}"
  for t in range(3):
    assert len({img.tobytes() for img in first[t]}) == 6  # per image, not per batch
    assert not np.array_equal(first[t], batches(0, 1)[t])  # another epoch
    assert not np.array_equal(first[t], batches(1, 0)[t])  # another seed
    np.testing.assert_array_equal(first[t], batches(0, 0)[t])  # resume
    # Two processes' halves are the one process's batch.
    np.testing.assert_array_equal(
        np.concatenate([batches(0, 0, (0, 3))[t], batches(0, 0, (3, 6))[t]]), first[t])
  # Without augmentation: the eval crop of the example, every time.
  plain = imagenet.BatchSource(example, indices, (0, 6), 16, seed=0, epoch=0, augment=False)
  want = imagenet.eval_image(example[0]["image"], 16)
  assert all(np.array_equal(image, want) for image in plain[1]["image"])


def test_imagenet_train_image_is_the_drawn_crop_mirrored_left_right():
  """RandomResizedCrop's box from the example's seed, resized, then the drawn left-right flip."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  flips = []
  for seed in range(16):
    rng = np.random.default_rng(seed)
    x, y, w, h = imagenet.random_resized_crop_box(rng, 60, 40)
    crop = np.asarray(PIL.Image.fromarray(image).resize((16, 16), PIL.Image.BILINEAR,
                                                        box=(x, y, x + w, y + h)))
    flips.append(rng.random() < 0.5)
    want = crop[:, ::-1] if flips[-1] else crop
    np.testing.assert_array_equal(imagenet.train_image(image, seed, 16), want,
                                  err_msg=f"seed {seed}")
  assert 0 < sum(flips) < len(flips)


# ----------------------------------------------------------------- real data


def test_a_real_fashion_mnist_epoch_is_a_permutation(fmnist_data_dir):
  config = ml_collections.ConfigDict(dict(name="fashion_mnist", data_dir=fmnist_data_dir,
                                          train_split="train", test_split="test",
                                          augment=True))
  data = ip.get_dataset(config)
  assert (data.train_size, data.test_size, data.augment) == (60000, 10000, True)
  source = data.train_source

  def keys(images, labels):
    flat = images.reshape(len(images), -1)
    return sorted(row.tobytes() + bytes([int(l)]) for row, l in zip(flat, labels))

  batches = list(data.train_batches(500, epoch=3, seed=0, augment=False))
  assert len(batches) == 120
  images = np.concatenate([b["image"] for b in batches])
  labels = labels_of(batches)
  assert keys(images, labels) == keys(source.images, source.labels)
  # Augmented, the same examples in the same order (labels), each one shifted or mirrored.
  augmented = list(itertools.islice(data.train_batches(500, epoch=3, seed=0), 4))
  np.testing.assert_array_equal(labels_of(augmented), labels[:2000])
  changed = np.concatenate([b["image"] for b in augmented]) != images[:2000]
  assert 0.8 < changed.reshape(2000, -1).any(axis=1).mean() < 1.0
