"""Data: image/mask folders, the embedded synthetic default, train/val/test, and loaders.

Every dataset here returns `(image, contour)`:
    image    float32 (C, H, W), scaled to [0, 1] by the file's full scale (255 for 8-bit,
             65535 for 16-bit). No further normalisation: DDPM.py decides what the model sees.
    contour  float32 (1, H, W), values exactly {0, 1}.

Read top-down:
    `ContourDataset`     any `<root>/<split>/{images,masks}` or flat `<root>/{images,masks}`
                         folder; every pair is checked once at construction, so a bad file
                         raises a `DatasetError` naming it there, never mid-epoch;
    `SyntheticContours`  textured images with smooth irregular regions, generated on the fly;
    `build_datasets`     the train/val/test dict the training loop asks for;
    `make_loader`        a DataLoader with the right sampler, workers and seeding for one rank.
"""
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VAL_SPLIT_NAMES = ("val", "valid", "validation")
MIN_VAL_IMAGES = 20           # fewer, and val IoU is too noisy to stop on (a warning says so)
FIT_MODES = ("pad", "stretch", "crop")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L"

# Mask rules (issue 3, rule 2), as fractions of full scale or of the mask's pixels.
LEVEL_TOLERANCE = 0.10        # within this of 0 is background, of the mask's max foreground
MAX_INTERMEDIATE = 0.05       # more intermediate pixels than this: a soft map, refused
LABEL_LEVEL_SHARE = 0.01      # an intermediate value on this share of pixels is a label
MAX_LABEL_LEVELS = 16         # label maps have few distinct levels; JPEG edges have many


class DatasetError(ValueError):
    """A problem with the user's data folder: the message names the file and the fix."""


# ----------------------------------------------------------------------------- reading files

