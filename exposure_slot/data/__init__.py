"""Data for training and evaluation: the authors' split files and folder pairs
(``datasets``), and synthetic exposure errors made from well-exposed photos
(``synthesis``)."""

from .datasets import (
                       DatasetError,
                       ExposureDataset,
                       ImagePair,
                       check_pairs,
                       folder_pairs,
                       read_split,
)
from .synthesis import SyntheticExposurePairs, synthesize

__all__ = [
    "DatasetError", "ExposureDataset", "ImagePair", "check_pairs", "folder_pairs", "read_split",
    "SyntheticExposurePairs", "synthesize",
]
