"""`paired`: the DA-CLIP layout `<root>/<type>/LQ/*` + `<root>/<type>/GT/*` -> a TFDS dataset.

The degradation type comes from the folder name: our names (DEGRADATION_TYPES, '-' or '_') or the
DA-CLIP ones in FOLDER_TYPES. LQ and GT files pair by file name without extension. Reported and
skipped (in `builder.problems`): type folders we do not model (e.g. 'shadowed'), folders without
LQ/ and GT/, an LQ without a GT or the reverse, several LQ (or GT) files with one name (`a.png` and
`a.jpg`: which one is meant cannot be told, so that name is skipped), unreadable images, pairs
whose sizes differ, and pairs reached twice through overlapping source folders.
Records: {'lq', 'hq': PNG bytes, 'type_id', 'type_name', 'file_name' (see `_file_name`), 'height', 'width'}.
"""
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from diffrestorer_jax.data.degradations import DEGRADATION_TYPES
from diffrestorer_jax.data.image_io import ImageReadError, encode_png, read_image
from diffrestorer_jax.data.tfds import common

FOLDER_TYPES = {"motion-blurry": "motion_blur", "blurry": "motion_blur", "hazy": "haze",
                "jpeg-compressed": "jpeg", "low-light": "low_light", "noisy": "noise",
                "raindrop": "raindrop", "rainy": "rain", "snowy": "snow"}


def folder_type(name: str) -> Optional[str]:
    """Our type name for a type folder, or None if we do not model it."""
    key = name.lower()
    if key.replace("-", "_") in DEGRADATION_TYPES:
        return key.replace("-", "_")
    return FOLDER_TYPES.get(key)


def _by_stem(folder: str) -> Dict[str, List[str]]:
    """{relative path without extension: [files]}; more than one file means an ambiguous name."""
    out: Dict[str, List[str]] = {}
    for p in common.list_files(folder):
        out.setdefault(os.path.splitext(os.path.relpath(p, folder))[0], []).append(p)
    return out


class Paired(tfds.core.GeneratorBasedBuilder):
    """Real degraded/clean pairs with a degradation label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PNG bytes per image, TF-free."}
    code_path = common.code_path_of(__file__)

    def __init__(self, *, src_dirs: Sequence[str] = (), split: str = "train", **kwargs):
        self._src_dirs = list(src_dirs)
        self._split = split
        self.problems: List[common.Problem] = []
        self.seen = common.SeenFiles()
        self.num_records = 0
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
            "lq": common.png_feature(),
            "hq": common.png_feature(),
            "type_id": tfds.features.Scalar(dtype=np.int32),
            "type_name": tfds.features.Text(),
            "file_name": tfds.features.Text(),
            "height": tfds.features.Scalar(dtype=np.int32),
            "width": tfds.features.Scalar(dtype=np.int32),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self._split: self._generate_examples()}

    def _pairs(self, type_dir: str):
        """(lq_path, gt_path) for matching names; every unmatched file is reported."""
        lq_dir, gt_dir = os.path.join(type_dir, "LQ"), os.path.join(type_dir, "GT")
        if not (os.path.isdir(lq_dir) and os.path.isdir(gt_dir)):
            self.problems.append((type_dir, "expected LQ/ and GT/ subfolders"))
            return
        lq, gt = _by_stem(lq_dir), _by_stem(gt_dir)
        for stem in sorted(set(lq) | set(gt)):
            duplicates = [(side, files) for side, files in (("LQ", lq.get(stem, [])), ("GT", gt.get(stem, [])))
                          if len(files) > 1]
            for side, files in duplicates:
                names = ", ".join(os.path.basename(f) for f in files)
                self.problems += [(f, f"{len(files)} {side} files share the name {stem!r} ({names}); "
                                      "that name is skipped") for f in files]
            if duplicates:
                continue
            if stem not in gt:
                self.problems.append((lq[stem][0], "LQ without a GT of the same name"))
            elif stem not in lq:
                self.problems.append((gt[stem][0], "GT without an LQ of the same name"))
            else:
                yield lq[stem][0], gt[stem][0]

    def _read_pair(self, lq_path: str, gt_path: str):
        try:
            lq, hq = read_image(lq_path), read_image(gt_path)
        except ImageReadError as e:
            self.problems.append((e.path, e.reason))
            return None
        if lq.shape != hq.shape:
            self.problems.append((lq_path, f"LQ size {lq.shape[:2]} differs from GT size {hq.shape[:2]}"))
            return None
        return lq, hq

    def _file_name(self, label: str, type_dir: str, lq_path: str) -> str:
        """The LQ path; from several roots '<type folder>/LQ/<root label>/<path within LQ>' (evaluation
        names a pair '<type folder>/LQ/...', so equal file names under two roots stay apart)."""
        if len(self._src_dirs) == 1:
            return common.text(lq_path)
        within = os.path.relpath(lq_path, os.path.join(type_dir, "LQ")).replace(os.sep, "/")
        return common.text(f"{os.path.basename(type_dir)}/LQ/{label}/{within}")

    def _generate_examples(self):
        for root, label in zip(self._src_dirs, common.root_labels(self._src_dirs)):
            for entry in sorted(os.listdir(root)):
                type_dir = os.path.join(root, entry)
                if not os.path.isdir(type_dir):
                    continue
                name = folder_type(entry)
                if name is None:
                    self.problems.append((type_dir, f"unknown degradation folder {entry!r}; known: "
                                                    f"{', '.join(list(DEGRADATION_TYPES) + list(FOLDER_TYPES))}"))
                    continue
                for lq_path, gt_path in self._pairs(type_dir):
                    if not self.seen.first_time(lq_path):
                        self.problems.append((lq_path, common.REPEATED))
                        continue
                    pair = self._read_pair(lq_path, gt_path)
                    if pair is not None:
                        self.num_records += 1
                        yield os.fsencode(lq_path), {
                            "lq": encode_png(pair[0]), "hq": encode_png(pair[1]),
                            "type_id": DEGRADATION_TYPES.index(name), "type_name": name,
                            "file_name": self._file_name(label, type_dir, lq_path),
                            "height": pair[1].shape[0], "width": pair[1].shape[1]}