def read_array(path, mask=False):
    """Decode one image file as stored: (H, W) or (H, W, 3) array and its full-scale value.

    8-bit modes have full scale 255, 16-bit ("I;16*", and "I" as Pillow opens some 16-bit
    files) 65535, bilevel ("1") 1, float ("F") 1. Alpha is dropped. A palette ("P") image
    becomes RGB, a palette mask its indices (the labels it stores). A 12-bit scan stored in
    16 bits is scaled by 65535 too, so it looks dark: rescale such files before training.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DatasetError(f"{path} is empty (0 bytes), perhaps a failed copy. "
                           "Copy it again or remove it (and its partner) from the folder.")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file must fail here, not in a worker
            return _pil_to_array(im, path, mask)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow refuses zero-width/height headers at open, so zero-sized images land here too.
        kind = "not a readable image" if isinstance(e, UnidentifiedImageError) else "corrupt"
        raise DatasetError(f"{path} is {kind} ({e}). Re-export it as PNG/JPEG/TIFF/BMP or "
                           "remove it (and its partner) from the folder.") from None


def _pil_to_array(im, path, mask):
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8), 1.0
    if mode == "L" or (mode == "P" and mask):
        return np.asarray(im), 255.0
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False), 65535.0
    if mode == "I":
        array = np.asarray(im)
        if array.min() < 0 or array.max() > 65535:
            raise DatasetError(f"{path} is a 32-bit integer image with values outside 0..65535. "
                               "Save it as 8- or 16-bit.")
        return array.astype(np.uint16), 65535.0
    if mode == "F":
        array = np.asarray(im, dtype=np.float32)
        if array.min() < 0 or array.max() > 1:
            raise DatasetError(f"{path} is a float image with values outside [0, 1]. "
                               "Rescale it to [0, 1] or save it as 8- or 16-bit.")
        return array, 1.0
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L")), 255.0
    return np.asarray(im.convert("RGB")), 255.0  # RGB, RGBA, CMYK, YCbCr, ...


def image_to_tensor(array, full_scale, channels):
    """(H, W) or (H, W, 3) stored array -> float32 (channels, H, W) in [0, 1]."""
    image = array.astype(np.float32) / full_scale
    if image.ndim == 3 and channels == 1:
        image = image @ LUMA_WEIGHTS                         # (H, W)
    if image.ndim == 2:
        image = np.repeat(image[None], channels, axis=0)     # (C, H, W)
    else:
        image = image.transpose(2, 0, 1)                     # (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(image))


# ----------------------------------------------------------------------------- mask rules

def mask_full_scale(raw, full_scale):
    """Masks stored as 0/1 count as full-scale 1, whatever their bit depth."""
    return 1.0 if raw.max() <= 1 else full_scale


def _grey_mask(raw, full_scale, path):
    """An RGB mask whose channels agree (white on black) becomes (H, W); colour is refused."""
    if raw.ndim == 2:
        return raw
    spread = raw.max(axis=2).astype(np.float32) - raw.min(axis=2)
    if spread.max() > LEVEL_TOLERANCE * full_scale:
        raise DatasetError(f"mask {path} is in colour (its RGB channels differ). Save masks as "
                           "single-channel greyscale with foreground white (or 1), background 0.")
    return raw.mean(axis=2).round().astype(raw.dtype)


def check_mask(raw, full_scale, path, mask_values=None, allow_soft_masks=False):
    """Refuse masks that rule 2 cannot binarise safely; raw is the stored (H, W) array.

    Each pixel is background (within 10% of full scale of 0), foreground (within 10% of full
    scale of the mask's maximum) or intermediate. Refused, naming the file and the fix:
      - a label map: few distinct values (<= 16) with an intermediate level on >= 1% of the
        pixels (e.g. 0/150/200/250), or class indices (values all within 10% of 0, max > 1);
      - a soft map: more than 5% intermediate pixels (a probability map, or image and mask
        folders swapped).
    JPEG masks pass: their intermediate values are scattered along edges, each on few pixels.
    `mask_values` (labels chosen explicitly) or `allow_soft_masks` skip these checks.
    """
    if mask_values is not None or allow_soft_masks:
        return
    if raw.dtype.kind in "ub":
        counts = np.bincount(raw.ravel().astype(np.int64))
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(raw, return_counts=True)
    scale = mask_full_scale(raw, full_scale)
    tolerance = LEVEL_TOLERANCE * scale
    vmax = values[-1]
    intermediate = (values > tolerance) & (values < vmax - tolerance)
    label_levels = intermediate & (counts >= LABEL_LEVEL_SHARE * raw.size)
    class_indices = 1 < vmax <= tolerance
    if len(values) <= MAX_LABEL_LEVELS and (label_levels.any() or class_indices):
        listed = ", ".join(str(v) for v in values.tolist())
        raise DatasetError(
            f"mask {path} looks like a label map, not a binary mask: its values are {listed}. "
            f"Pass --mask-values with the label(s) that are foreground, "
            f"e.g. --mask-values {values[-1]}, or learn every label as its own class with "
            f"--num-classes {len(values)}{' --class-values ' + listed.replace(',', '') if vmax >= len(values) else ''}.")
    share = counts[intermediate].sum() / raw.size
    if share > MAX_INTERMEDIATE:
        raise DatasetError(
            f"mask {path} is not binary: {share:.0%} of its pixels lie between background and "
            f"foreground (a soft probability map, or are the image and mask folders swapped?). "
            f"If it is a soft map, pass --allow-soft-masks to threshold it at --mask-threshold; "
            f"if the folders are swapped, swap them back.")


def mask_foreground(raw, full_scale, mask_threshold=0.5, mask_values=None):
    """Stored (H, W) mask -> bool (H, W): value >= mask_threshold x full scale, or a label
    in mask_values."""
    if mask_values is not None:
        return np.isin(raw, np.asarray(mask_values))
    return raw >= mask_threshold * mask_full_scale(raw, full_scale)


def label_map(raw, path, num_classes, class_values=None):
    """Stored (H, W) label map -> uint8 (H, W) class indices 0..K-1.

    Without `class_values` the stored values are the class indices and must lie in 0..K-1;
    with it, class_values[k] is the value stored for class k. A value outside those is
    refused, naming the file and the flag that fixes it. Absent classes are fine."""
    values = np.unique(raw)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DatasetError(f"mask {path} stores fractional values ({fractional[:3].tolist()} "
                           f"...): a label map holds whole class numbers. Save it as an 8- "
                           f"or 16-bit integer image.")
    if num_classes > 256:
        raise DatasetError(f"--num-classes {num_classes}: at most 256 classes are supported")
    if class_values is None:
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            listed = " ".join(str(v) for v in values.tolist())
            hint = (f"pass --class-values {listed} (the stored values in class order)"
                    if len(values) == num_classes else
                    f"pass --class-values with the {num_classes} stored values in class order "
                    f"(this file stores {listed}), or set --num-classes to the classes there are")
            raise DatasetError(f"mask {path} stores value(s) {' '.join(map(str, bad.tolist()))}, "
                               f"outside the class indices 0..{num_classes - 1} of "
                               f"--num-classes {num_classes}: {hint}.")
        return raw.astype(np.uint8)
    bad = np.setdiff1d(values, np.asarray(class_values))
    if bad.size:
        raise DatasetError(f"mask {path} stores value(s) {' '.join(map(str, bad.tolist()))} that "
                           f"--class-values {' '.join(map(str, class_values))} does not list. "
                           f"Add each to --class-values (and --num-classes), or fix the mask.")
    labels = np.zeros(raw.shape, dtype=np.uint8)
    for k, value in enumerate(class_values):
        labels[raw == value] = k
    return labels


def mask_labels(raw, full_scale, path, mask_threshold=0.5, mask_values=None, num_classes=2,
                class_values=None):
    """Stored (H, W) mask -> uint8 (H, W) classes: 0/1 for a binary mask (mask_foreground),
    0..K-1 for a label map of num_classes > 2 (label_map)."""
    if num_classes > 2:
        return label_map(raw, path, num_classes, class_values)
    return mask_foreground(raw, full_scale, mask_threshold, mask_values).astype(np.uint8)


# ----------------------------------------------------------------------------- folder layout

def _layout_help(root):
    found = sorted(p.name + "/" for p in Path(root).iterdir() if p.is_dir())
    return ("Accepted layouts:\n"
            "  <root>/<split>/images/* + <root>/<split>/masks/*  (splits: train, val, test)\n"
            "  <root>/images/* + <root>/masks/*                  (flat, no splits: split=None)\n"
            f"Folders found in {root}: {', '.join(found) or 'none'}.")


def resolve_layout(root, split):
    """(image_dir, mask_dir) for `split` of `root`, or a DatasetError that lists the layouts."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist. Pass --data with a folder of "
                           "images and masks, or leave it out to train on the synthetic set.")
    flat = (root / "images").is_dir()
    if split is None:
        if not flat:
            splits = [p.name for p in sorted(root.iterdir()) if (p / "images").is_dir()]
            hint = f"It has splits ({', '.join(splits)}): name one (--split).\n" if splits else ""
            raise DatasetError(f"{root} has no images/ folder for split=None. {hint}"
                               + _layout_help(root))
        base = root
    elif (root / split / "images").is_dir():
        base = root / split
    elif flat:
        raise DatasetError(
            f"{root} has the flat layout (images/ and masks/, no splits), so it has no "
            f"'{split}' split; refusing to guess rather than serve the same images to every "
            f"split. main.py and evaluate.py hold back seeded fractions of a flat folder "
            f"themselves (--val-fraction, --test-fraction; in Python, load_split or "
            f"split=None), or move the pairs into {root}/{split}/images and masks.\n"
            + _layout_help(root))
    else:
        raise DatasetError(f"{root} has no '{split}' split ({root / split / 'images'} is "
                           "missing).\n" + _layout_help(root))
    if not (base / "masks").is_dir():
        raise DatasetError(f"{base / 'images'} has no partner folder {base / 'masks'}. "
                           "Put the masks there, one per image, with the same file stem.")
    return base / "images", base / "masks"


def _files_by_stem(folder, strip_suffix=""):
    """{stem: path} of the image files in `folder`; refuses two files with one stem."""
    files, ignored = {}, []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append(path.name)
            continue
        stem = path.stem
        if strip_suffix and stem.endswith(strip_suffix):
            stem = stem[: -len(strip_suffix)]
        if stem in files:
            raise DatasetError(f"{files[stem]} and {path} share the stem '{stem}', so the pairing "
                               "is ambiguous. Keep one of them.")
        files[stem] = path
    if not files:
        other = f" It holds {len(ignored)} other file(s), e.g. {ignored[0]}." if ignored else ""
        raise DatasetError(f"{folder} holds no images (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)}).{other} Add the files or fix --data.")
    return files


