"""Image sources for latent extraction and the ADM center crop.

A source lists its examples up front (so every host agrees on the shard layout) and yields
``Example(key, label, load)`` items; ``load()`` opens the image, so slow decoding runs in
the extractor's thread pool and an unreadable file fails there, where it is counted and skipped.
"""
from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

IMAGENET_TRAIN_COUNT = 1_281_167
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM/guided-diffusion preprocessing: box-filter halving while the short side is at least
    2*size, bicubic resize of the short side to size, then a centered size x size crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images become 3-channel RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white rather than letting transparent pixels turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_and_crop(load: Callable[[], Image.Image], size: int) -> np.ndarray:
    """Opens, converts to RGB and ADM-crops one image: uint8 (size, size, 3)."""
    with load() as image:
        image.load()
        return np.asarray(adm_center_crop(to_rgb(image), size), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Example:
    key: str  # file path or dataset key, for logs of skipped images
    label: int
    load: Callable[[], Image.Image]


class FolderSource:
    """A class-per-folder tree (``root/<class>/<image>``); classes sorted by folder name, as in
    torchvision's ImageFolder, so ImageNet synset folders get the usual label order."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.root = root
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"image folder {root} has no class subfolders")
        self._files: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(root, name)
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames.sort()
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMAGE_EXTENSIONS):
                        self._files.append((os.path.join(dirpath, filename), label))
        if not self._files:
            raise ValueError(f"image folder {root} has no images with extensions {IMAGE_EXTENSIONS}")

    @property
    def name(self) -> str:
        return f"folder:{self.root}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def expected_count(self) -> int:
        return len(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def examples(self, start: int, stop: int) -> Iterator[Example]:
        for path, label in self._files[start:stop]:
            yield Example(path, label, lambda path=path: Image.open(path))


class TfdsImagenetSource:
    """``imagenet2012`` through tensorflow-datasets, prepared from the manually downloaded
    archives in ``manual_dir`` (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar). JPEG bytes
    are read undecoded and decoded with PIL, like the folder source."""

    MANUAL_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

    def __init__(self, manual_dir: str, split: str = "train", data_dir: str | None = None, prepare: bool = True):
        import tensorflow_datasets as tfds

        self._tfds = tfds
        self.manual_dir = manual_dir
        self.split = split
        self.builder = tfds.builder("imagenet2012", data_dir=data_dir)
        prepared = os.path.exists(os.path.join(self.builder.data_dir, "dataset_info.json"))
        if prepare and not prepared:
            # tfds would fail only after a long setup; name the missing archive up front.
            for archive in self.MANUAL_ARCHIVES:
                if not os.path.isfile(os.path.join(manual_dir, archive)):
                    raise FileNotFoundError(
                        f"{os.path.join(manual_dir, archive)} not found: tfds builds imagenet2012 from the "
                        f"manually downloaded {', '.join(self.MANUAL_ARCHIVES)} in the --source tfds: directory"
                    )
            self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        self._num_examples = self.builder.info.splits[split].num_examples
        self.num_classes = self.builder.info.features["label"].num_classes

    @property
    def name(self) -> str:
        return f"tfds:imagenet2012/{self.split}"

    @property
    def expected_count(self) -> int:
        return IMAGENET_TRAIN_COUNT if self.split == "train" else self._num_examples

    def __len__(self) -> int:
        return self._num_examples

    def examples(self, start: int, stop: int) -> Iterator[Example]:
        ds = self.builder.as_dataset(
            split=f"{self.split}[{start}:{stop}]",
            shuffle_files=False,
            decoders={"image": self._tfds.decode.SkipDecoding()},
        )
        for i, item in enumerate(ds.as_numpy_iterator()):
            data = item["image"]
            key = item.get("file_name", b"").decode() or f"{self.split}[{start + i}]"
            yield Example(key, int(item["label"]), lambda data=data: Image.open(io.BytesIO(data)))


def open_source(spec: str, split: str = "train", tfds_data_dir: str | None = None, prepare: bool = True):
    """``folder:/path/to/tree`` or ``tfds:/manual/dir`` -> a source."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("folder", "tfds") or not path:
        raise ValueError(f"--source must be folder:/path/to/tree or tfds:/manual/dir, got {spec!r}")
    if kind == "folder":
        return FolderSource(path)
    return TfdsImagenetSource(path, split, tfds_data_dir, prepare)
