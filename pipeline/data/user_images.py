"""`imagefolder:PATH`: a user's images in torchvision's ImageFolder layout (`PATH/<class>/<image>`), read with
PIL. The labels are the class folders' indices in sorted name order (as ImageFolder numbers them) and the
manifest lists the names (`classes`). Images are stored as uint8 levels (256), like the built-in image sources.

`data.channels`: 1 (grayscale) or 3 (RGB); null infers 1 when every image is grayscale, else 3.
`data.image_size`: resize every image to image_size x image_size (bilinear); null keeps the size, and then all
images must have one size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_modules.contract import DataInfo
from pipeline.data.prepared import Prepared, three_splits
from pipeline.data.user_files import SourceFile
from pipeline.errors import GenzooError

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}


def list_images(src: SourceFile):
    """(class names, [(file, class index)]) by torchvision's own ImageFolder rules (extensions, sorted classes)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(src.path))
        samples = make_dataset(str(src.path), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        msg = str(e).splitlines()[0] if str(e) else "no images"
        raise GenzooError(f"imagefolder {src.path}: {msg} (the layout is PATH/<class>/<image>)") from None
    return classes, samples


def read_image(path: str, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise GenzooError(f"{where}: cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load(dcfg, rng, path: str) -> Prepared:
    from PIL import Image

    src = SourceFile.open(path, "imagefolder", folder=True)
    where = f"imagefolder {src.path}"
    classes, samples = list_images(src)
    images = [read_image(f, where) for f, _ in samples]
    channels = dcfg.channels or (1 if all(im.mode in GRAYSCALE_MODES for im in images) else 3)
    images = [im.convert("L" if channels == 1 else "RGB") for im in images]
    if dcfg.image_size is not None:
        size = int(dcfg.image_size)
        images = [im.resize((size, size), Image.BILINEAR) for im in images]
    else:
        first = images[0].size
        for im, (f, _) in zip(images, samples):
            if im.size != first:
                raise GenzooError(f"{where}: images of different sizes ({Path(samples[0][0]).relative_to(src.path)} is "
                                  f"{first[0]}x{first[1]}, {Path(f).relative_to(src.path)} is {im.size[0]}x{im.size[1]}): "
                                  "set data.image_size to resize them")
    x = np.stack([np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels).transpose(2, 0, 1)
                  for im in images])
    y = np.asarray([c for _, c in samples], dtype=np.int64)
    src.check_splits(len(x), dcfg, "images")
    info = DataInfo(shape=x.shape[1:], kind="image", levels=256, num_classes=len(classes))
    extra = {"source_file": src.record(), "continuous": False, "classes": list(classes), "channels": channels}
    return Prepared(three_splits(x, y, dcfg, rng), info, where, extra)