def pair_files(image_dir, mask_dir, mask_suffix=""):
    """Sorted (stem, image_path, mask_path) triples; an unpaired file raises, naming a few."""
    images = _files_by_stem(image_dir)
    masks = _files_by_stem(mask_dir, mask_suffix)
    lonely_images = sorted(images.keys() - masks.keys())
    lonely_masks = sorted(masks.keys() - images.keys())
    for names, files, folder in ((lonely_images, images, mask_dir),
                                 (lonely_masks, masks, image_dir)):
        if names:
            shown = ", ".join(files[n].name for n in names[:5])
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise DatasetError(f"{len(names)} file(s) have no partner in {folder}: "
                               f"{shown}{more}. Images and masks pair by file stem "
                               f"(a.png with a.png or a.jpg)."
                               + _suffix_hint(lonely_images, lonely_masks))
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def _suffix_hint(lonely_images, lonely_masks):
    """' Pass --mask-suffix ...' when an unpaired mask's stem is an unpaired image's plus more."""
    for mask_stem in lonely_masks[:20]:
        for image_stem in lonely_images:
            if mask_stem.startswith(image_stem):
                return (f" Masks look named like {mask_stem!r}: pass "
                        f"--mask-suffix {mask_stem[len(image_stem):]}.")
    return ""


# ----------------------------------------------------------------------------- resizing

def fit_square(image, mask, size, fit="pad"):
    """Image (C, H, W) float and mask (1, H, W) uint8 -> (C, size, size), (1, size, size).

    fit="pad": centre the picture on a black square (mask background), keeping its aspect
    ratio; "stretch": resize each side independently; "crop": keep the centre square (the
    rest of a non-square picture is lost). Then images resize bilinearly (antialiased when
    shrinking) and masks with nearest-exact, which samples pixel centres like bilinear does,
    so the two stay aligned.
    """
    h, w = image.shape[-2:]
    if h != w and fit == "pad":
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        padding = (left, side - w - left, top, side - h - top)
        image, mask = F.pad(image, padding), F.pad(mask, padding)
    elif h != w and fit == "crop":
        side = min(h, w)
        image, mask = TF.center_crop(image, [side, side]), TF.center_crop(mask, [side, side])
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], interpolation=v2.InterpolationMode.BILINEAR,
                          antialias=True).clamp_(0, 1)
        mask = TF.resize(mask, [size, size], interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return image, mask


def train_augmentation(flips=True):
    """The joint training augmentation: flips and a small affine move image and mask together
    (masks resample with nearest, so stay binary, or keep their labels); the jitter touches
    images only (v2 leaves `tv_tensors.Mask` alone). flips=False leaves out the random
    horizontal and vertical flips (for classes that are left or right of something)."""
    return v2.Compose([
        *([v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)] if flips else []),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


# ----------------------------------------------------------------------------- folder dataset

def _scan_pair(pair, mask_threshold, mask_values, allow_soft_masks, num_classes, class_values):
    """Decode one pair and check it: (height, width, foreground fraction), or a DatasetError."""
    _, image_path, mask_path = pair
    try:
        image, _ = read_array(image_path)
        raw, full_scale = read_array(mask_path, mask=True)
        if image.shape[:2] != raw.shape[:2]:
            (h, w), (mh, mw) = image.shape[:2], raw.shape[:2]
            raise DatasetError(f"image {image_path} is {w}x{h} but its mask {mask_path} is "
                               f"{mw}x{mh}. Re-export the mask at the image's size.")
        raw = _grey_mask(raw, full_scale, mask_path)
        if num_classes == 2:
            check_mask(raw, full_scale, mask_path, mask_values, allow_soft_masks)
        labels = mask_labels(raw, full_scale, mask_path, mask_threshold, mask_values,
                             num_classes, class_values)
        return image.shape[0], image.shape[1], float((labels > 0).mean())
    except DatasetError as e:
        return e


def available_cpus():
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ContourDataset(Dataset):
    """Image/mask pairs from a folder, checked once at construction.

    root: `<root>/<split>/images/*` + `<root>/<split>/masks/*`, or flat `<root>/images/*` +
        `<root>/masks/*` read with split=None (a named split on a flat folder is an error).
        Pairs match by file stem (a.png with a.png or a.jpg); `mask_suffix` strips an ending
        from mask stems (mask_suffix="_mask" pairs a.png with a_mask.png).
    Formats: PNG, JPEG, TIFF, BMP; 8- or 16-bit; greyscale or RGB. `channels` (1 or 3) is what
        the model gets: RGB becomes grey by ITU-R 601 luma, grey is repeated to 3 channels.
    Masks: foreground where the value is >= `mask_threshold` x full scale (0/1 masks count as
        full-scale 1), or, given `mask_values`, where the value is one of those labels.
        `check_mask` refuses label maps and soft maps; `allow_soft_masks=True` accepts the latter.
        With num_classes K > 2 a mask is a label map: values 0..K-1, or the K `class_values`
        in class order (see label_map); the contour is then the (1, S, S) class index map.
    image_size, fit: every pair becomes a square of `image_size`, see `fit_square`.
    augment: True applies `train_augmentation(flips)`; a callable taking and returning
        (tv_tensors.Image, tv_tensors.Mask) replaces it; False for validation and test.

    The scan decodes every image and mask once (in threads: Pillow decodes outside the GIL,
    1.4x faster on 2 cores) and raises a `DatasetError` for the first bad pair in file order;
    `sizes` and `foreground_fractions` keep what it found. Nothing is cached, neither the scan
    (198 JSRT pairs at 224 px take 0.15 s) nor pixels: files are re-read per item, so memory
    stays flat for any dataset size and workers share nothing.
    """

    def __init__(self, root, split="train", image_size=256, augment=False, channels=1,
                 mask_threshold=0.5, mask_values=None, *, fit="pad", mask_suffix="",
                 allow_soft_masks=False, scan_threads=None, num_classes=2, class_values=None,
                 flips=True):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
        if not 0 < mask_threshold <= 1:
            raise ValueError("mask_threshold is a fraction of full scale in (0, 1], "
                             f"got {mask_threshold}")
        self.root, self.split = Path(root), split
        self.image_size, self.channels, self.fit = image_size, channels, fit
        self.mask_threshold = mask_threshold
        self.mask_values = None if mask_values is None else [int(v) for v in mask_values]
        if num_classes < 2 or (num_classes > 2 and mask_values is not None):
            raise ValueError("num_classes >= 2; mask_values is for binary masks (num_classes=2), "
                             "class_values for label maps")
        self.num_classes = int(num_classes)
        self.class_values = None if class_values is None else [int(v) for v in class_values]
        self.image_dir, self.mask_dir = resolve_layout(self.root, split)
        pairs = pair_files(self.image_dir, self.mask_dir, mask_suffix)
        self.names = [stem for stem, _, _ in pairs]
        self.image_paths = [str(p) for _, p, _ in pairs]
        self.mask_paths = [str(p) for _, _, p in pairs]
        self.sizes, self.foreground_fractions = self._scan(pairs, allow_soft_masks, scan_threads)
        self.augment = augment
        self.augmentation = (augment if callable(augment)
                             else train_augmentation(flips) if augment else None)

    def _scan(self, pairs, allow_soft_masks, scan_threads):
        threads = scan_threads or min(8, available_cpus())
        args = (self.mask_threshold, self.mask_values, allow_soft_masks, self.num_classes,
                self.class_values)
        if threads > 1 and len(pairs) > 16:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(lambda pair: _scan_pair(pair, *args), pairs))
        else:
            results = [_scan_pair(pair, *args) for pair in pairs]
        errors = [r for r in results if isinstance(r, DatasetError)]
        if errors:
            more = f"\n({len(errors) - 1} other pair(s) in {self.root} also failed the scan.)"
            raise DatasetError(str(errors[0]) + (more if len(errors) > 1 else ""))
        fractions = [r[2] for r in results]
        if max(fractions) == 0:
            raise DatasetError(
                f"every mask in {self.mask_dir} is empty at --mask-threshold {self.mask_threshold}"
                f"{f' and --mask-values {self.mask_values}' if self.mask_values else ''}. Check "
                "that foreground is stored as the bright value (or as 1), or pass --mask-values "
                "with the stored foreground value(s).")
        return [r[:2] for r in results], fractions

    def __len__(self):
        return len(self.image_paths)

    def __repr__(self):
        return (f"ContourDataset({str(self.root)!r}, split={self.split!r}, pairs={len(self)}, "
                f"image_size={self.image_size}, channels={self.channels}, fit={self.fit!r}, "
                f"augment={bool(self.augment)})")

    def without_augmentation(self):
        """A view of the same scanned pairs with augmentation off (for held-back validation)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__, augment=False, augmentation=None)
        return view

    def load_pair(self, index):
        """The pair at native size: image (C, H, W) float32 in [0, 1], mask (1, H, W) uint8
        (0/1, or class indices 0..K-1)."""
        array, full_scale = read_array(self.image_paths[index])
        image = image_to_tensor(array, full_scale, self.channels)            # (C, H, W)
        path = self.mask_paths[index]
        raw, mask_scale = read_array(path, mask=True)
        raw = _grey_mask(raw, mask_scale, path)
        labels = mask_labels(raw, mask_scale, path, self.mask_threshold, self.mask_values,
                             self.num_classes, self.class_values)
        return image, torch.from_numpy(labels)[None]                        # (1, H, W)

    def __getitem__(self, index):
        image, mask = self.load_pair(index)
        image, mask = fit_square(image, mask, self.image_size, self.fit)    # (C, S, S), (1, S, S)
        if self.augmentation is not None:
            image, mask = self.augmentation(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()


# ----------------------------------------------------------------------------- nnU-Net layout

VOLUME_ENDINGS = (".nii.gz", ".nii")
EMPTY_SLICE_FRACTION = 0.2    # default share of training slices with no foreground (volumes)
PERCENTILES = (0.5, 99.5)     # default intensity clipping of a volume without --window


def is_nnunet(root):
    """True for nnU-Net's raw layout: dataset.json beside imagesTr/."""
    return root is not None and (Path(root) / "dataset.json").is_file() and (
        Path(root) / "imagesTr").is_dir()


def read_dataset_json(root):
    """nnU-Net's dataset.json, checked: {"channels": [names], "labels": [names in class
    order], "file_ending": ".png" | ".nii.gz" | ...}. Labels must be the consecutive
    integers 0..K-1 with 0 the background, as nnU-Net itself requires."""
    import json
    path = Path(root) / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)} (nnU-Net v2's dataset.json "
                           f"names channel_names, labels and file_ending)")
    labels = meta["labels"]
    if not all(isinstance(v, int) for v in labels.values()):
        raise DatasetError(f"{path}: labels must map each name to one integer (region-based "
                           f"labels, lists of integers, are not supported)")
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise DatasetError(f"{path}: labels must be the consecutive integers 0..K-1 with "
                           f"background 0, got {values}")
    channels = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
    names = sorted(labels, key=labels.get)
    listed = meta.get("dataset") or {}   # nnU-Net's optional explicit file list
    for case, entry in listed.items():
        for name in [*entry.get("images", []), entry.get("label")]:
            if name and not (Path(root) / name).is_file():
                raise DatasetError(f"{path} names {name} (case {case}), which is not there: "
                                   f"{Path(root) / name}")
    return {"channels": channels, "labels": names, "file_ending": meta["file_ending"],
            "num_training": meta.get("numTraining") or None}


