"""CIFAR-10 and CIFAR-100 as fastres knows them (classes, official files and checksums), and
in memory: uint8 images and labels per split, whatever the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastres.errors import DataError

IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Cifar:
    """One of the two CIFAR data sets: its classes in label order and its official files
    (the python archive, its md5, the folder it extracts to, and each file's md5 as
    torchvision's dataset code lists them)."""

    name: str
    classes: tuple[str, ...]
    archive: str
    archive_md5: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes  # the fine labels of CIFAR-100; its coarse labels are not used
    file_md5: dict[str, str]

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# Label order, which is also alphabetical order, in both.
CIFAR10 = Cifar(
    "cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels",
    {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
     "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
     "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"})
CIFAR100 = Cifar(
    "cifar100", tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
    pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
    shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
    television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()),
    "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", ("train",), "test",
    b"fine_labels", {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"})
DATASETS = {d.name: d for d in (CIFAR10, CIFAR100)}
CLASSES = CIFAR10.classes  # the default data set's


@dataclass(frozen=True)
class Split:
    """Decoded images (N, 32, 32, 3) uint8 HWC and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx])

    @staticmethod
    def concat(parts: list[Split]) -> Split:
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


@dataclass(frozen=True)
class EncodedSplit:
    """Encoded image files (JPEG/PNG bytes as uint8 arrays) and labels, for decoders such
    as DALI's that take the files themselves."""

    files: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> EncodedSplit:
        return EncodedSplit([self.files[i] for i in idx], self.labels[idx])


@dataclass(frozen=True)
class Splits:
    """Training and test data; `val` is a held-out part of the training set, or None."""

    train: Split | EncodedSplit
    test: Split | EncodedSplit
    val: Split | EncodedSplit | None = None


def hold_out(splits: Splits, val_size: int, seed: int) -> Splits:
    """Move a seeded random `val_size` of the training set into a validation split, as the
    paper did (45k/5k) to choose its schedule."""
    n = len(splits.train)
    if val_size == 0:
        return splits
    if not 0 < val_size < n:
        raise DataError(f"--val-split {val_size} must be between 0 and the {n} training images")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return Splits(splits.train.subset(train_idx), splits.test, splits.train.subset(val_idx))


def check_split(split: Split, name: str, classes: tuple[str, ...] = CLASSES) -> None:
    """Every class present and every image 32x32 RGB: a smaller set is never silent."""
    if split.images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images are {split.images.shape[1:]}, expected {IMAGE_SHAPE}")
    check_classes(split.labels, name, classes)


def check_classes(labels: np.ndarray, name: str, classes: tuple[str, ...] = CLASSES) -> None:
    """Every class among `labels`: a split missing some (a tree or archive without some
    class folders) is refused in one line naming them, never read as a smaller set."""
    missing = sorted(set(range(len(classes))) - set(np.unique(labels).tolist()))
    if missing:
        shown = ", ".join(classes[i] for i in missing[:5])
        shown += f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{name}: no images of class {shown}")
