"""`hq_folder`: clean images from one or more folders -> a TFDS dataset (array_record, no TF).

Records: {'image': PNG bytes, 'file_name': source path (`common.text`), 'height', 'width'}. Files
that are not images by name, or that `read_image` refuses (corrupt, truncated, bombs, ...), and files
reached twice through overlapping source folders, are skipped and collected in `builder.problems`;
`build.build_dataset` writes them to a report file.
"""
import os
from typing import List, Sequence

import numpy as np
import tensorflow_datasets as tfds

from diffrestorer_jax.data.image_io import ImageReadError, encode_png, is_image_name, read_image
from diffrestorer_jax.data.tfds import common


class HqFolder(tfds.core.GeneratorBasedBuilder):
    """Clean (HQ) images for on-device synthetic degradation."""

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
            "image": common.png_feature(),
            "file_name": tfds.features.Text(),
            "height": tfds.features.Scalar(dtype=np.int32),
            "width": tfds.features.Scalar(dtype=np.int32),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        for folder in self._src_dirs:
            for path in common.list_files(folder):
                if not self.seen.first_time(path):
                    self.problems.append((path, common.REPEATED))
                    continue
                if not is_image_name(path):
                    self.problems.append((path, "not an image file name (extension)"))
                    continue
                try:
                    image = read_image(path)
                except ImageReadError as e:
                    self.problems.append((path, e.reason))
                    continue
                self.num_records += 1
                yield os.fsencode(path), {"image": encode_png(image), "file_name": common.text(path),
                             "height": image.shape[0], "width": image.shape[1]}