def nnunet_cases(root, split, meta):
    """[(case, [channel paths], label path or None)] of `split` ("train": imagesTr +
    labelsTr; "test": imagesTs + labelsTs), sorted by case. Every case must have exactly
    the channel files dataset.json names (`<case>_0000<ending>`, ...) and, where the labels
    folder exists, its `<case><ending>`; a missing or extra file is refused, named."""
    root, ending = Path(root), meta["file_ending"]
    tag = {"train": "Tr", "test": "Ts"}[split]
    images, labels = root / f"images{tag}", root / f"labels{tag}"
    if not images.is_dir():
        raise DatasetError(f"{root} has no images{tag}/ folder for --split {split}")
    found = {}
    for path in sorted(images.iterdir()):
        if not path.name.endswith(ending):
            continue
        case, _, channel = path.name[:-len(ending)].rpartition("_")
        if not case or len(channel) != 4 or not channel.isdigit():
            raise DatasetError(f"{path}: image files are named <case>_<4-digit channel>{ending}")
        found.setdefault(case, {})[int(channel)] = path
    if not found:
        raise DatasetError(f"{images} holds no <case>_0000{ending} files (dataset.json's "
                           f"file_ending is {ending})")
    n = len(meta["channels"])
    cases = []
    for case, channels in sorted(found.items()):
        extra = sorted(set(channels) - set(range(n)))
        if extra:
            raise DatasetError(f"{channels[extra[0]]}: dataset.json's channel_names lists {n} "
                               f"channel(s) (_0000 .. _{n - 1:04d}); add the channel there or "
                               f"remove the file")
        missing = [images / f"{case}_{c:04d}{ending}" for c in range(n) if c not in channels]
        if missing:
            raise DatasetError(f"{missing[0]} is missing: dataset.json's channel_names lists "
                               f"{n} channel(s) for every case")
        label = labels / f"{case}{ending}" if labels.is_dir() else None
        if label is not None and not label.is_file():
            raise DatasetError(f"{label} is missing: every image case needs its label file")
        cases.append((case, [channels[c] for c in range(n)], label))
    if labels.is_dir():   # a label file without its image is a mistake too
        stray = sorted(set(p.name[:-len(ending)] for p in labels.iterdir()
                           if p.name.endswith(ending)) - set(found))
        if stray:
            raise DatasetError(f"{labels / (stray[0] + ending)} has no image "
                               f"{images / (stray[0] + '_0000' + ending)}")
    expected = meta.get("num_training") if split == "train" else None
    if expected is not None and expected != len(cases):
        raise DatasetError(f"{root / 'dataset.json'} says numTraining {expected}, but "
                           f"{images} holds {len(cases)} case(s)")
    return cases


def read_volume(path, label=False):
    """One image or label file as stored: (array (H, W) or (X, Y, Z), spacing per axis,
    full scale or None, nibabel image or None). NIfTI through nibabel (an optional
    dependency), any 2-D format through Pillow (spacing 1; label=True keeps a palette
    PNG's indices)."""
    path = Path(path)
    if path.name.endswith(VOLUME_ENDINGS):
        try:
            import nibabel
        except ImportError:
            raise DatasetError(f"{path} is a NIfTI volume: reading it needs nibabel "
                               f"(pip install nibabel)") from None
        volume = nibabel.load(str(path))
        array = np.asarray(volume.dataobj)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise DatasetError(f"{path}: a volume of shape {array.shape}; one 2-D or 3-D "
                               f"image per file is supported")
        return array, tuple(float(z) for z in volume.header.get_zooms()[:array.ndim]), None, volume
    array, full_scale = read_array(path, mask=label)
    if array.ndim == 3:
        array = array.astype(np.float32) @ LUMA_WEIGHTS
    return array, (1.0, 1.0), full_scale, None


def intensity_to_unit(array, window=None, full_scale=None):
    """Stored intensities -> float32 in [0, 1]: clipped to `window` (LOW, HIGH, e.g. HU)
    and scaled; else a 2-D file's full scale; else the volume's PERCENTILES."""
    array = array.astype(np.float32)
    if window is not None:
        low, high = window
    elif full_scale is not None:
        low, high = 0.0, full_scale
    else:
        low, high = np.percentile(array, PERCENTILES)
    return np.clip((array - low) / max(high - low, 1e-6), 0, 1)


def windowed_channels(channel_names, window):
    """Which channels --window applies to: those dataset.json names CT (nnU-Net's
    convention), or every channel when none is; the others get percentile clipping."""
    if window is None:
        return [False] * len(channel_names)
    ct = [name.strip().upper() == "CT" for name in channel_names]
    return ct if any(ct) else [True] * len(channel_names)


def volume_slices(array, axis):
    """(X, Y, Z) -> list of 2-D slices along `axis`; a 2-D array is one slice."""
    if array.ndim == 2:
        return [array]
    return list(np.moveaxis(array, axis, 0))


def stack_slices(slices, axis, ndim):
    """volume_slices undone: bit-equal to the volume the slices came from."""
    if ndim == 2:
        return slices[0]
    return np.moveaxis(np.stack(slices), 0, axis)


class NnUNetDataset(Dataset):
    """Slices of an nnU-Net raw data folder (dataset.json, imagesTr/, labelsTr/, optional
    imagesTs/, labelsTs/), PNG/TIFF images or NIfTI volumes, as (image, contour) items.

    Channels and classes come from dataset.json (channel_names; labels, 0 = background).
    A volume is read slice-wise along `slice_axis` (default the last); intensities are
    clipped to `window` (LOW, HIGH in stored units, HU for CT) or, without one, to each
    volume's 0.5 and 99.5 percentiles (a 2-D file: its full scale). `empty_slice_fraction`
    F: at most a fraction F of the slices have no foreground (a seeded choice of the empty
    ones is dropped; None keeps every slice, as validation and test do). `cases`: the case
    names to read (the train/val split is by case). Every case is read once at
    construction, checked (label values must be among dataset.json's labels) and kept in
    memory as resized slices (float16 images, uint8 labels); `slices` lists (case, index)
    and `spacing` each case's voxel size from its header.
    """

    def __init__(self, root, split="train", image_size=64, augment=False, cases=None,
                 slice_axis=-1, window=None, empty_slice_fraction=None, seed=0, fit="pad",
                 flips=True):
        self.root, self.split, self.image_size, self.fit = Path(root), split, image_size, fit
        self.meta = read_dataset_json(root)
        self.num_classes = len(self.meta["labels"])
        self.channels = len(self.meta["channels"])
        self.slice_axis, self.window = slice_axis, window
        self.cases = [c for c in nnunet_cases(root, split, self.meta)
                      if cases is None or c[0] in set(cases)]
        self.spacing, self.shapes, self.slices = {}, {}, []
        images, labels = [], []
        windowed = windowed_channels(self.meta["channels"], window)
        for case, channel_paths, label_path in self.cases:
            if label_path is None:
                raise DatasetError(f"{self.root}: split {split} has no labels folder")
            raw, spacing, _, _ = read_volume(label_path, label=True)
            channels = []
            for path, use_window in zip(channel_paths, windowed):
                array, _, full_scale, _ = read_volume(path)
                if array.shape != raw.shape:
                    raise DatasetError(f"{path} has shape {array.shape}, its label file "
                                       f"{label_path} {raw.shape}")
                channels.append(volume_slices(intensity_to_unit(
                    array, window if use_window else None, full_scale), slice_axis))
            values = np.unique(raw)
            bad = values[(values < 0) | (values >= self.num_classes) | (values != np.round(values))]
            if bad.size:
                raise DatasetError(f"{label_path} stores value(s) {' '.join(map(str, bad[:5].tolist()))} "
                                   f"that are not among dataset.json's labels (0 .. "
                                   f"{self.num_classes - 1}: {', '.join(self.meta['labels'])})")
            label_slices = volume_slices(raw.astype(np.uint8), slice_axis)
            self.spacing[case] = spacing
            self.shapes[case] = raw.shape
            for k, label in enumerate(label_slices):
                image = torch.from_numpy(np.stack([c[k] for c in channels]))
                mask = torch.from_numpy(np.ascontiguousarray(label))[None]
                image, mask = fit_square(image, mask, image_size, fit)
                images.append(image.half())
                labels.append(mask.to(torch.uint8))
                self.slices.append((case, k))
        keep = self._keep(labels, empty_slice_fraction, seed)
        if labels and not keep:
            raise DatasetError(f"no slice of {self.root} ({split}) shows foreground: check "
                               f"the label files and dataset.json's labels")
        self.dropped_empty = len(labels) - len(keep)   # by empty_slice_fraction
        self.images = [images[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.slices = [self.slices[i] for i in keep]
        self.names = [f"{case}_{k:04d}" for case, k in self.slices]
        self.augmentation = train_augmentation(flips) if augment else None

    @staticmethod
    def _keep(labels, fraction, seed):
        """Indices of the slices to keep: every one with foreground, and of the empty ones
        at most as many as make up `fraction` of the result (a seeded choice)."""
        full = [i for i, m in enumerate(labels) if m.any()]
        empty = [i for i, m in enumerate(labels) if not m.any()]
        if fraction is None or not empty:
            return list(range(len(labels)))
        allowed = int(fraction / (1 - fraction) * len(full)) if fraction < 1 else len(empty)
        chosen = np.random.default_rng(seed).permutation(empty)[:allowed].tolist()
        return sorted(full + chosen)

    def case_names(self):
        return [case for case, _, _ in self.cases]

    def case_truth(self, case):
        """(label array as stored, voxel spacing): what a stacked prediction is scored on."""
        path = next(label for name, _, label in self.cases if name == case)
        raw, spacing, _, _ = read_volume(path, label=True)
        return raw.astype(np.uint8), spacing

    def slice_shape(self, case):
        """(h, w) of the case's stored slices."""
        shape = list(self.shapes[case])
        if len(shape) == 3:
            del shape[self.slice_axis]
        return tuple(shape)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, mask = self.images[index].float(), self.labels[index]
        if self.augmentation is not None:
            image, mask = self.augmentation(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()


# ----------------------------------------------------------------------------- synthetic set

class SyntheticContours(Dataset):
    """Textured, noisy images of 1-3 smooth irregular regions, with exact masks; the default
    data for `python main.py`. Item i is generated on the fly from (seed, i): deterministic,
    nothing stored; about 0.7 ms per 64 px sample (8 ms at 256 px) on one CPU core.

    Each image is the sum, clipped to [0, 1] (clipping touches < 0.5% of pixels), of:
        0.5                                    mid grey
        illumination ramp, +-(0.20-0.35)       linear in a random direction: the brightness
                                               changes by 0.4-0.7 from one side to the other
        background blotches, std 0.05          smooth noise, a 6 x 6 grid interpolated
        region offset, +0.20-0.30              inside the regions only
        region stripes, amplitude 0.08         inside only; period 4-6 px at 64 px, random angle
        pixel noise, std 0.04
    Regions are star-shaped, r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)), k = 2..5, with
    r0 in 0.13-0.22 of the side and centres in the middle 45%, so masks cover 5-35% of the
    image and are never empty or full.

    Learnable: every boundary is a local step of 0.20-0.30 (5-7 noise std) plus a texture
    change, which a small conv net sees at once. Not a threshold problem: the ramp moves the
    background by more than the offset, so region and background intensities overlap. Measured
    with `threshold_baseline` on 1000 samples at 64 px: the best global threshold scores IoU
    0.35 and even the best threshold chosen per image 0.40, whereas `python main.py` (the
    default UNet2D, x0-prediction, 8 minutes on 2 CPU cores) reaches val IoU above 0.99
    (`benchmarks/train_targets.py synthetic` prints both); tests/test_dataset.py keeps the
    threshold scores low.
    """

    def __init__(self, n, image_size=64, seed=0, channels=1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.n, self.image_size, self.seed, self.channels = n, image_size, seed, channels
        coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self._y, self._x = coords[:, None], coords[None, :]                  # (S, 1), (1, S)
        self._blotch_basis = _linear_basis(image_size, 6)                    # (S, 6)

    def __len__(self):
        return self.n

    def __repr__(self):
        return (f"SyntheticContours(n={self.n}, image_size={self.image_size}, seed={self.seed}, "
                f"channels={self.channels})")

    def generate(self, index):
        """Image (S, S) float32 in [0, 1] and mask (S, S) bool for item `index`."""
        rng = np.random.default_rng([self.seed, index])
        x, y, size = self._x, self._y, self.image_size
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0.275, 0.725, size=2)
            r0 = rng.uniform(0.13, 0.22)
            dx, dy = x - cx, y - cy                                          # (1, S), (S, 1)
            theta = np.arctan2(dy, dx)                                       # (S, S)
            radius = np.full_like(theta, r0)
            for k, amplitude in zip(range(2, 6), rng.uniform(0, 1, 4) * [0.12, 0.08, 0.06, 0.05]):
                radius += r0 * amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
            mask |= dx * dx + dy * dy < radius * radius
        direction = rng.uniform(0, 2 * np.pi)
        ramp = rng.uniform(0.20, 0.35) * 2 * ((x - 0.5) * np.cos(direction)
                                              + (y - 0.5) * np.sin(direction))
        blotches = self._blotch_basis @ rng.normal(0, 0.07, (6, 6)) @ self._blotch_basis.T
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 6) / size
        stripes = 0.08 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period
                                + rng.uniform(0, 2 * np.pi))
        offset = rng.uniform(0.20, 0.30)
        image = 0.5 + ramp + blotches + mask * (offset + stripes)
        image += rng.normal(0, 0.04, (size, size))
        return np.clip(image, 0, 1).astype(np.float32), mask

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        image, mask = self.generate(index)
        image = torch.from_numpy(image)[None].repeat(self.channels, 1, 1)   # (C, S, S)
        return image, torch.from_numpy(mask)[None].float()                  # (1, S, S)


def _linear_basis(size, knots):
    """(size, knots) weights that linearly interpolate `knots` values onto `size` pixels."""
    positions = (np.arange(size) + 0.5) / size * (knots - 1)
    weights = np.clip(1 - np.abs(positions[:, None] - np.arange(knots)[None]), 0, None)
    return weights.astype(np.float32)


def threshold_baseline(dataset, num_samples=200, num_thresholds=64):
    """IoU of plain intensity thresholds on `dataset` (grey images): the floor a model must beat.

    Returns {"global": best mean IoU of one threshold and polarity for every image,
             "per_image": mean IoU when each image gets its own best threshold and polarity}.
    """
    thresholds = np.linspace(0, 1, num_thresholds + 2)[1:-1]               # (T,)
    ious = []
    for i in range(min(num_samples, len(dataset))):
        image, mask = dataset[i]
        grey, mask = image.mean(0).numpy().ravel(), mask.numpy().ravel() > 0  # (HW,)
        bins = np.searchsorted(thresholds, grey, side="right")             # grey >= t_k: bin > k
        fg = np.bincount(bins[mask], minlength=num_thresholds + 1)
        bg = np.bincount(bins[~mask], minlength=num_thresholds + 1)
        fg_above = fg[::-1].cumsum()[::-1][1:]                             # (T,) foreground >= t
        bg_above = bg[::-1].cumsum()[::-1][1:]
        n_fg, n_bg = fg.sum(), bg.sum()
        iou_above = fg_above / np.maximum(n_fg + bg_above, 1)              # predict grey >= t
        iou_below = (n_fg - fg_above) / np.maximum(n_fg + n_bg - bg_above, 1)
        ious.append(np.concatenate([iou_above, iou_below]))                # (2T,)
    ious = np.stack(ious)                                                  # (N, 2T)
    return {"global": float(ious.mean(0).max()), "per_image": float(ious.max(1).mean())}


# ----------------------------------------------------------------------------- train / val / test

def held_back_count(fraction, n):
    """How many of n items a held-back split takes: round(fraction x n), at least one for a
    fraction above 0. A negative fraction is the validation rule: 10%, but at least
    min(MIN_VAL_IMAGES, 20%), so small sets still validate on enough images to rank runs."""
    if fraction < 0:
        return max(1, round(0.1 * n), min(MIN_VAL_IMAGES, round(0.2 * n)))
    return max(1, round(fraction * n)) if fraction > 0 else 0


def split_indices(n, fractions, seed):
    """Seeded split of range(n): one sorted index list per fraction (see held_back_count),
    then the rest (last).

    The same (n, fractions, seed) gives the same split on every rank and every run, and the
    first parts do not depend on the later fractions: a larger val split never moves the
    test split held back before it.
    """
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for fraction in fractions:
        count = held_back_count(fraction, n)
        parts.append(sorted(order[start:start + count].tolist()))
        start += count
    if start >= n:
        raise ValueError(f"held-back fractions {fractions} leave nothing of {n} items to train on")
    return parts + [sorted(order[start:].tolist())]


def split_train_val(dataset, val_fraction=0.1, seed=0):
    """(train, val) Subsets of a ContourDataset: val is a seeded held-back fraction, read
    without augmentation; train is the rest, with the dataset's own augmentation."""
    val_indices, train_indices = split_indices(len(dataset), [val_fraction], seed)
    plain = dataset.without_augmentation() if hasattr(dataset, "without_augmentation") else dataset
    return Subset(dataset, train_indices), Subset(plain, val_indices)


def build_datasets(data=None, image_size=64, channels=1, val_fraction=0.1, seed=0, augment=True,
                   synthetic_sizes=(2000, 200, 200), test_fraction=0.1, **dataset_kwargs):
    """{"train", "val", "test"} datasets for the training loop.

    data=None: three SyntheticContours of `synthetic_sizes`, seeds 3*seed, 3*seed+1, 3*seed+2
        (disjoint for every seed; no augmentation, each item is already new).
    A folder with splits: train = its `train` split (augmented if `augment`); val = its
        `val` (or `valid`/`validation`) split if present, else a seeded `val_fraction` of
        train held back without augmentation; test = its `test` split, or None.
    A flat folder (images/ + masks/): seeded `test_fraction` and `val_fraction` of all pairs
        are held back (not augmented) as test and val; the rest trains.
    Extra keyword arguments (mask_threshold, mask_values, fit, ...) go to ContourDataset.
    """
    if data is None:
        n_train, n_val, n_test = synthetic_sizes
        return {name: SyntheticContours(n, image_size, seed=3 * seed + offset, channels=channels)
                for offset, (name, n) in enumerate([("train", n_train), ("val", n_val),
                                                    ("test", n_test)])}
    if is_nnunet(data):   # test (imagesTs) is read by load_split when scored, not here
        return {**nnunet_datasets(data, image_size, val_fraction, seed, augment,
                                  splits=("train", "val"), **dataset_kwargs), "test": None}
    dataset_kwargs = {k: v for k, v in dataset_kwargs.items() if k not in VOLUME_OPTIONS}
    root = Path(data)
    common = dict(image_size=image_size, channels=channels, **dataset_kwargs)
    if (root / "images").is_dir() and not (root / "train" / "images").is_dir():
        everything = ContourDataset(root, split=None, augment=augment, **common)
        test, val, train = split_indices(len(everything), [test_fraction, val_fraction], seed)
        plain = everything.without_augmentation()
        return {"train": Subset(everything, train), "val": Subset(plain, val),
                "test": Subset(plain, test) if test else None}
    train = ContourDataset(root, split="train", augment=augment, **common)
    val_split = next((s for s in VAL_SPLIT_NAMES if (root / s / "images").is_dir()), None)
    if val_split:
        val = ContourDataset(root, split=val_split, **common)
    else:
        train, val = split_train_val(train, val_fraction, seed)
    has_test = (root / "test" / "images").is_dir()
    test = ContourDataset(root, split="test", **common) if has_test else None
    return {"train": train, "val": val, "test": test}



VOLUME_OPTIONS = ("slice_axis", "window", "empty_slice_fraction")   # nnU-Net layout only
NNUNET_OPTIONS = ("fit", "flips", *VOLUME_OPTIONS)


def nnunet_datasets(data, image_size=64, val_fraction=0.1, seed=0, augment=True,
                    splits=("train", "val", "test"), **dataset_kwargs):
    """build_datasets for nnU-Net's layout, reading only `splits` (every case is held in
    memory): val is a seeded `val_fraction` of the imagesTr cases (by case, never by slice:
    no volume is in two splits), read whole; train the other cases, with at most
    `empty_slice_fraction` empty slices ("train_all": those cases, every slice); test is
    imagesTs + labelsTs, or None. PNG-folder mask options are ignored (dataset.json says)."""
    options = {k: v for k, v in dataset_kwargs.items() if k in NNUNET_OPTIONS}
    empty = options.pop("empty_slice_fraction", EMPTY_SLICE_FRACTION)
    meta = read_dataset_json(data)
    names = [case for case, _, _ in nnunet_cases(data, "train", meta)]
    val, train = split_indices(len(names), [val_fraction], seed)
    common = dict(image_size=image_size, seed=seed, **options)
    root = Path(data)
    has_test = (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir()
    build = {
        "train": lambda: NnUNetDataset(data, "train", augment=augment, empty_slice_fraction=empty,
                                       cases=[names[i] for i in train], **common),
        "train_all": lambda: NnUNetDataset(data, "train", cases=[names[i] for i in train],
                                           **common),
        "val": lambda: NnUNetDataset(data, "train", cases=[names[i] for i in val], **common),
        "test": lambda: NnUNetDataset(data, "test", **common) if has_test else None}
    return {split: build[split]() for split in splits}


def load_split(data, split, image_size=64, channels=1, val_fraction=0.1, seed=0,
               synthetic_sizes=(2000, 200, 200), test_fraction=0.1, **dataset_kwargs):
    """The `split` ("train", "val" or "test") of `data` as training drew it, read without
    augmentation: for scoring a checkpoint on the images its run held back.

    With the same arguments as `build_datasets` this gives the same images: the seeded test
    split of the synthetic set or of a flat folder, the val fraction held back from
    `train` (and `train` without it). A folder's own `test/` (or any other named split) is
    read directly, so a folder holding only `test/` works too. `names` lists the images'
    file stems (indices for the synthetic set).
    """
    root = None if data is None else Path(data)
    if is_nnunet(root):
        if split not in ("train", "val", "test"):
            raise DatasetError(f"--split on nnU-Net's layout is train, val (held back from "
                               f"imagesTr) or test (imagesTs + labelsTs); got {split!r}")
        wanted = "train_all" if split == "train" else split   # scored: every slice
        dataset = nnunet_datasets(data, image_size, val_fraction, seed, augment=False,
                                  splits=(wanted,), **dataset_kwargs)[wanted]
        if dataset is None:
            raise DatasetError(f"{data} has no imagesTs/ + labelsTs/ to score --split test on")
        return dataset
    dataset_kwargs = {k: v for k, v in dataset_kwargs.items() if k not in VOLUME_OPTIONS}
    if root is not None and split not in ("train", "val") and (root / split / "images").is_dir():
        return ContourDataset(root, split=split, image_size=image_size, channels=channels,
                              **dataset_kwargs)
    if split not in ("train", "val", "test"):
        where = f"or a folder under {data}" if data is not None else "for the synthetic set"
        raise DatasetError(f"--split must be train, val or test ({where}); got {split!r}")
    flat = root is not None and (root / "images").is_dir()
    if root is not None and not flat and not (root / "train" / "images").is_dir():
        resolve_layout(root, split)  # raises, listing the layouts
    datasets = build_datasets(data, image_size=image_size, channels=channels,
                              val_fraction=val_fraction, seed=seed, augment=False,
                              synthetic_sizes=synthetic_sizes, test_fraction=test_fraction,
                              **dataset_kwargs)
    dataset = datasets[split]
    if dataset is None:   # a split folder without test/, or a flat one with --test-fraction 0
        raise DatasetError(f"{data} has no test images: none were held back from it "
                           f"(--test-fraction) and it has no test/ folder; score --split val")
    dataset.names = _item_names(dataset)
    return dataset


def _item_names(dataset):
    """File stems of a ContourDataset or a Subset of one; indices otherwise."""
    if isinstance(dataset, Subset):
        inner = _item_names(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(getattr(dataset, "names", None) or map(str, range(len(dataset))))


# ----------------------------------------------------------------------------- distance maps

def signed_distance_map(mask):
    """Signed Euclidean distance to the boundary of a (1, H, W) mask, negative inside and
    positive outside, in units of the image's longer side (so loss weights carry across
    image sizes). An empty mask is +1 everywhere, a full one -1."""
    from scipy import ndimage
    fg = np.asarray(mask[0] > 0.5)
    side = max(fg.shape)
    if not fg.any():
        sdm = np.ones(fg.shape)
    elif fg.all():
        sdm = -np.ones(fg.shape)
    else:
        sdm = ndimage.distance_transform_edt(~fg) - ndimage.distance_transform_edt(fg)
        sdm = sdm / side
    return torch.from_numpy(sdm.astype(np.float32))[None]              # (1, H, W)


class WithDistanceMaps(Dataset):
    """(image, contour) -> (image, contour, signed distance maps), for the boundary and
    Hausdorff loss terms: (1, H, W) of a binary contour, or (K-1, H, W), one per foreground
    class, of a label map of num_classes K > 2. The maps are made here, after augmentation,
    in the loader's workers, so the training step never waits on a distance transform."""

    def __init__(self, dataset, num_classes=2):
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, contour = self.dataset[index]
        if self.num_classes == 2:
            return image, contour, signed_distance_map(contour)
        return image, contour, torch.cat([signed_distance_map(contour == k)
                                          for k in range(1, self.num_classes)])


# ----------------------------------------------------------------------------- loaders

def default_num_workers(local_world_size=None):
    """Loader workers per rank: this process's CPUs shared among the ranks on this node
    (LOCAL_WORLD_SIZE, else WORLD_SIZE), minus one for the rank itself, at most 8."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE")
                               or os.environ.get("WORLD_SIZE") or 1)
    return max(0, min(8, available_cpus() // max(1, local_world_size) - 1))


def seed_worker(worker_id):
    """Seed numpy and random from the worker's torch seed (itself drawn from the loader's
    generator), so every worker of every rank and epoch draws differently but reproducibly."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset, batch_size, train, distributed=False, num_workers=None, seed=0,
                device=None, *, rank=None, world_size=None, prefetch_factor=4):
    """A DataLoader for one rank; `batch_size` is per rank.

    distributed: a DistributedSampler shards the data (shuffled when training, seeded, padded so
        every rank runs the same number of steps); call `set_epoch(loader, epoch)` each epoch.
        rank/world_size default to the process group's.
    train: shuffle (seeded) and drop the last partial batch, unless that would leave no batch.
    num_workers: default `default_num_workers()`. With workers: prefetch_factor, persistent
        workers, and each worker seeded from the rank's generator (seed + rank).
    device: pin memory when it is CUDA (default: whether CUDA is available).
    """
    if distributed:
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                     shuffle=train, seed=seed)
        samples_per_rank = len(sampler)
    else:
        # its own generator: the loader's also seeds workers, and that draw happens only
        # when workers start, which would shift the shuffle of a resumed run
        sampler = (RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
                   if train else None)
        rank, samples_per_rank = 0, len(dataset)
    workers = default_num_workers() if num_workers is None else num_workers
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    worker_options = dict(prefetch_factor=prefetch_factor, persistent_workers=True,
                          worker_init_fn=seed_worker) if workers > 0 else {}
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=cuda,
                        drop_last=train and samples_per_rank >= batch_size,
                        generator=torch.Generator().manual_seed(seed + rank), **worker_options)
    loader.rank_seed = seed + rank
    return loader


def set_epoch(loader, epoch):
    """Make `epoch`'s order a function of (seed, rank, epoch) alone: reshuffle the
    DistributedSampler, or reseed the plain shuffle's generator; reseed the loader's own
    generator too (the seeds of workers started this epoch). A resumed run then sees the
    same batches in the same order as an uninterrupted one; with persistent workers their
    augmentation draws continue from where the workers started, so those differ."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator.manual_seed(loader.rank_seed + 1_000_003 * epoch)
    if hasattr(loader, "rank_seed"):
        loader.generator.manual_seed(loader.rank_seed + 2_000_003 * epoch)
